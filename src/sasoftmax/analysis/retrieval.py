"""Key-information retrieval (SSMax's needle experiment), small enough for a CPU.

A synthetic task generated on the fly. Each *item* token stands for a (key, value) pair. A window of n
tokens holds random filler, *distractor* items (pairs with other keys, at rate ``distractor_rate``) and
exactly one *needle*, an item with key k, at a random position; the window ends with the token QUERY_k,
and the model must predict the needle's value there. One attention layer can solve it by matching the
query's key, but attention that fades with n mixes in the distractors' values: the SSMax paper's point.
A model is trained at one length and its accuracy measured at longer ones; chance is 1 / ``num_values``.

Token ids (all < 256, so a byte-level model can be used): fillers ``0 .. num_fillers−1``, then items
(key-major, ``num_keys × num_values`` ids), then the ``num_keys`` query tokens.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models import device_of


@dataclass(frozen=True)
class NeedleTask:
    """The token layout and mix of the task."""

    num_fillers: int = 32
    num_keys: int = 2
    num_values: int = 16
    distractor_rate: float = 0.25

    def __post_init__(self) -> None:
        for name in ("num_fillers", "num_keys", "num_values"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 2:
                raise ValueError(f"{name} must be an int >= 2; got {value!r}")
        rate = self.distractor_rate
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate <= 1:
            raise ValueError(f"distractor_rate must be a float in [0, 1]; got {rate!r}")
        if self.vocab_size > 256:
            raise ValueError(f"num_fillers + (num_keys + 1) * num_values must be <= 256; got {self.vocab_size}")

    @property
    def item0(self) -> int:
        """Id of the item (key 0, value 0); item (k, v) is ``item0 + k * num_values + v``."""
        return self.num_fillers

    @property
    def query0(self) -> int:
        """Id of QUERY_0; QUERY_k is ``query0 + k``."""
        return self.num_fillers + self.num_keys * self.num_values

    @property
    def vocab_size(self) -> int:
        return self.query0 + self.num_keys

    def value_logits(self, logits: Tensor) -> Tensor:
        """The model's answer as scores over the values, (B, num_values), read off its logits (B, V) at the
        value-0 items of key 0 (the answer tokens; any fixed set of num_values ids would do)."""
        return logits[:, self.item0 : self.item0 + self.num_values]

    def predict(self, logits: Tensor) -> Tensor:
        """Predicted values (B,) from last-position logits (B, V)."""
        return self.value_logits(logits).argmax(-1)

    def batch(self, batch_size: int, length: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``(idx (B, length) long, target (B,) long)``: target is the needle's value in ``0 .. num_values−1``."""
        if isinstance(length, bool) or not isinstance(length, int) or length < 2:
            raise ValueError(f"length must be an int >= 2 (needle and query); got {length!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int; got {batch_size!r}")
        shape = (batch_size, length)
        key = torch.randint(0, self.num_keys, (batch_size, 1), generator=generator)
        # Distractors: items whose key differs from the needle's (an offset of 1..K-1 modulo K).
        other = (key + torch.randint(1, self.num_keys, shape, generator=generator)) % self.num_keys
        values = torch.randint(0, self.num_values, shape, generator=generator)
        distractor = self.item0 + other * self.num_values + values
        filler = torch.randint(0, self.num_fillers, shape, generator=generator)
        idx = torch.where(torch.rand(shape, generator=generator) < self.distractor_rate, distractor, filler)
        value = torch.randint(0, self.num_values, (batch_size,), generator=generator)
        pos = torch.randint(0, length - 1, (batch_size,), generator=generator)
        rows = torch.arange(batch_size)
        idx[rows, pos] = self.item0 + key[:, 0] * self.num_values + value
        idx[:, -1] = self.query0 + key[:, 0]
        return idx, value


def last_logits(model: nn.Module, idx: Tensor) -> Tensor:
    """Logits of the last position, (B, V); ``model(idx)`` returns ``(logits (B, T, V), ...)`` or logits."""
    out = model(idx)
    logits = out[0] if isinstance(out, tuple) else out
    return logits[:, -1, :]


def train_needle(
    model: nn.Module,
    task: NeedleTask,
    *,
    length: int,
    steps: int,
    batch_size: int = 32,
    lr: float = 3e-3,
    seed: int = 0,
) -> list[float]:
    """Train ``model`` on the task at ``length`` with AdamW: cross-entropy of the value scores at the last
    position (:meth:`NeedleTask.value_logits`).

    Returns the loss of every step.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int; got {steps!r}")
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    device = device_of(model)
    losses = []
    for _ in range(steps):
        idx, target = (t.to(device) for t in task.batch(batch_size, length, generator))
        loss = F.cross_entropy(task.value_logits(last_logits(model, idx)), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
    model.zero_grad(set_to_none=True)
    return losses


@torch.no_grad()
def needle_accuracy(
    model: nn.Module, task: NeedleTask, lengths: list[int], *, samples: int = 256, batch_size: int = 64, seed: int = 1
) -> dict[str, float]:
    """Accuracy (argmax over the value scores) at each length: ``{"<length>": accuracy}``."""
    was_training = model.training
    model.eval()
    device = device_of(model)
    out = {}
    try:
        for n in lengths:
            generator = torch.Generator().manual_seed(seed)
            correct = 0
            done = 0
            while done < samples:
                b = min(batch_size, samples - done)
                idx, target = (t.to(device) for t in task.batch(b, n, generator))
                correct += int((task.predict(last_logits(model, idx)) == target).sum())
                done += b
            out[str(n)] = correct / samples
    finally:
        model.train(was_training)
    return out


def run_needle(
    model: nn.Module,
    task: NeedleTask,
    *,
    train_length: int,
    eval_lengths: list[int],
    steps: int,
    batch_size: int = 32,
    lr: float = 3e-3,
    seed: int = 0,
    samples: int = 256,
) -> dict:
    """Train at ``train_length``, then measure accuracy at ``eval_lengths``.

    Returns ``{"train_length", "steps", "final_loss", "chance", "accuracy": {"<n>": acc}, "seconds"}``.
    """
    start = time.perf_counter()
    losses = train_needle(model, task, length=train_length, steps=steps, batch_size=batch_size, lr=lr, seed=seed)
    accuracy = needle_accuracy(model, task, eval_lengths, samples=samples, seed=seed + 1)
    tail = losses[-max(1, len(losses) // 10) :]
    return {
        "train_length": train_length,
        "steps": steps,
        "final_loss": sum(tail) / len(tail),
        "chance": 1.0 / task.num_values,
        "accuracy": accuracy,
        "seconds": round(time.perf_counter() - start, 2),
        "uniform_loss": math.log(task.num_values),
    }

