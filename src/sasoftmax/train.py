"""The trainer: configs, a resumable training loop (single process or DDP with torchrun) and checkpoints.

A run directory holds ``config.json`` (the run config plus the data fingerprint), ``metrics.jsonl``
(one line per logged step), ``checkpoint.pt`` (written atomically every ``checkpoint_every`` steps
and at the end) and, when a step hook is given, ``hooks.jsonl``. Step numbers are 0-based: the line of
step s describes the update made by step s; a checkpoint at step s covers steps 0 .. s − 1.

Exact resumption: the checkpoint holds the model, the optimizer, the step, the torch RNG state and the
data sampler's generator, and the learning rate is a function of the step only, so on CPU a resumed run
produces bit-identical weights to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .backends import BACKENDS
from .checks import check_choice
from .data import VOCAB_SIZE, load_corpus, sample_batch
from .files import write_atomic, write_json
from .models import GPT, GPTConfig
from .nn import set_ssmax_enabled
from .normalizers import check_normalizer
from .positional import check_positional
from .presets import PRESETS

CHECKPOINT_VERSION = 1
ATTENTION_DEFAULTS: dict = {
    "normalizer": "sa_norm", "ssmax": None, "ssmax_from": None, "pos": "rope", "seed": 0, "data": None,
    "backend": "auto",
}
"""Keys every preset leaves to the caller, with their defaults. ``ssmax_from`` (with ``ssmax``): the step at
which SSMax turns on; the steps before it train with plain softmax logits (None: SSMax from the start)."""

_POSITIVE_INTS = (
    "n_layer", "n_embd", "n_head", "mlp_ratio", "pos_width", "seq_len", "batch_size", "grad_accum", "steps",
    "log_every", "checkpoint_every", "eval_tokens",
)
_NON_NEGATIVE_FLOATS = ("min_lr", "weight_decay", "grad_clip")
RESUMABLE_KEYS = ("steps", "decay_steps")
"""Keys that may change when a run is resumed (to extend it), as long as the schedule stays the same."""

StepHook = Callable[[int, GPT, Tensor, Tensor], "dict | None"]


class RunError(ValueError):
    """A run directory cannot be used as asked (exists, differs, corrupt, missing)."""


def make_config(preset: str, **overrides) -> dict:
    """The full run config of ``preset`` with ``overrides`` applied; JSON-serialisable.

    Keys: "preset", the attention choices ("normalizer", "ssmax" (None or the initial SSMax s), "ssmax_from"
    (None, or the step at which SSMax turns on after training with softmax), "pos"),
    "seed", "data" (None = the standard library corpus), "backend", and the preset's sizes and budget
    (see :mod:`sasoftmax.presets`). Unknown keys or bad values raise ValueError/TypeError.
    When "steps" is overridden and "decay_steps" is not, the schedule follows the new "steps".
    """
    check_choice("preset", preset, PRESETS)
    unknown = set(overrides) - set(PRESETS[preset]) - set(ATTENTION_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown config keys {sorted(unknown)}; known: {sorted(config_keys())}")
    config = {"preset": preset, **ATTENTION_DEFAULTS, **PRESETS[preset], **overrides}
    config["eval_lengths"] = list(config["eval_lengths"])
    return check_config(config)


def config_keys() -> set[str]:
    return {"preset", *ATTENTION_DEFAULTS, *PRESETS["smoke"]}


def check_config(config: dict) -> dict:
    """Validate a full run config (e.g. one read from disk); returns it, or raises ValueError/TypeError."""
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict; got {type(config).__name__}")
    missing, unknown = config_keys() - set(config), set(config) - config_keys()
    if missing or unknown:
        raise ValueError(f"config has missing keys {sorted(missing)} / unknown keys {sorted(unknown)}")
    check_choice("preset", config["preset"], PRESETS)
    check_normalizer(config["normalizer"])
    check_positional(config["pos"])
    for key in _POSITIVE_INTS:
        _check_int(key, config[key], 1)
    _check_int("seed", config["seed"], 0)
    _check_int("warmup", config["warmup"], 0)
    for key in ("n_kv_head", "decay_steps"):
        if config[key] is not None:
            _check_int(key, config[key], 1)
    for key in _NON_NEGATIVE_FLOATS:
        _check_float(key, config[key], 0.0)
    _check_float("lr", config["lr"], 0.0)
    if not config["lr"] > 0:
        raise ValueError(f"lr must be > 0; got {config['lr']}")
    ssmax = config["ssmax"]
    if ssmax is not None and (isinstance(ssmax, bool) or not isinstance(ssmax, (int, float))):
        raise TypeError(f"ssmax must be None or a finite float > 0 (the initial SSMax s); got {ssmax!r}")
    if ssmax is not None and not 0 < ssmax < math.inf:
        raise ValueError(f"ssmax must be None or a finite float > 0 (the initial SSMax s); got {ssmax}")
    if config["ssmax_from"] is not None:
        _check_int("ssmax_from", config["ssmax_from"], 0)
        if ssmax is None:
            raise ValueError("ssmax_from needs ssmax (the initial s of the SSMax that turns on at that step)")
    _check_float("dropout", config["dropout"], 0.0)
    if not config["dropout"] < 1:
        raise ValueError(f"dropout must be in [0, 1); got {config['dropout']}")
    check_lengths(config["eval_lengths"], "eval_lengths")
    if config["data"] is not None and not isinstance(config["data"], str):
        raise TypeError(f"data must be None, a path or 'hf:NAME[:CONFIG]'; got {type(config['data']).__name__}")
    check_choice("backend", config["backend"], ("auto",) + BACKENDS)
    model_config(config)  # size combinations (e.g. n_embd % n_head)
    return config


def check_lengths(lengths: object, name: str = "lengths") -> list[int]:
    """Return ``lengths`` as a list if it is a non-empty list of distinct ints >= 1, else raise."""
    if not isinstance(lengths, (list, tuple)) or not lengths:
        raise ValueError(f"{name} must be a non-empty list of positive ints; got {lengths!r}")
    for length in lengths:
        _check_int(name, length, 1)
    if len(set(lengths)) != len(lengths):
        raise ValueError(f"{name} must not repeat; got {list(lengths)}")
    return list(lengths)


def _check_int(key: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{key} must be an int >= {low}; got {value!r}")
    if value < low:
        raise ValueError(f"{key} must be an int >= {low}; got {value}")


def _check_float(key: str, value: object, low: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{key} must be a float >= {low}; got {value!r}")
    if not (low <= value < math.inf):
        raise ValueError(f"{key} must be a finite float >= {low}; got {value}")


def model_config(config: dict) -> GPTConfig:
    """The :class:`GPTConfig` of a run config."""
    return GPTConfig(
        vocab_size=VOCAB_SIZE, block_size=config["seq_len"], n_layer=config["n_layer"], n_embd=config["n_embd"],
        n_head=config["n_head"], n_kv_head=config["n_kv_head"], mlp_ratio=config["mlp_ratio"],
        dropout=float(config["dropout"]), normalizer=config["normalizer"],
        ssmax=None if config["ssmax"] is None else float(config["ssmax"]), pos=config["pos"],
        pos_width=config["pos_width"], backend=config["backend"],
    )


def learning_rate(step: int, config: dict) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay to ``min_lr`` at ``decay_steps``, then flat."""
    lr, min_lr, warmup = config["lr"], config["min_lr"], config["warmup"]
    horizon = config["decay_steps"] or config["steps"]
    if step < warmup:
        return lr * (step + 1) / warmup
    if step >= horizon:
        return min_lr
    progress = (step - warmup) / max(1, horizon - warmup)
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (lr - min_lr)


