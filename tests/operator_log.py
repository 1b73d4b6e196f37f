"""The PyTorch operators a piece of code runs (for tests of what a backward launches)."""

from __future__ import annotations

from torch.utils._python_dispatch import TorchDispatchMode


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
