"""One-line switch of a HuggingFace ``transformers`` model to SA-Softmax and/or SSMax attention.

    from sasoftmax.integrations.transformers import convert, from_pretrained
    model = convert(AutoModelForCausalLM.from_pretrained(name), normalizer="sa_norm", ssmax=0.43)
    model.save_pretrained(path); model = from_pretrained(path)   # same normalizer, scales and weights

Importing this module registers the attention implementation :data:`ATTENTION_NAME` with transformers'
``AttentionInterface`` (the attention function) and ``AttentionMaskInterface`` (its masks: the boolean
masks of ``sdpa_mask``, or None where the pattern is plain causal or full). Every model whose attention
modules call ``ALL_ATTENTION_FUNCTIONS.get_interface(...)`` (Llama, Mistral, Qwen2/3, GPT-2, GPT-NeoX,
BERT, RoBERTa, ...) can then use it; the attention itself runs through :func:`sasoftmax.attention`, so it
gets the fastest backend for the device ("auto") or the one chosen at conversion.

Where things live:
- per attention module, a plain attribute ``sasoftmax_settings`` (:class:`Settings`: normalizer, backend,
  eps) and, with SSMax, a submodule ``ssmax_scale`` (:class:`sasoftmax.nn.SSMaxScale`) whose parameter
  ``s`` (one value per query head) is in ``state_dict`` and trains with the model;
- in ``model.config.sasoftmax``, the conversion arguments, so that :func:`from_pretrained` rebuilds the
  same model from what ``save_pretrained`` wrote.

Tested with transformers 5.23; the mask interface needs transformers >= 4.53.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import transformers
from safetensors import safe_open
from torch import Tensor, nn
from transformers import AttentionInterface, AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, cached_file

from ..attention import attention
from ..backends import BACKENDS, unavailable
from ..checks import check_choice
from ..nn import SSMaxScale
from ..normalizers import check_eps, check_normalizer

ATTENTION_NAME = "sasoftmax"
"""The ``attn_implementation`` name registered with both of transformers' interfaces."""

CONFIG_KEY = "sasoftmax"
"""``model.config.sasoftmax`` holds the arguments of :func:`convert` (a JSON-serialisable dict)."""

SETTINGS_ATTR = "sasoftmax_settings"
SCALE_ATTR = "ssmax_scale"

# Keyword arguments of ``from_pretrained`` that say where the files are (shared by config and weights).
HUB_KWARGS = ("cache_dir", "force_download", "proxies", "token", "revision", "local_files_only", "subfolder")


@dataclass(frozen=True)
class Settings:
    """How one converted attention module computes attention."""

    normalizer: str
    backend: str
    eps: float


def attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    position_bias: Tensor | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """The attention function registered as :data:`ATTENTION_NAME` (transformers' calling convention).

    Args:
        module: the calling attention module (carries ``sasoftmax_settings`` and the optional
            ``ssmax_scale`` set by :func:`convert`, and ``is_causal``).
        query: (B, Hq, L, D); key: (B, Hkv, S, D); value: (B, Hkv, S, Dv) — Hq % Hkv == 0 is GQA.
        attention_mask: transformers' mask for this layer: bool (B, 1|Hq, L, S) with True = attend (what our
            registered mask function returns), an additive float mask (finfo.min or −inf = masked, e.g. a
            4-D mask the caller built), or None when the pattern is plain causal (``module.is_causal``) or full.
        dropout: dropout probability on the weights (transformers passes 0 outside training).
        scaling: logit scale (default 1/√D).
        is_causal: overrides ``module.is_causal`` when given.
        position_bias: optional additive bias broadcastable to (B, Hq, L, S) (T5-style models).

    Returns:
        (output (B, L, Hq, Dv), None); attention weights are never materialised here.
    """
    settings = getattr(module, SETTINGS_ATTR, None)
    if _discovering:
        settings = _discovering[-1](module, query.shape[1], query.device)
    elif settings is None:
        raise ValueError(
            f"{type(module).__name__} runs attn_implementation={ATTENTION_NAME!r} but was not converted: build the "
            "model with sasoftmax.integrations.transformers.convert(model) or .from_pretrained(path)"
        )
    for name in ("softcap", "s_aux", "sinks"):
        if kwargs.get(name) is not None:
            raise ValueError(f"attn_implementation={ATTENTION_NAME!r} does not support {name!r} (got a value)")
    if kwargs.get("cache") is not None:
        raise ValueError(f"attn_implementation={ATTENTION_NAME!r} does not support paged caches (continuous batching)")
    lq, lk = query.shape[2], key.shape[2]
    mask, bias = _mask_and_bias(attention_mask, position_bias, lk)
    causal = False
    if attention_mask is None:
        causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
        if causal and 1 < lq < lk:
            # The one case where transformers skips a causal mask with more keys than queries: prefill into an
            # empty static cache, whose slots past L are unfilled (sdpa aligns is_causal upper-left there).
            key, value = key[:, :, :lq], value[:, :, :lq]
            bias = None if bias is None else bias[..., :lq]
    scale_module = getattr(module, SCALE_ATTR, None)
    out = attention(
        query,
        key,
        value,
        normalizer=settings.normalizer,
        causal=causal,
        mask=mask,
        bias=bias,
        scale=None if scaling is None else float(scaling),
        ssmax=None if scale_module is None else scale_module().to(query.device),
        eps=settings.eps,
        dropout_p=float(dropout),
        backend=settings.backend,
    )
    return out.transpose(1, 2).contiguous(), None


def _mask_and_bias(
    attention_mask: Tensor | None, position_bias: Tensor | None, lk: int
) -> tuple[Tensor | None, Tensor | None]:
    """Split transformers' mask (+ position bias) into our bool ``mask`` and additive ``bias``."""
    mask = bias = None
    if attention_mask is not None:
        attention_mask = attention_mask[..., :lk]
        if attention_mask.dtype == torch.bool:
            mask = attention_mask
        else:
            # Additive masks hold finfo.min (or −inf) at masked keys: those keys must not count in n, min or max.
            masked = attention_mask <= torch.finfo(attention_mask.dtype).min / 2
            mask = ~masked
            rest = attention_mask.masked_fill(masked, 0)
            if bool(rest.ne(0).any()):
                bias = rest
    if position_bias is not None:
        bias = position_bias if bias is None else bias + position_bias
    return mask, bias


# Callbacks of the conversions in progress: ``convert`` finds the attention modules by one forward pass.
_discovering: list[Callable[[nn.Module, int, torch.device], Settings]] = []