def make_optimizer(model: nn.Module, config: dict) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms, biases, or per-head scalars)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config["lr"], betas=(0.9, 0.95), eps=1e-8)


# ----------------------------------------------------------------------------------------- run files


def read_checkpoint(out: str | Path) -> dict:
    """The checkpoint of run ``out`` (on CPU); RunError if it is missing or unreadable."""
    path = Path(out) / "checkpoint.pt"
    if not path.is_file():
        raise RunError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many kinds for truncated or foreign files
        raise RunError(f"checkpoint {path} is corrupt or unreadable: {err}") from err
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION or "model" not in state:
        raise RunError(f"checkpoint {path} is not a sasoftmax checkpoint (version {CHECKPOINT_VERSION})")
    try:
        check_config(state["config"])
    except (TypeError, ValueError) as err:
        raise RunError(f"checkpoint {path} holds an invalid config: {err}") from err
    return state


def load_model(out: str | Path) -> tuple[GPT, dict]:
    """The trained model of run ``out`` (eval mode, CPU) and its config."""
    state = read_checkpoint(out)
    model = GPT(model_config(state["config"]))
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise RunError(f"checkpoint in {out} does not match its config: {err}") from err
    _switch_ssmax(model, state["config"], state["step"] - 1)  # as the last update it holds was made
    return model.eval(), dict(state["config"])


