"""Attention backends. Each is a module with two functions:

- ``unsupported(call: AttentionCall) -> str | None``: why it cannot serve ``call``, or None if it can;
- ``attention(call: AttentionCall) -> Tensor``: the output (B, Hq, L, Dv) in the input dtype.

``eager`` materialises the scores (the reference), ``cpu`` tiles them on the CPU with O(N) memory,
``triton`` runs fused GPU kernels (and Triton's interpreter on CPU tensors); ``sdpa`` hands plain softmax
calls to PyTorch's ``scaled_dot_product_attention`` (a baseline; ``auto`` never picks it).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from ..checks import check_choice
from .call import AttentionCall, BiasFunction

BACKENDS: tuple[str, ...] = ("eager", "cpu", "triton", "sdpa")

__all__ = ["BACKENDS", "AttentionCall", "BiasFunction", "load", "unavailable"]


def load(name: str) -> ModuleType:
    """Import backend ``name``; raises ImportError (with the reason) if it cannot run here."""
    check_choice("backend", name, BACKENDS)
    return importlib.import_module(f"{__name__}.{name}")


def unavailable(name: str) -> str | None:
    """Why backend ``name`` cannot be imported here (e.g. triton not installed), or None."""
    try:
        load(name)
    except ImportError as err:
        return f"backend {name!r} is unavailable: {err}"
    return None
