"""The PyTorch operators a piece of code runs (for tests of what a backward launches)."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def traced_path(monkeypatch) -> None:
    """Make the fused backends take the path of a traced call (their custom operators) in eager mode, rather than
    the operators' eager twin (``sasoftmax.backends.eager_twin``)."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)


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