def _switch_ssmax(model: nn.Module, config: dict, step: int) -> None:
    """SSMax on or off as ``config["ssmax_from"]`` says for the update of ``step`` (a no-op without it)."""
    if config["ssmax_from"] is not None:
        set_ssmax_enabled(model, step >= config["ssmax_from"])


def _config_differences(saved: dict, config: dict) -> list[str]:
    keys = (set(saved) | set(config)) - set(RESUMABLE_KEYS)
    found = [
        f"{k}: run has {saved.get(k)!r}, asked {config.get(k)!r}" for k in sorted(keys) if saved.get(k) != config.get(k)
    ]
    horizons = [c.get("decay_steps") or c.get("steps") for c in (saved, config)]
    if horizons[0] != horizons[1]:
        # "steps" may change on resume, but not the learning-rate schedule it sets when decay_steps is None.
        found.append(f"learning-rate schedule: run decays over {horizons[0]} steps, asked {horizons[1]} "
                     "(set decay_steps to extend a run on its schedule)")
    return found


def _truncate_jsonl(path: Path, step: int) -> None:
    """Keep the lines of ``path`` whose "step" is < ``step`` (what a checkpoint at ``step`` covers)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] < step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line torn by a kill, or blank
    write_atomic(path, lambda tmp: tmp.write_text("".join(line + "\n" for line in kept)))


def _prepare_run_dir(out: Path, config: dict, fingerprint: str, resume: bool) -> dict | None:
    """Check that ``out`` can host this run; returns the checkpoint to resume from, or None. Writes nothing."""
    if not resume:
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise RunError(f"run directory {out} already exists and is not empty: pass --resume to continue it")
        return None
    if out.exists() and not out.is_dir():
        raise RunError(f"run directory {out} is not a directory")
    saved_path = out / "config.json"
    if saved_path.exists():
        try:
            saved = json.loads(saved_path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise RunError(f"{saved_path} is corrupt: {err}") from err
        saved_fingerprint = saved.pop("data_fingerprint", None)
        differences = _config_differences(saved, config)
        if differences:
            raise RunError(f"cannot resume {out} with a different config: " + "; ".join(differences))
        if saved_fingerprint != fingerprint:
            raise RunError(f"cannot resume {out}: its data changed (fingerprint {saved_fingerprint} != {fingerprint})")
    elif out.exists() and any(out.iterdir()):
        raise RunError(f"{out} is not a run directory (no config.json) and is not empty")
    if not (out / "checkpoint.pt").exists():
        return None
    state = read_checkpoint(out)
    differences = _config_differences(state["config"], config)
    if differences:
        raise RunError(f"cannot resume {out}: its checkpoint has a different config: " + "; ".join(differences))
    return state


# ------------------------------------------------------------------------------------------ training


def _distributed() -> tuple[int, int, torch.device, bool]:
    """(rank, world size, device, whether we initialised the process group) from torchrun's environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
        created = True
    else:
        created = False
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return rank, world, device, created


