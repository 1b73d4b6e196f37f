"""The attention normalizers on a materialised score tensor: the reference for every backend.

Per row (one query), over the allowed keys J (DESIGN §1):

- ``softmax``: w = p = softmax(x)
- ``sa``:      w = x · p                                  (raw Self-Adjust Softmax)
- ``sa_norm``: w = (x − m) / (M − m + eps) · p,  m = min(0, min_J x),  M = max(0, max_J x)

Masked keys take no part in the max, min or softmax and get weight 0; a row with no allowed key gets
all-zero weights and zero gradients. Gradients flow through m and M (they are not detached), as in the
SA-Softmax authors' training code. Rows are not renormalised after the SA factor.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .checks import check_choice

NORMALIZERS: tuple[str, ...] = ("softmax", "sa", "sa_norm")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the math runs in: float64 for float64 inputs, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_normalizer(normalizer: object) -> str:
    """Return ``normalizer`` if it names a known normalizer, else raise a ValueError/TypeError."""
    return check_choice("normalizer", normalizer, NORMALIZERS)


def check_eps(eps: object, dtype: torch.dtype = torch.float32) -> float:
    """Return ``eps`` as a float if it is finite and > 0 in the compute dtype ``dtype``, else raise.

    ε = 0 would make sa_norm's weights 0/0 = NaN on rows whose logits are all equal (M = m = 0), and an ε
    below the dtype's smallest normal number rounds to (or near) 0 there.
    """
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a float > 0; got {type(eps).__name__}")
    tiny = torch.finfo(dtype).tiny
    if not tiny <= eps < float("inf"):
        raise ValueError(f"eps must be a finite float > 0 (at least {tiny:.3g} in {dtype}); got {eps}")
    return float(eps)


def masked_weights(x: Tensor, allowed: Tensor, normalizer: str, eps: float, dim: int = -1) -> Tensor:
    """Attention weights of ``normalizer`` for logits ``x`` where ``allowed`` is True.

    ``x`` is a floating tensor in the compute dtype whose masked entries may hold any finite value;
    ``allowed`` is a bool tensor of the same shape. Returns weights of ``x``'s shape and dtype.
    No validation: this is the inner function that the public API and the eager backend share.
    """
    neg_inf = torch.tensor(float("-inf"), dtype=x.dtype, device=x.device)
    pos_inf = torch.tensor(float("inf"), dtype=x.dtype, device=x.device)
    x = torch.where(allowed, x, torch.zeros((), dtype=x.dtype, device=x.device))
    for_max = torch.where(allowed, x, neg_inf)
    row_max = for_max.amax(dim, keepdim=True)
    # A fully masked row has max −inf; any finite shift works there because all its terms are 0. (Tests are
    # written so that a NaN logit passes through: it makes the shift, the sum and so the whole row NaN.)
    shift = torch.where(torch.isneginf(row_max), torch.zeros_like(row_max), row_max).detach()
    # −inf (not a masked_fill after exp) keeps the backward of exp finite at masked entries.
    e = torch.exp(torch.where(allowed, x - shift, neg_inf))
    total = e.sum(dim, keepdim=True)
    p = e / torch.where(total == 0, torch.ones_like(total), total)
    if normalizer == "softmax":
        return p
    if normalizer == "sa":
        return x * p
    # m = min(0, min x) and M = max(0, max x), differentiable by the tie rule of DESIGN §1: the gradient of M
    # reaches only the first allowed key that attains the max, and only when max x > 0 strictly (of m: the
    # first key attaining the min, when min x < 0). amax/amin would split it among tied keys and pass it on
    # at 0; argmax/argmin return the first index, and gather sends the gradient to that index alone.
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    high = torch.where(row_max > 0, x.gather(dim, for_max.argmax(dim, keepdim=True)), zero)
    for_min = torch.where(allowed, x, pos_inf)
    low = torch.where(for_min.amin(dim, keepdim=True) < 0, x.gather(dim, for_min.argmin(dim, keepdim=True)), zero)
    return (x - low) / (high - low + eps) * p


def normalize(
    scores: Tensor,
    normalizer: str = "sa_norm",
    *,
    mask: Tensor | None = None,
    dim: int = -1,
    eps: float = 1e-6,
) -> Tensor:
    """Attention weights of ``scores`` along ``dim``.

    Args:
        scores: floating tensor of logits, any shape. Entries equal to −inf count as masked.
        normalizer: one of :data:`NORMALIZERS`.
        mask: optional bool tensor broadcastable to ``scores``; True = attend.
        dim: the key dimension that the weights are normalised over.
        eps: the ε of ``sa_norm``'s denominator M − m + ε, > 0.

    Returns:
        Weights with the shape and dtype of ``scores`` (math in float32, float64 for float64).
    """
    if not isinstance(scores, Tensor):
        raise TypeError(f"scores must be a torch.Tensor; got {type(scores).__name__}")
    if not scores.is_floating_point():
        raise TypeError(f"scores must be a floating tensor; got dtype {scores.dtype}")
    check_normalizer(normalizer)
    eps = check_eps(eps, compute_dtype(scores.dtype))
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"dim must be an int; got {type(dim).__name__}")
    if scores.dim() == 0 or not -scores.dim() <= dim < scores.dim():
        raise ValueError(f"dim must index a dimension of scores (shape {tuple(scores.shape)}); got {dim}")
    x = scores.to(compute_dtype(scores.dtype))
    allowed = ~torch.isneginf(x)
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise TypeError("mask must be a bool tensor (True = attend); for an additive mask add it to scores")
        if mask.device != scores.device:
            raise ValueError(f"mask must be on scores' device {scores.device}; got {mask.device}")
        try:
            allowed = allowed & mask.expand_as(allowed)
        except RuntimeError:
            raise ValueError(
                f"mask of shape {tuple(mask.shape)} is not broadcastable to scores' shape {tuple(scores.shape)}"
            ) from None
    if x.shape[dim] == 0:
        return scores.clone()
    return masked_weights(x, allowed, normalizer, eps, dim).to(scores.dtype)
