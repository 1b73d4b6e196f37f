"""Gradient flow into attention (the SA-Softmax paper's mechanism), measured during training.

:class:`GradientFlowHook` is a ``step_hook`` for :func:`sasoftmax.train.train`. At the steps it is called
it runs one extra forward/backward of the step's batch on the eager backend, with
:func:`sasoftmax.backends.eager.record` capturing every attention call, and returns per layer:

- ``logit_grad_rms``: root-mean-square of dL/dx over the allowed (query, key) entries, x the final
  attention logits (bias and SSMax included) that enter the normalizer;
- ``vanish_frac``: the fraction of allowed entries with |dL/dx| < ``threshold`` (gradients that vanish);
- ``q_grad_norm`` / ``k_grad_norm``: Frobenius norms of the gradients of the q and k projection weights.

L is the *summed* token loss for the logit gradients (so each entry is "per token" and the numbers do
not shrink with batch size or sequence length) and the usual mean loss for the q/k weight gradients (the
gradients the optimizer sees). The hook runs in eval mode (no dropout) under a forked RNG, restores the
attention backends it changed and leaves no gradients behind, so training is not perturbed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor, nn

from ..backends import eager
from ..models import set_backend
from ..nn import MultiheadAttention

DEFAULT_THRESHOLD = 1e-6
"""|dL/dx| below this counts as vanished (per-token gradient, see the module docstring)."""


def attention_modules(model: nn.Module) -> list[MultiheadAttention]:
    """The model's attention layers in forward order (registration order of a sequential decoder)."""
    return [m for m in model.modules() if isinstance(m, MultiheadAttention)]


class GradientFlowHook:
    """Callable ``(step, model, inputs, targets) -> dict`` measuring gradient flow into attention.

    Args:
        threshold: |dL/dx| below this is counted in ``vanish_frac``; must be > 0.
        max_rows: measure on at most this many sequences of the batch (None = all): the eager backend
            materialises every layer's (B, H, T, T) logits and their gradients at once.
    """

    def __init__(self, threshold: float = DEFAULT_THRESHOLD, max_rows: int | None = None) -> None:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold < math.inf:
            raise ValueError(f"threshold must be a finite float > 0; got {threshold!r}")
        if max_rows is not None and (isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1):
            raise ValueError(f"max_rows must be None or a positive int; got {max_rows!r}")
        self.threshold = float(threshold)
        self.max_rows = max_rows

    def __call__(self, step: int, model: nn.Module, inputs: Tensor, targets: Tensor) -> dict:
        rows = slice(None, self.max_rows)
        return measure(model, inputs[rows], targets[rows], threshold=self.threshold)


def measure(model: nn.Module, inputs: Tensor, targets: Tensor, *, threshold: float = DEFAULT_THRESHOLD) -> dict:
    """One gradient-flow measurement on a batch: ``{"loss": float, "layers": [{...}, ...]}``.

    ``inputs``/``targets``: (B, T) token ids. The model's grads are cleared before and after.
    """
    layers = attention_modules(model)
    if not layers:
        raise ValueError("model has no sasoftmax.nn.MultiheadAttention layer to measure")
    backends = [m.backend for m in layers]
    was_training = model.training
    model.zero_grad(set_to_none=True)
    try:
        with torch.random.fork_rng(devices=[]):
            model.eval()
            set_backend(model, "eager")
            with eager.record() as calls:
                _, loss = model(inputs, targets)
                if loss is None:
                    raise ValueError("model returned no loss for the given targets")
                n_tokens = targets.numel()
                (loss * n_tokens).backward()
            out_layers = []
            for i, call in enumerate(calls):
                row = logit_gradient_stats(call["logits"].grad, call["allowed"], threshold)
                if i < len(layers):
                    row.update(weight_grad_norms(layers[i], n_tokens))
                out_layers.append(row)
    finally:
        for module, backend in zip(layers, backends):
            module.backend = backend
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return {"loss": float(loss.detach()), "threshold": threshold, "layers": out_layers}


def logit_gradient_stats(grad: Tensor | None, allowed: Tensor, threshold: float) -> dict[str, float]:
    """RMS of ``grad`` over ``allowed`` entries and the fraction of them with |grad| < ``threshold``.

    ``grad`` None (the logits did not reach the loss) counts as all zeros.
    """
    if grad is None or not bool(allowed.any()):
        return {"logit_grad_rms": 0.0, "vanish_frac": 1.0}
    g = grad.detach().abs()[allowed]
    return {
        "logit_grad_rms": float(g.pow(2).mean().sqrt()),
        "vanish_frac": float((g < threshold).float().mean()),
    }


def weight_grad_norms(module: MultiheadAttention, n_tokens: int) -> dict[str, float]:
    """Frobenius norms of the q/k projection weight gradients of the mean loss."""
    out = {}
    for name in ("q_proj", "k_proj"):
        grad = getattr(module, name).weight.grad
        out[f"{name[0]}_grad_norm"] = 0.0 if grad is None else float(grad.norm()) / n_tokens
    return out


def read_hooks(path: str | Path) -> list[dict]:
    """The JSON lines of a run's ``hooks.jsonl`` (empty list when the file does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    try:
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is corrupt: {err}") from err
    if not all(isinstance(r, dict) for r in records):
        raise ValueError(f"{path} is corrupt: every line must be a JSON object")
    return records


METRICS = ("logit_grad_rms", "vanish_frac", "q_grad_norm", "k_grad_norm")


def summarize(records: Iterable[dict]) -> dict:
    """Turn hook records into series: ``{"steps": [s...], "<metric>": [[per layer] per step], ...}``
    plus ``"mean_<metric>"``, the average over layers and steps (a single number for tables)."""
    records = sorted((r for r in records if "layers" in r), key=lambda r: r["step"])
    out: dict = {"steps": [r["step"] for r in records]}
    for metric in METRICS:
        series = [[layer.get(metric) for layer in r["layers"]] for r in records]
        out[metric] = series
        flat = [v for row in series for v in row if v is not None]
        out[f"mean_{metric}"] = sum(flat) / len(flat) if flat else None
    if records:
        out["threshold"] = records[0].get("threshold")
    return out
