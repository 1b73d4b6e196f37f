"""Attention backends. Each is a module with two functions:

- ``unsupported(call: AttentionCall) -> str | None``: why it cannot serve ``call``, or None if it can;
- ``attention(call: AttentionCall) -> Tensor``: the output (B, Hq, L, Dv) in the input dtype.

``eager`` materialises the scores (the reference), ``cpu`` tiles them on the CPU with O(N) memory,
``triton`` runs fused GPU kernels (and Triton's interpreter on CPU tensors); ``sdpa`` hands plain softmax
calls to PyTorch's ``scaled_dot_product_attention`` (a baseline; ``auto`` never picks it).
"""

from __future__ import annotations

from types import ModuleType

from ..checks import check_choice
from .call import AttentionCall, BiasFunction

BACKENDS: tuple[str, ...] = ("eager", "cpu", "triton", "sdpa")

__all__ = ["BACKENDS", "AttentionCall", "BiasFunction", "load", "unavailable"]

_loaded: dict[str, ModuleType] = {}
"""Backends imported so far. ``load`` imports a backend once, not per call, and ``torch.compile`` traces
its dictionary lookup (it cannot trace ``importlib``)."""


def load(name: str) -> ModuleType:
    """Import backend ``name`` (once); raises ImportError (with the reason) if it cannot run here."""
    module = _loaded.get(name)
    if module is None:
        check_choice("backend", name, BACKENDS)
        # Import statements (not importlib): torch.compile runs them while tracing a first call.
        if name == "eager":
            from . import eager as module
        elif name == "cpu":
            from . import cpu as module
        elif name == "triton":
            from . import triton as module
        else:
            from . import sdpa as module
        _loaded[name] = module
    return module


_reasons: dict[str, str] = {}
"""Why a backend could not be imported, for those that could not: tried once, like ``_loaded``."""


def unavailable(name: str) -> str | None:
    """Why backend ``name`` cannot be imported here (e.g. triton not installed), or None."""
    if name in _loaded:
        return None
    if name not in _reasons:
        try:
            load(name)
        except ImportError as err:
            _reasons[name] = f"backend {name!r} is unavailable: {err}"
            return _reasons[name]
    return _reasons.get(name)
