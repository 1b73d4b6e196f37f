"""A GPT-style decoder (nanoGPT-like, pre-norm) with a choice of normalizer, SSMax and positional encoding."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn import MultiheadAttention
from ..normalizers import check_normalizer
from ..positional import FIRE, SCORE_DEPENDENT, RoPE, ScoreBias, check_positional, make_positional, read_thresholds


@dataclass
class GPTConfig:
    """Sizes and attention choices of :class:`GPT`.

    ``block_size`` is the training length: it initialises FIRE's threshold and is otherwise no limit
    (no absolute position embeddings), so the model runs at any length. ``ssmax`` is None (off) or the
    initial s of a learnable per-head SSMax scale. ``pos_width`` is the hidden width of FIRE's MLP and
    of the DAPE networks.
    """

    vocab_size: int = 256
    block_size: int = 128
    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    n_kv_head: int | None = None
    mlp_ratio: int = 4
    dropout: float = 0.0
    bias: bool = False
    normalizer: str = "sa_norm"
    ssmax: float | None = None
    pos: str = "rope"
    pos_width: int = 32
    eps: float = 1e-6
    backend: str = "auto"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_embd", "n_head", "mlp_ratio", "pos_width"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive int; got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        kv = self.n_head if self.n_kv_head is None else self.n_kv_head
        if isinstance(kv, bool) or not isinstance(kv, int) or kv <= 0 or self.n_head % kv:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head!r})")
        check_normalizer(self.normalizer)
        check_positional(self.pos)
        if self.pos == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError(f"pos='rope' needs an even head size; got {self.n_embd // self.n_head}")


class CausalSelfAttention(MultiheadAttention):
    """Causal self-attention with a positional encoding, on :class:`sasoftmax.nn.MultiheadAttention`.

    ``backend`` is read at every forward (``set_backend`` changes it). The positional module ``pos``
    is either a rotary (RoPE), a relative bias (ALiBi, Kerple, FIRE: its :class:`~sasoftmax.RelativeBias`,
    which fused kernels evaluate and differentiate themselves; FIRE beyond its threshold is a bias function of
    positions, evaluated per block), or a :class:`~sasoftmax.positional.ScoreBias` (DAPE): then this module
    computes the scaled scores A = q·kᵀ/√D itself and passes the full (B, H, L, S) bias tensor, so the logits are
    A + bias(A) — exactly the DAPE papers' A + B + f([A; B]).
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__(
            config.n_embd, config.n_head, config.n_kv_head,
            normalizer=config.normalizer, ssmax=config.ssmax, dropout=config.dropout, bias=config.bias,
            eps=config.eps, backend=config.backend,
        )
        self.pos = make_positional(config.pos, config.n_head, self.head_dim, config.block_size, config.pos_width)

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        """(B, L, E) -> (B, L, E)."""
        q, k, v = self.project(x)
        bias = None
        if isinstance(self.pos, RoPE):
            q, k = self.pos(q, k)
        elif isinstance(self.pos, ScoreBias):
            # DAPE/DAPEV2 read the score map by design: materialised (O(L·S)), never inside the fused kernels.
            bias = self.pos(self.scaled_scores(q, k))
        elif self.pos is not None:
            # ALiBi, Kerple and FIRE (up to its threshold: a table per distance) hand attention() their
            # RelativeBias, which fused kernels evaluate per tile themselves; FIRE beyond it is a bias function.
            bias = self.pos
        return self.attend(q, k, v, causal=True, bias=bias)

    def scaled_scores(self, q: Tensor, k: Tensor) -> Tensor:
        """A = q·kᵀ/√D, (B, H, L, S) in float32 (k/v heads repeated for grouped-query attention)."""
        k = k.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1)
        return torch.matmul(q.float(), k.float().transpose(-1, -2)) / math.sqrt(self.head_dim)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.n_embd, config.mlp_ratio * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(config.mlp_ratio * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.dropout(self.attn(self.ln_1(x)))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Decoder-only language model with tied input/output embeddings.

    ``forward(idx (B, T) int64, targets (B, T) int64 or None) -> (logits (B, T, V), loss or None)``,
    loss the mean next-token cross-entropy (targets are the already shifted next tokens).
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        self._init_weights()

    def _init_weights(self) -> None:
        # GPT-2 initialisation for the transformer's own layers; positional modules keep theirs.
        std = 0.02
        nn.init.normal_(self.wte.weight, std=std)
        for block in self.blocks:
            attn = block.attn
            for layer in (attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj, block.mlp.fc, block.mlp.proj):
                nn.init.normal_(layer.weight, std=std)
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)
            # Residual projections scaled by 1/√(2·layers), as in GPT-2.
            for layer in (attn.out_proj, block.mlp.proj):
                nn.init.normal_(layer.weight, std=std / math.sqrt(2 * self.config.n_layer))

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        if idx.dim() != 2 or idx.dtype != torch.long:
            raise ValueError(f"idx must be an int64 tensor (B, T); got {idx.dtype} of shape {tuple(idx.shape)}")
        if self.config.pos == "fire":  # every layer's learnt threshold read at once, not one device wait per layer
            read_thresholds(block.attn.pos for block in self.blocks if isinstance(block.attn.pos, FIRE))
        x = self.drop(self.wte(idx))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    @property
    def score_dependent(self) -> bool:
        """Whether the positional encoding reads the materialised score map (DAPE): O(L·S) memory."""
        return self.config.pos in SCORE_DEPENDENT

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def device_of(model: nn.Module) -> torch.device:
    """Where ``model``'s parameters live (the CPU for a model without parameters): its inputs go there."""
    parameter = next(model.parameters(), None)
    return torch.device("cpu") if parameter is None else parameter.device


def set_backend(model: nn.Module, name: str) -> None:
    """Set the attention backend ("auto", "eager", "cpu", "triton", "sdpa") of every attention layer of ``model``."""
    found = False
    for module in model.modules():
        if isinstance(module, MultiheadAttention):
            module.backend = name
            found = True
    if not found:
        raise ValueError("set_backend: the model has no sasoftmax attention layer")
