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
import gc
import importlib
import json
import math
import os
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .backends import BACKENDS
from .checks import check_choice
from .data import VOCAB_SIZE, load_corpus, sample_batch
from .files import folder_lock, has_entries, read_json, write_atomic, write_json
from .models import GPT, GPTConfig
from .nn import set_ssmax_enabled
from .normalizers import check_normalizer
from .positional import check_positional
from .presets import PRESETS
from .signals import DeferredSignals, Interrupted, signal_name

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


class NonFiniteError(RunError):
    """The loss or the gradients of a run became NaN or infinite; the run stopped at its last good checkpoint."""


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
    """The checkpoint of run ``out`` (on CPU), verified: the archive's CRC-32 of every record, the layout and
    types of the entries, finite weights. RunError naming the file if it is missing, corrupt or foreign."""
    path = Path(out) / "checkpoint.pt"
    if not path.is_file():
        raise RunError(f"no checkpoint at {path}")
    try:  # torch.load does not check the zip archive's checksums: a garbled record would load as garbage
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except Exception as err:  # BadZipFile, truncated files, I/O errors
        raise RunError(f"checkpoint {path} is corrupt or unreadable: {err}") from err
    if bad is not None:
        raise RunError(f"checkpoint {path} is corrupt: the checksum of its record {bad} does not match")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many kinds for truncated or foreign files
        raise RunError(f"checkpoint {path} is corrupt or unreadable: {err}") from err
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION or "model" not in state:
        raise RunError(f"checkpoint {path} is not a sasoftmax checkpoint (version {CHECKPOINT_VERSION})")
    try:
        check_config(state.get("config"))
    except (TypeError, ValueError) as err:
        raise RunError(f"checkpoint {path} holds an invalid config: {err}") from err
    problem = _checkpoint_problem(state)
    if problem:
        raise RunError(f"checkpoint {path} is corrupt: {problem}")
    return state


