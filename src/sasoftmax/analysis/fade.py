"""Attention fade (SSMax's motivation): how peaked a trained model's attention stays as the context grows.

For each context length n, :func:`attention_fade` feeds windows of n validation tokens to the model on
the eager backend and looks at the *last* query of each window, which attends to exactly n keys (causal
decoder). Per layer it reports, averaged over windows and heads:

- ``max_weight``: the largest attention weight of that row (softmax fades as ~1/n when logits stay bounded;
  SSMax is designed to keep it high);
- ``entropy``: the entropy (nats) of the row's weights as a distribution, |w| / Σ|w| (SA weights do not
  sum to 1 and raw ``sa`` weights can be negative; an all-zero row counts as entropy 0). A uniform row
  has entropy ln n.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..backends import eager
from ..models import device_of, set_backend
from .gradient_flow import attention_modules

# Cap on recorded attention-map entries per forward (all layers and heads hold their maps at once).
_MAX_MAP_ENTRIES = 2**24


def row_stats(weights: Tensor, allowed: Tensor) -> tuple[Tensor, Tensor]:
    """Largest weight and entropy of each row of ``weights`` (…, S) over its ``allowed`` keys.

    Returns two tensors of the leading shape (…). Rows without allowed keys give (0, 0).
    """
    w = torch.where(allowed, weights, torch.zeros((), dtype=weights.dtype))
    neg = torch.tensor(float("-inf"), dtype=weights.dtype, device=weights.device)
    top = torch.where(allowed, weights, neg).amax(-1)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    a = w.abs()
    p = a / a.sum(-1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)
    entropy = -(torch.xlogy(p, p)).sum(-1)
    return top, entropy


@torch.no_grad()
def attention_fade(model: nn.Module, tokens: Tensor, lengths: list[int], *, samples: int = 8) -> dict:
    """Largest attention weight and attention entropy of the last query vs context length.

    Args:
        model: a decoder LM whose attention layers are :class:`sasoftmax.nn.MultiheadAttention`;
            ``model(idx)`` with idx (B, n) long must run its causal attention.
        tokens: 1-D token ids (e.g. the validation split), at least ``max(lengths)`` long.
        lengths: context lengths n (positive ints).
        samples: windows per length, spread evenly over ``tokens``.

    Returns ``{"lengths": [n...], "max_weight": [...], "entropy": [...], "uniform_entropy": [ln n...],
    "layers": {"max_weight": [[per layer] per n], "entropy": [[...]]}}``; the top-level series average
    over layers.
    """
    lengths = check_lengths(lengths)
    if tokens.dim() != 1:
        raise ValueError(f"tokens must be 1-D token ids; got shape {tuple(tokens.shape)}")
    if tokens.numel() < max(lengths):
        raise ValueError(f"tokens has {tokens.numel()} ids; need at least max(lengths) = {max(lengths)}")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a positive int; got {samples!r}")
    layers = attention_modules(model)
    backends = [m.backend for m in layers]
    was_training = model.training
    tokens = tokens.long()
    device = device_of(model)
    per_layer_max: list[list[float]] = []
    per_layer_ent: list[list[float]] = []
    try:
        model.eval()
        set_backend(model, "eager")
        for n in lengths:
            starts = torch.linspace(0, tokens.numel() - n, samples).long().tolist()
            windows = torch.stack([tokens[s : s + n] for s in starts]).to(device)
            chunk = max(1, _MAX_MAP_ENTRIES // (n * n * max(1, len(layers))))
            tops: list[list[Tensor]] = []
            ents: list[list[Tensor]] = []
            for batch in windows.split(chunk):
                with eager.record() as calls:
                    model(batch)
                for i, call in enumerate(calls):
                    top, ent = row_stats(call["weights"][..., -1, :], call["allowed"][..., -1, :])
                    if i == len(tops):
                        tops.append([])
                        ents.append([])
                    tops[i].append(top.flatten())
                    ents[i].append(ent.flatten())
            per_layer_max.append([float(torch.cat(t).mean()) for t in tops])
            per_layer_ent.append([float(torch.cat(e).mean()) for e in ents])
    finally:
        for module, backend in zip(layers, backends):
            module.backend = backend
        model.train(was_training)
    return {
        "lengths": lengths,
        "max_weight": [sum(row) / len(row) for row in per_layer_max],
        "entropy": [sum(row) / len(row) for row in per_layer_ent],
        "uniform_entropy": [math.log(n) for n in lengths],
        "layers": {"max_weight": per_layer_max, "entropy": per_layer_ent},
    }


def check_lengths(lengths: object) -> list[int]:
    """``lengths`` as a sorted list of distinct positive ints, or a ValueError naming it."""
    if isinstance(lengths, (str, bytes)) or not hasattr(lengths, "__iter__"):
        raise TypeError(f"lengths must be a list of positive ints; got {type(lengths).__name__}")
    out = list(lengths)
    if not out or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in out):
        raise ValueError(f"lengths must be a non-empty list of positive ints; got {out!r}")
    return sorted(set(out))

