"""A stand-in for a Triton kernel that launches it and keeps its arguments (for tests that read what a kernel
wrote into a buffer the caller does not return)."""

from __future__ import annotations


class Capture:
    """Stands in for a kernel: launches it and keeps its last launch's arguments by name."""

    def __init__(self, kernel):
        self.kernel, self.args = kernel, {}

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.args = dict(zip(self.kernel.arg_names, args), **kwargs)
            return self.kernel[grid](*args, **kwargs)

        return launch