def _checkpoint_problem(state: dict) -> str | None:
    """What is wrong with the entries of a loaded checkpoint, or None."""
    step, summary, rng = state.get("step"), state.get("summary"), state.get("rng")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        return f"its step must be an int >= 0, found {step!r}"
    if not isinstance(summary, dict) or any(not isinstance(summary.get(k), (int, float)) for k in _SUMMARY_KEYS):
        return f"its summary must map {', '.join(_SUMMARY_KEYS)} to numbers"
    if not isinstance(rng, dict) or any(not isinstance(rng.get(k), Tensor) or rng[k].dtype != torch.uint8
                                        for k in ("torch", "data")):  # fmt: skip
        return "its rng must hold the 'torch' and 'data' generator states (uint8 tensors)"
    model, optimizer = state.get("model"), state.get("optimizer")
    if not isinstance(model, dict) or not all(isinstance(v, Tensor) for v in model.values()):
        return "its model must be a dict of tensors"
    if not isinstance(optimizer, dict) or not {"state", "param_groups"} <= set(optimizer):
        return "its optimizer state is missing"
    bad = [k for k, v in model.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        return f"its weights {bad[:3]} hold NaN or infinite values"
    return None


_SUMMARY_KEYS = ("step", "loss", "tokens", "elapsed")


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
    """Keep the lines of ``path`` whose "step" is < ``step`` (what a checkpoint at ``step`` covers); the file is
    rewritten only if a line goes."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] < step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line torn by a kill, or blank
    if kept != lines:
        write_atomic(path, lambda tmp: tmp.write_text("".join(line + "\n" for line in kept)))


def _prepare_run_dir(out: Path, config: dict, fingerprint: str, resume: bool) -> dict | None:
    """Check that ``out`` can host this run; returns the checkpoint to resume from, or None. Writes nothing."""
    if not resume:
        if out.exists() and (not out.is_dir() or has_entries(out)):
            raise RunError(f"run directory {out} already exists and is not empty: pass --resume to continue it")
        return None
    if out.exists() and not out.is_dir():
        raise RunError(f"run directory {out} is not a directory")
    saved_path = out / "config.json"
    if saved_path.exists():
        try:
            saved = dict(read_json(saved_path))
        except ValueError as err:
            raise RunError(str(err)) from err
        saved_fingerprint = saved.pop("data_fingerprint", None)
        differences = _config_differences(saved, config)
        if differences:
            raise RunError(f"cannot resume {out} with a different config: " + "; ".join(differences))
        if saved_fingerprint != fingerprint:
            raise RunError(f"cannot resume {out}: its data changed (fingerprint {saved_fingerprint} != {fingerprint})")
    elif out.exists() and has_entries(out):
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
        # torch.distributed.nn.functional binds `group=group.WORLD` as default arguments when it is first imported,
        # and DistributedDataParallel imports it: imported after the group exists, it would hold the group for the
        # rest of the process, so destroy_process_group could not stop gloo's worker threads. One of them can then
        # drop its last completed work (holding a tensor with a Python object) while the interpreter shuts down,
        # and the thread, denied the GIL, aborts the process ("terminate called without an active exception").
        # Imported first, its defaults are None (the default group, looked up when called).
        importlib.import_module("torch.distributed.nn.functional")

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
    if out.exists() and not out.is_dir():
        raise RunError(f"run directory {out} is not a directory")
    # One writer per run directory: rank 0 holds its lock for the whole run (a second train is refused).
    try:
        with folder_lock(out) if rank == 0 else contextlib.nullcontext():
            state = _prepare_run_dir(out, config, corpus.fingerprint, resume)
            if world > 1:
                dist.barrier()  # every rank has checked the directory before rank 0 writes to it
            if state is not None and state["step"] >= config["steps"]:
                summary = dict(state["summary"])
            else:
                summary = _train(config, out, corpus, state, rank, world, device, progress, step_hook, hook_every)
    except Interrupted:
        if created_group:
            _leave_group()  # every rank stops after the same step (see _agreed_signal)
        raise
    # Only on success or an agreed stop, once every rank is done with its collectives: tearing the group down
    # while another rank still communicates (or after one failed) can hang or abort gloo's worker threads. On
    # another error the process exits and torchrun stops the other ranks.
    if created_group:
        _leave_group()
    return summary


def _leave_group() -> None:
    """Destroy the default process group (created by :func:`_distributed`) and, with it, its worker threads.

    The group must really be freed here, not at interpreter exit: a gloo worker thread drops its reference to a
    finished collective (and to the tensors it holds) only after the caller has moved on, and a thread that does
    so while Python shuts down is refused the GIL and aborts the process ("terminate called without an active
    exception"). DistributedDataParallel sits in a reference cycle that holds the group through its reducer
    until the garbage collector runs, so it is collected first; destroy_process_group then drops the last
    reference, and the group's destructor joins the worker threads with the GIL released.
    """
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


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
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            sampler.set_state(state["rng"]["data"])
            torch.set_rng_state(state["rng"]["torch"])
        except (RuntimeError, ValueError, KeyError, TypeError) as err:
            raise RunError(f"checkpoint {out / 'checkpoint.pt'} does not match its config: {err}") from err
        if device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"], device)
        start, summary = state["step"], dict(state["summary"])
    files = _RunFiles(out, config, corpus.fingerprint, start, fresh=state is None) if writer else None
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
    want_hooks = writer and step_hook is not None and hook_every > 0
    bar = _Progress(progress and writer, start, steps, f"{config['normalizer']}/{config['pos']}")
    tokens_per_step = batch * accum * seq_len
    last_time, last_step, t0 = time.perf_counter(), start, time.perf_counter() - summary["elapsed"]

    def commit(done: int) -> None:
        nonlocal summary
        summary = {**summary, "step": done, "elapsed": time.perf_counter() - t0}
        files.commit(done, lambda: _save_checkpoint(out, model, optimizer, sampler, done, config, corpus.fingerprint,
                                                    summary, world))  # fmt: skip

    try:
        with DeferredSignals() as signals:
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
                if want_hooks and step % hook_every == 0:
                    _run_hook(step_hook, step, model, *micro[0], files)
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
                mean_loss = loss_sum / accum
                if world > 1:
                    dist.all_reduce(mean_loss)
                    mean_loss /= world
                # Before the update, so the weights (and any checkpoint of them) stay finite.
                loss_value, norm_value = mean_loss.item(), float(grad_norm)
                if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
                    kept = f"its last good checkpoint (step {files.committed}) is kept" if files and files.committed \
                        else "it had no checkpoint yet"  # fmt: skip
                    raise NonFiniteError(
                        f"run {out} diverged at step {step} (loss {loss_value}, gradient norm {norm_value}) and "
                        f"stopped; {kept} (try a lower --lr)"
                    )
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                done = step + 1
                record = None
                if step % config["log_every"] == 0 or done == steps:
                    now = time.perf_counter()
                    record = {
                        "step": step, "loss": loss_value, "lr": lr, "grad_norm": norm_value,
                        "tokens": done * tokens_per_step,
                        "tokens_per_s": (done - last_step) * tokens_per_step / max(now - last_time, 1e-9),
                        "elapsed": now - t0,
                    }  # fmt: skip
                    last_time, last_step = now, done
                    summary = {"step": done, "loss": loss_value, "tokens": record["tokens"], "elapsed": now - t0}
                    if files is not None:
                        files.add("metrics.jsonl", record)
                bar.update(step, record)
                stop = _agreed_signal(signals.received, world, device)
                if writer and (done % config["checkpoint_every"] == 0 or done == steps or stop):
                    commit(done)
                if stop:
                    where = f"; checkpoint at step {done} saved in {out}, continue with --resume" if writer else ""
                    raise Interrupted(stop, f"interrupted by {signal_name(stop)} at step {done}{where}")
    except Exception as err:
        if files is not None and not isinstance(err, Interrupted):
            files.roll_back()
        raise
    finally:
        bar.close()
        if files is not None:
            files.close()
        # An exception's traceback keeps this frame's locals: without DDP, its reducer (and the process group it
        # holds) can be freed when train() leaves the group after an agreed stop (see _leave_group).
        ddp = net = None
    return summary


def _agreed_signal(received: int | None, world: int, device: torch.device) -> int:
    """The stop signal received by any rank (0 if none), so that every rank stops after the same step."""
    if world == 1:
        return received or 0
    flag = torch.tensor(received or 0, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag)


class _RunFiles:
    """What rank 0 writes in a run directory, committed together with each checkpoint.

    ``metrics.jsonl`` and ``hooks.jsonl`` get their lines as steps are made (so they can be followed); a
    checkpoint at step s covers the lines of steps < s, and lines past the checkpoint (left by a kill) are cut
    when the run resumes. ``config.json`` is written when a fresh run starts and, on resume, with the first
    checkpoint (when "steps" changed). :meth:`roll_back` (on an error) cuts the lines back to the last checkpoint
    and removes the files that this command created if it committed nothing, so a failed command leaves the
    directory as it was.
    """

    def __init__(self, out: Path, config: dict, fingerprint: str, start: int, fresh: bool) -> None:
        self.out, self.committed, self.fresh = out, start, fresh
        self.config = {**config, "data_fingerprint": fingerprint}
        self.existed = {name: (out / name).exists() for name in ("config.json", "metrics.jsonl", "hooks.jsonl")}
        self.handles: dict[str, object] = {}
        self.commits = 0
        for name in ("metrics.jsonl", "hooks.jsonl"):
            _truncate_jsonl(out / name, start)  # lines past the checkpoint, left by a kill
        if fresh:
            write_json(out / "config.json", self.config)

    def add(self, name: str, record: dict) -> None:
        """Append ``record`` to ``name`` as a strict JSON line: metrics are finite (the loop stops the run
        otherwise), and a NaN or infinity a step hook returns is written as null."""
        line = json.dumps(_finite_or_none(record), allow_nan=False) + "\n"
        if name not in self.handles:
            self.handles[name] = open(self.out / name, "a")
        self.handles[name].write(line)

    def commit(self, step: int, save_checkpoint: Callable[[], None]) -> None:
        if not self.fresh and self.commits == 0:
            saved = read_json(self.out / "config.json") if self.existed["config.json"] else None
            if saved != self.config:
                write_json(self.out / "config.json", self.config)
        for handle in self.handles.values():
            handle.flush()
            os.fsync(handle.fileno())
        save_checkpoint()
        self.committed, self.commits = step, self.commits + 1

    def roll_back(self) -> None:
        self.close()
        for name, existed in self.existed.items():
            path = self.out / name
            if not existed and self.commits == 0:
                path.unlink(missing_ok=True)
            elif name != "config.json":
                _truncate_jsonl(path, self.committed)

    def close(self) -> None:
        for handle in self.handles.values():
            handle.close()
        self.handles.clear()


def _finite_or_none(value):
    """``value`` with every non-finite float (in nested dicts and lists) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def _run_hook(step_hook: StepHook, step: int, model: GPT, x: Tensor, y: Tensor, files: _RunFiles) -> None:
    was_training = model.training
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        result = step_hook(step, model, x, y)
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    if result is not None:
        files.add("hooks.jsonl", {"step": step, **result})


def _save_checkpoint(out, model, optimizer, sampler, step, config, fingerprint, summary, world) -> None:
    """Write the checkpoint atomically; never one whose weights are not finite (RunError)."""
    device = next(model.parameters()).device
    bad = [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        raise NonFiniteError(f"run {out}: weights {bad[:3]} became NaN or infinite at step {step}; the checkpoint "
                             "was not replaced")  # fmt: skip
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
