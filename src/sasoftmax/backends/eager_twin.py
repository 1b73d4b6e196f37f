"""An eager twin of a fused backend's two custom operators: the same functions, without the operators' dispatch.

A backend's kernels are PyTorch custom operators (``torch.library``) so that ``torch.compile`` and ``torch.export``
keep each direction as one opaque node. Called eagerly, an operator adds its dispatch, its aliasing checks and its
autograd glue (``torch._library.autograd``: argument defaults rebuilt per call) to every call: on an H200 machine
that glue set the pace of the harness GPT's training at seq 1k, ~1 ms of host time per layer and step (docs/triton.md,
session 11). :func:`eager_twin` builds the ``torch.autograd.Function`` that eager calls take instead: it runs the
operators' own forward and backward functions, sets up its context as the operator's autograd registration does
and returns the same gradients, so outputs and gradients are the operator's. Traced calls keep the operators
(the backends choose by ``torch.compiler.is_compiling()``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

DOUBLE_BACKWARD = (
    "no autograd formula was registered for a double backward through sasoftmax's fused kernels (their gradients are "
    "not differentiable); use backend='eager' for higher-order gradients"
)


def eager_twin(
    name: str,
    forward_op: Callable[..., tuple],
    backward_op: Callable[..., tuple],
    setup_context: Callable[[Any, tuple, tuple], None],
    gradients: Callable[[Any, Any, Callable[..., tuple]], tuple],
) -> type[torch.autograd.Function]:
    """A ``torch.autograd.Function`` named ``name`` (its graph nodes: ``<name>Backward``) whose forward is
    ``forward_op(*inputs)``, with ``setup_context(ctx, inputs, outputs)``, and whose backward is
    ``gradients(ctx, grad_out, backward)``, ``backward`` being ``backward_op`` (or, where the backward itself is
    recorded — ``create_graph``, ``torch.func.grad`` — ``backward_op`` behind a node that raises on a double backward,
    as the operators do: never a silently missing second-order term). ``grad_out`` is the gradient of the first
    output (the others are row statistics without gradients)."""

    def forward(*inputs):
        return forward_op(*inputs)

    # Function.apply binds its arguments to the forward's signature at every call (a Function with a separate
    # setup_context): inspect.signature of the operator's 15 parameters cost ~20 µs of the host's time per call
    # (development CPU; GPU machines' hosts ran Python ~4x slower). One variadic parameter, kept, binds in ~2 µs.
    forward.__signature__ = inspect.Signature([inspect.Parameter("inputs", inspect.Parameter.VAR_POSITIONAL)])

    def twin_backward(ctx, grad_out, *_unused_stat_grads):
        return gradients(ctx, grad_out, refusing.apply if torch.is_grad_enabled() else backward_op)

    def refuse(ctx, *_grads):
        raise RuntimeError(DOUBLE_BACKWARD)

    # Built with type(): autograd names a Function's graph node after the class when the class is created.
    # (A separate setup_context, as torch.func's transforms require of a Function: torch.func.grad takes the twin.)
    refusing = type(f"{name}Gradients", (torch.autograd.Function,), {
        "forward": staticmethod(backward_op), "setup_context": staticmethod(lambda ctx, inputs, output: None),
        "backward": staticmethod(refuse),
    })  # fmt: skip
    return type(name, (torch.autograd.Function,), {
        "forward": staticmethod(forward), "setup_context": staticmethod(setup_context),
        "backward": staticmethod(twin_backward),
    })  # fmt: skip