def convert(
    model: PreTrainedModel,
    normalizer: str = "sa_norm",
    ssmax: float | None = None,
    backend: str = "auto",
    *,
    eps: float = 1e-6,
) -> PreTrainedModel:
    """Switch every attention layer of ``model`` to :func:`sasoftmax.attention`, in place.

    Args:
        model: a transformers model whose attention goes through ``AttentionInterface``.
        normalizer: "softmax", "sa" or "sa_norm".
        ssmax: None (no SSMax) or the initial s (> 0) of a learnable per-head SSMax scale that each attention
            module gets as ``ssmax_scale`` (an :class:`~sasoftmax.nn.SSMaxScale`, parameter ``s`` of shape
            (num_query_heads,)). Converting again resets the scales.
        backend: backend of :func:`sasoftmax.attention` ("auto" = fastest for the device).
        eps: ε of sa_norm's denominator.

    Returns:
        ``model``, with ``model.config.sasoftmax`` recording these arguments and ``attn_implementation``
        set to :data:`ATTENTION_NAME`.

    Raises:
        TypeError / ValueError for bad arguments, and ValueError if no attention module of ``model`` goes
        through transformers' AttentionInterface. Finding the modules runs one forward pass on two tokens
        (``input_ids``), so ``model`` must be a text model on a real device.
    """
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"model must be a transformers PreTrainedModel; got {type(model).__name__}")
    settings = Settings(check_normalizer(normalizer), _check_backend(backend), check_eps(eps))
    ssmax = _check_ssmax(ssmax)
    input_name = getattr(model, "main_input_name", "input_ids")
    if input_name != "input_ids":
        raise ValueError(f"convert supports models that take input_ids; {type(model).__name__} takes {input_name!r}")

    previous = model.config._attn_implementation
    for module in model.modules():
        _strip(module)
    model.set_attn_implementation(ATTENTION_NAME)
    found: list[nn.Module] = []

    def adopt(module: nn.Module, num_heads: int, device: torch.device) -> Settings:
        if not any(m is module for m in found):
            found.append(module)
            setattr(module, SETTINGS_ATTR, settings)
            if ssmax is not None:
                setattr(module, SCALE_ATTR, SSMaxScale(num_heads, ssmax).to(device))
        return settings

    try:
        with _discovery(adopt):
            _probe(model)
    except Exception as err:
        _undo(model, previous)
        raise ValueError(
            f"convert finds the attention modules with one forward pass on input_ids of shape (1, 2); "
            f"{type(model).__name__} failed on it: {err}"
        ) from err
    if not found:
        _undo(model, previous)
        raise ValueError(
            f"{type(model).__name__}'s attention does not go through transformers' AttentionInterface "
            f"(attn_implementation={ATTENTION_NAME!r} was never called), so it cannot be converted"
        )
    setattr(model.config, CONFIG_KEY, {"normalizer": settings.normalizer, "ssmax": ssmax,
                                       "backend": settings.backend, "eps": settings.eps})
    return model


def _check_backend(backend: object) -> str:
    check_choice("backend", backend, ("auto",) + BACKENDS)
    reason = None if backend == "auto" else unavailable(backend)
    if reason:
        raise ValueError(reason)
    return backend


def _check_ssmax(ssmax: object) -> float | None:
    if ssmax is None:
        return None
    if isinstance(ssmax, bool) or not isinstance(ssmax, (int, float)):
        raise TypeError(f"ssmax must be None or a float > 0 (the initial SSMax s); got {type(ssmax).__name__}")
    if not 0 < ssmax < float("inf"):
        raise ValueError(f"ssmax must be a finite float > 0 (the initial SSMax s); got {ssmax}")
    return float(ssmax)


@contextmanager
def _discovery(callback: Callable[[nn.Module, int, torch.device], Settings]) -> Iterator[None]:
    _discovering.append(callback)
    try:
        yield
    finally:
        _discovering.remove(callback)


