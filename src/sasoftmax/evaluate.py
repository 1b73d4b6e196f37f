"""Evaluation: validation perplexity of a trained run at several lengths (length extrapolation).

At each length T the validation split is cut into consecutive non-overlapping windows of T + 1 tokens
(up to ``max_tokens`` predicted tokens, default the run's ``eval_tokens``); the loss is the mean
next-token cross-entropy over every position of every window, and ppl = exp(loss).

Memory: windows are batched so that a batch holds at most ``TOKENS_PER_BATCH`` tokens, and — when the
attention materialises the score map (DAPE encodings, or an eager backend) — at most
``SCORES_PER_BATCH`` scores. Encodings that are functions of positions run on the fastest backend
(``auto``), which on CPU tiles the scores and never holds an (H, T, T) tensor.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .data import load_corpus
from .files import folder_lock, read_json, write_json
from .train import RunError, check_lengths, load_model

TOKENS_PER_BATCH = 16384
SCORES_PER_BATCH = 1 << 26


def parse_lengths(text: str) -> list[int]:
    """"128,256,512" -> [128, 256, 512]; raises ValueError naming what is wrong."""
    parts = [p.strip() for p in text.split(",")]
    if not text.strip() or any(not p for p in parts):
        raise ValueError(f"lengths must be comma-separated positive ints, e.g. 128,256; got {text!r}")
    try:
        lengths = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"lengths must be comma-separated positive ints, e.g. 128,256; got {text!r}") from None
    return check_lengths(lengths)


@torch.no_grad()
def evaluate(out: str | Path, lengths: list[int], *, max_tokens: int | None = None) -> dict[str, dict[str, float]]:
    """``{"<length>": {"loss", "ppl", "tokens"}}`` of run ``out`` on its validation split; also written
    to ``out/eval.json`` (only after every length succeeded: nothing is overwritten on error). Holds the run
    directory's lock while it runs (:func:`~sasoftmax.files.folder_lock`): a run being trained is refused."""
    lengths = check_lengths(lengths)
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise ValueError(f"max_tokens must be a positive int or None; got {max_tokens!r}")
    out = Path(out)
    if not out.is_dir():
        raise RunError(f"no checkpoint at {out / 'checkpoint.pt'}")
    with folder_lock(out, create=False):  # eval.json has one writer, and no run trains here meanwhile
        return _evaluate(out, lengths, max_tokens)


def _evaluate(out: Path, lengths: list[int], max_tokens: int | None) -> dict[str, dict[str, float]]:
    model, config = load_model(out)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    corpus = load_corpus(config["data"])
    saved = read_json(out / "config.json") if (out / "config.json").exists() else {}
    if saved.get("data_fingerprint", corpus.fingerprint) != corpus.fingerprint:
        raise RunError(f"the data of run {out} changed since training (fingerprint differs)")
    budget = max_tokens or config["eval_tokens"]
    val = corpus.val
    materialises = model.score_dependent or config["backend"] == "eager"
    results = {}
    for length in lengths:
        windows = min(max(1, budget // length), (val.numel() - 1) // length)
        if windows < 1:
            raise ValueError(f"the validation split has {val.numel()} tokens, too few for length {length}")
        per_batch = max(1, TOKENS_PER_BATCH // length)
        if materialises:
            per_batch = max(1, min(per_batch, SCORES_PER_BATCH // (config["n_head"] * length * length)))
        total = 0.0
        for first in range(0, windows, per_batch):
            starts = range(first * length, min(windows, first + per_batch) * length, length)
            chunk = torch.stack([val[s : s + length + 1] for s in starts]).long().to(device)
            _, loss = model(chunk[:, :-1], chunk[:, 1:])
            total += loss.item() * chunk.shape[0]
        loss = total / windows
        results[str(length)] = {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "tokens": windows * length}
    write_json(out / "eval.json", results)
    return results


def format_table(results: dict[str, dict[str, float]]) -> str:
    """A plain-text table of :func:`evaluate`'s results."""
    lines = [f"{'length':>8}  {'loss':>8}  {'ppl':>10}  {'tokens':>8}"]
    for length, row in results.items():
        lines.append(f"{length:>8}  {row['loss']:>8.4f}  {row['ppl']:>10.3f}  {row['tokens']:>8}")
    return "\n".join(lines)