class _Progress:
    """A tqdm bar when tqdm is installed, else a plain line per logged step (on stderr)."""

    def __init__(self, enabled: bool, start: int, total: int, desc: str) -> None:
        self.bar = None
        self.enabled = enabled
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                print(f"{desc}: training steps {start}..{total}", file=sys.stderr)
            else:
                self.bar = tqdm(total=total, initial=start, desc=desc, unit="step", dynamic_ncols=True)

    def update(self, step: int, record: dict | None) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if record is not None:
                self.bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
        elif self.enabled and record is not None:
            print(f"step {step}: loss {record['loss']:.4f} lr {record['lr']:.2e} "
                  f"{record['tokens_per_s']:.0f} tokens/s", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def train(
    config: dict,
    out: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    step_hook: StepHook | None = None,
    hook_every: int = 0,
) -> dict:
    """Train the run ``config`` into directory ``out``; returns {"step", "loss", "tokens", "elapsed"}.

    ``resume=True`` continues from ``out/checkpoint.pt``: the config must match except for "steps" and
    "decay_steps", as long as the learning-rate schedule stays the same (so a run can be extended); the
    run returns at once if it already finished, and starts afresh if there is no checkpoint yet. Without it, an
    existing non-empty ``out`` raises :class:`RunError`. Under ``torchrun`` (WORLD_SIZE > 1) each of the
    ``batch_size`` sequences of a micro-batch goes to one rank (DDP); rank 0 writes the files.

    ``step_hook(step, model, inputs, targets)`` runs when ``hook_every > 0`` at step 0 and every
    ``hook_every`` steps, before that step's update, with its first micro-batch (this rank's share), in
    a forked RNG so it cannot change the training; grads are zeroed after it. Non-None results are
    written with "step" to ``out/hooks.jsonl`` (rank 0 calls the hook).
    """
    config = check_config(dict(config))
    _check_int("hook_every", hook_every, 0)
    out = Path(out)
    corpus = load_corpus(config["data"])
    if corpus.train.numel() <= config["seq_len"]:
        raise ValueError(
            f"the training split of {corpus.description} has {corpus.train.numel()} tokens; "
            f"seq_len {config['seq_len']} needs more"
        )
    rank, world, device, created_group = _distributed()
    state = _prepare_run_dir(out, config, corpus.fingerprint, resume)
    if world > 1:
        dist.barrier()  # every rank has checked the directory before rank 0 writes to it
    if state is not None and state["step"] >= config["steps"]:
        summary = dict(state["summary"])
    else:
        summary = _train(config, out, corpus, state, rank, world, device, progress, step_hook, hook_every)
    # Only on success, once every rank is done with its collectives: tearing the group down while another rank
    # still communicates (or after one failed) can hang or abort gloo's worker threads. On an error the process
    # exits and torchrun stops the other ranks.
    if created_group:
        dist.barrier()
        dist.destroy_process_group()
    return summary


def _train(config, out, corpus, state, rank, world, device, progress, step_hook, hook_every) -> dict:
    batch, accum, seq_len, steps = config["batch_size"], config["grad_accum"], config["seq_len"], config["steps"]
    if batch % world:
        raise RunError(f"batch_size {batch} must be a multiple of the number of processes {world}")
    per_rank = batch // world
    writer = rank == 0
    torch.manual_seed(config["seed"])
    model = GPT(model_config(config)).to(device)
    optimizer = make_optimizer(model, config)
    sampler = torch.Generator().manual_seed(config["seed"])
    start = 0
    summary = {"step": 0, "loss": math.nan, "tokens": 0, "elapsed": 0.0}
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        sampler.set_state(state["rng"]["data"])
        torch.set_rng_state(state["rng"]["torch"])
        if device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"], device)
        start, summary = state["step"], dict(state["summary"])
    if writer:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", {**config, "data_fingerprint": corpus.fingerprint})
        for name in ("metrics.jsonl", "hooks.jsonl"):
            _truncate_jsonl(out / name, start)
    ddp = None
    if world > 1:
        device_ids = [device.index] if device.type == "cuda" else None
        # A run that switches to SSMax leaves s without gradient before the switch.
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=device_ids, find_unused_parameters=config["ssmax_from"] is not None
        )
    net = ddp or model
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    )
    params = list(model.parameters())
    # Only rank 0 writes; both files are closed in the finally below.
    metrics = open(out / "metrics.jsonl", "a") if writer else None
    hooks = open(out / "hooks.jsonl", "a") if writer and step_hook is not None and hook_every > 0 else None
    bar = _Progress(progress and writer, start, steps, f"{config['normalizer']}/{config['pos']}")
    tokens_per_step = batch * accum * seq_len
    last_time, last_step, t0 = time.perf_counter(), start, time.perf_counter() - summary["elapsed"]
    try:
        model.train()
        for step in range(start, steps):
            _switch_ssmax(model, config, step)
            lr = learning_rate(step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            micro = []
            for _ in range(accum):
                x, y = sample_batch(corpus.train, batch, seq_len, sampler)
                rows = slice(rank * per_rank, (rank + 1) * per_rank)
                micro.append((x[rows].to(device), y[rows].to(device)))
            if hooks is not None and step % hook_every == 0:
                _run_hook(step_hook, step, model, *micro[0], hooks)
            loss_sum = torch.zeros((), device=device)
            for i, (x, y) in enumerate(micro):
                sync = ddp.no_sync() if ddp is not None and i < accum - 1 else contextlib.nullcontext()
                with sync:
                    with autocast:
                        _, loss = net(x, y)
                    (loss / accum).backward()
                loss_sum += loss.detach()
            clip = config["grad_clip"] if config["grad_clip"] > 0 else math.inf
            grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            mean_loss = loss_sum / accum
            if world > 1:
                dist.all_reduce(mean_loss)
                mean_loss /= world
            done = step + 1
            record = None
            if step % config["log_every"] == 0 or done == steps:
                now = time.perf_counter()
                record = {
                    "step": step, "loss": mean_loss.item(), "lr": lr, "grad_norm": float(grad_norm),
                    "tokens": done * tokens_per_step,
                    "tokens_per_s": (done - last_step) * tokens_per_step / max(now - last_time, 1e-9),
                    "elapsed": now - t0,
                }
                last_time, last_step = now, done
                summary = {"step": done, "loss": record["loss"], "tokens": record["tokens"], "elapsed": now - t0}
                if metrics is not None:
                    metrics.write(json.dumps(record) + "\n")
            bar.update(step, record)
            if writer and (done % config["checkpoint_every"] == 0 or done == steps):
                summary = {**summary, "step": done, "elapsed": time.perf_counter() - t0}
                metrics.flush()
                if hooks is not None:
                    hooks.flush()
                _save_checkpoint(out, model, optimizer, sampler, done, config, corpus.fingerprint, summary, world)
    finally:
        bar.close()
        for f in (metrics, hooks):
            if f is not None:
                f.close()
    return summary


def _run_hook(step_hook: StepHook, step: int, model: GPT, x: Tensor, y: Tensor, hooks) -> None:
    was_training = model.training
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        result = step_hook(step, model, x, y)
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    if result is not None:
        hooks.write(json.dumps({"step": step, **result}) + "\n")


def _save_checkpoint(out, model, optimizer, sampler, step, config, fingerprint, summary, world) -> None:
    device = next(model.parameters()).device
    state = {
        "version": CHECKPOINT_VERSION,
        "world_size": world,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": step,
        "config": config,
        "data_fingerprint": fingerprint,
        "summary": summary,
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "data": sampler.get_state(),
        },
    }
    write_atomic(out / "checkpoint.pt", lambda tmp: torch.save(state, tmp))