def _probe(model: PreTrainedModel) -> None:
    """One forward pass on two tokens, so that every attention module calls :func:`attention_forward`."""
    ids = torch.zeros((1, 2), dtype=torch.long, device=model.device)
    inputs = {"input_ids": ids}
    if getattr(model.config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = ids
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        model.train(was_training)


def _strip(module: nn.Module) -> None:
    """Remove what an earlier conversion attached to ``module``."""
    if SETTINGS_ATTR in vars(module):
        delattr(module, SETTINGS_ATTR)
    if SCALE_ATTR in module._modules:
        delattr(module, SCALE_ATTR)


def _undo(model: PreTrainedModel, previous: str | None) -> None:
    for module in model.modules():
        _strip(module)
    if previous is not None and previous != model.config._attn_implementation:
        model.set_attn_implementation(previous)
    if hasattr(model.config, CONFIG_KEY):
        delattr(model.config, CONFIG_KEY)


def ssmax_scales(model: nn.Module) -> dict[str, SSMaxScale]:
    """The SSMax scale modules of a converted model, by qualified module name (empty without SSMax)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, SSMaxScale)}


def from_pretrained(path: str | os.PathLike, **kwargs: Any) -> PreTrainedModel:
    """Load a model that ``save_pretrained`` wrote after :func:`convert`: same normalizer, SSMax scales, weights.

    Args:
        path: a directory (or hub repository) written by ``model.save_pretrained`` after :func:`convert`.
        **kwargs: passed to the model class's ``from_pretrained`` (e.g. ``dtype``, ``device_map``,
            ``revision``); the class is the one named in ``config.architectures``.

    Raises:
        ValueError if the config has no ``sasoftmax`` entry (the model was saved without conversion) or the
        weights lack an SSMax scale the conversion creates.
    """
    hub = {k: kwargs[k] for k in HUB_KWARGS if k in kwargs}
    config = kwargs.pop("config", None)
    if config is None:
        config = AutoConfig.from_pretrained(path, trust_remote_code=kwargs.get("trust_remote_code"), **hub)
    settings = getattr(config, CONFIG_KEY, None)
    if not isinstance(settings, dict):
        raise ValueError(
            f"the config at {path} has no {CONFIG_KEY!r} entry: it was not saved after convert(); load it with "
            "transformers and call sasoftmax.integrations.transformers.convert(model, ...)"
        )
    with _quiet_scale_report():
        model = _model_class(config).from_pretrained(path, config=config, **kwargs)
    convert(model, **settings)
    if settings.get("ssmax") is not None:
        _load_scales(model, path, hub)
    return model


class _ScaleReportFilter(logging.Filter):
    """Drops transformers' load report when all it lists are our SSMax scales as unexpected keys: the model
    class does not know them, and :func:`_load_scales` loads them right after."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if "LOAD REPORT" not in text:
            return True
        rows = [line for line in text.splitlines() if "|" in line][1:]  # after the header row
        return not rows or not all(f"{SCALE_ATTR}.s" in row and "UNEXPECTED" in row for row in rows)


@contextmanager
def _quiet_scale_report() -> Iterator[None]:
    logger = logging.getLogger("transformers.modeling_utils")
    quiet = _ScaleReportFilter()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def _model_class(config: PretrainedConfig) -> type[PreTrainedModel]:
    """The class named in ``config.architectures`` (what ``save_pretrained`` recorded), else AutoModel."""
    for name in getattr(config, "architectures", None) or ():
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and issubclass(cls, PreTrainedModel):
            return cls
    return AutoModel


def _load_scales(model: PreTrainedModel, path: str | os.PathLike, hub: dict[str, Any]) -> None:
    """Copy the saved SSMax scales into the fresh ones that :func:`convert` made.

    The model class knows nothing of the scales, so its own loading skips them; they are read here from the
    safetensors files (one file, or the shards listed in the index).
    """
    wanted = {f"{name}.s": m.s for name, m in ssmax_scales(model).items()}
    files: dict[str, str] = {}
    index = cached_file(path, SAFE_WEIGHTS_INDEX_NAME, _raise_exceptions_for_missing_entries=False, **hub)
    if index is not None:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        for key in wanted:
            if key in weight_map:
                files[key] = cached_file(path, weight_map[key], **hub)
    else:
        single = cached_file(path, SAFE_WEIGHTS_NAME, _raise_exceptions_for_missing_entries=False, **hub)
        if single is None:
            raise ValueError(f"found no {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME} at {path}")
        with safe_open(single, framework="pt") as f:
            files = {key: single for key in wanted if key in f.keys()}
    missing = sorted(set(wanted) - set(files))
    if missing:
        more = "..." if len(missing) > 3 else ""
        raise ValueError(f"the weights at {path} lack the SSMax scales {missing[:3]}{more}")
    with torch.no_grad():
        for key, param in wanted.items():
            with safe_open(files[key], framework="pt") as f:
                param.copy_(f.get_tensor(key))


def register() -> None:
    """Register :data:`ATTENTION_NAME` with both interfaces (done on import; idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, attention_forward)
    # sdpa's mask builder: bool masks (True = attend), None where causal/full patterns need no mask.
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


register()

__all__ = ["ATTENTION_NAME", "CONFIG_KEY", "Settings", "attention_forward", "convert", "from_pretrained", "register",
           "ssmax_scales"]
