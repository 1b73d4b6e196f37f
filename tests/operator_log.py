"""The PyTorch operators a piece of code runs (for tests of what a backward launches), and the paths the fused
backends' calls take."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def traced_path(monkeypatch) -> None:
    """Make the fused backends take the path of a traced call (their custom operators) in eager mode, rather than
    the operators' eager twin (``sasoftmax.backends.eager_twin``)."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)


def assert_skips_function_without_grad(monkeypatch, owner, name: str, backend: str, q, k, v) -> None:
    """Calls that no gradient can flow through (grad mode off, or no input that requires grad: inference, decoding)
    do not run the backend's ``torch.autograd.Function`` (``owner.name``; its ``apply`` is made to raise) and return
    what it returns; a call with an input that requires grad does run it."""
    import pytest

    from sasoftmax import attention

    q, k, v = (t.detach() for t in (q, k, v))
    want = attention(q.clone().requires_grad_(), k, v, normalizer="sa_norm", backend=backend).detach()  # the Function's

    def refuse(*args):
        raise AssertionError("autograd's Function ran for a call without gradients")

    monkeypatch.setattr(getattr(owner, name), "apply", refuse)
    with torch.no_grad():
        assert torch.equal(attention(q.requires_grad_(), k, v, normalizer="sa_norm", backend=backend), want)
    assert torch.equal(attention(q.detach(), k, v, normalizer="sa_norm", backend=backend), want)
    with pytest.raises(AssertionError, match="without gradients"):
        attention(q.detach().requires_grad_(), k, v, normalizer="sa_norm", backend=backend)


class OperatorLog(TorchDispatchMode):
    """Inside ``with OperatorLog() as log:`` every operator dispatched is appended to ``log.names`` (detaches,
    which launch nothing, left out); a custom operator's own insides are not seen."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not str(func).startswith("aten.detach"):
            self.names.append(str(func))
        return func(*args, **(kwargs or {}))
