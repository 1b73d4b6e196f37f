"""``sasoftmax compare``: train matched models that differ only in the attention normalizer, measure what
the SA-Softmax and SSMax papers claim, and write ``results.json``, ``report.md`` and plots.

The grid is variants × positional encodings × seeds, every run with the same preset (sizes, data,
budget) and, per seed, the same initialisation seed and data order. Variants:

====================  ==============  ==================================
variant               normalizer      SSMax
====================  ==============  ==================================
``softmax``           softmax         off (the baseline)
``sa_norm``           sa_norm         off (SA-Softmax, normalised form)
``sa``                sa              off (raw SA-Softmax, x·softmax(x))
``ssmax``             softmax         on (learnable s, init ``--ssmax-init``)
``ssmax_sa_norm``     sa_norm         on
``softmax_to_ssmax``  softmax         off for the first half of the steps, then on with
                                      s = 1/ln(L) (so it starts as the softmax it continues)
====================  ==============  ==================================

Per run: training with the gradient-flow hook (:mod:`sasoftmax.analysis.gradient_flow`), evaluation at
L, 2L, 4L, 8L (L the training length), and attention fade (:mod:`sasoftmax.analysis.fade`). Per variant
(but the switching one) and seed: the needle retrieval task (:mod:`sasoftmax.analysis.retrieval`).

Runs go to the GPU when there is one. ``jobs`` > 1 runs several grid runs at once in worker processes,
which share the one GPU (or the CPU cores). Under ``torchrun`` every process trains each run together
(DDP, one GPU each); rank 0 evaluates and writes, and the needle models are spread over the ranks.

Layout of DIR: ``compare.json`` (the settings; a rerun must match them), ``runs/<pos>-<variant>-s<seed>/``
(a training run directory plus ``analysis.json``, written when the run is complete),
``retrieval/<variant>-s<seed>.json``,
``results.json``, ``report.md`` and ``plots/*.png``. Rerunning the same command resumes: complete runs
are reused, unfinished ones continue from their checkpoints.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import signal
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from datetime import datetime, timedelta, timezone
from pathlib import Path

import torch
import torch.distributed as dist

from .. import report
from ..analysis.fade import attention_fade
from ..analysis.gradient_flow import DEFAULT_THRESHOLD, GradientFlowHook, read_hooks, summarize
from ..analysis.retrieval import NeedleTask, run_needle
from ..checks import check_choice
from ..data import load_corpus
from ..evaluate import evaluate
from ..files import folder_lock, has_entries, is_leftover, read_json, write_json
from ..machine import cpu_name, git_commit
from ..models import GPT, GPTConfig
from ..nn import SSMAX_PAPER_INIT
from ..positional import POSITIONAL
from ..signals import Interrupted, raising_signals, signal_name, watch_parent
from ..train import RunError, load_model, make_config, train

VARIANTS: dict[str, tuple[str, bool]] = {
    "softmax": ("softmax", False),
    "sa_norm": ("sa_norm", False),
    "sa": ("sa", False),
    "ssmax": ("softmax", True),
    "ssmax_sa_norm": ("sa_norm", True),
    "softmax_to_ssmax": ("softmax", True),
}
"""variant -> (normalizer, SSMax on)."""

SWITCHED = ("softmax_to_ssmax",)
"""Variants that train with softmax for the first half of the steps (``settings["switch_step"]``), then with SSMax
initialised to s = 1/ln(L) (L the training length): at L the logits are unchanged at the switch (the SSMax
paper's claim that switching during or after pretraining brings part of its length generalisation)."""

NEEDLE_VARIANTS = ("softmax", "sa_norm", "sa", "ssmax", "ssmax_sa_norm")
"""Variants that also train a needle-retrieval model (the switching variant has no needle model)."""

# What each preset runs besides the harness preset itself. Eval lengths are multiples of the training
# length; fade lengths too (fractions below 1 included, to see the trend from short contexts).
# Every preset trains 3 seeds: the report's intervals and verdicts need at least 2, and 3 keep a t-interval
# usable (its quantile is 4.30 at 2 degrees of freedom against 12.7 at 1).
SETTINGS: dict[str, dict] = {
    "smoke": {
        "pos": ["rope", "kerple"], "seeds": [0, 1, 2], "eval_multiples": [1, 2, 4, 8], "eval_tokens": 1024,
        "hook_points": 4,
        "fade_multiples": [0.5, 1, 2, 4, 8], "fade_samples": 2,
        "retrieval": {"n_layer": 1, "n_embd": 32, "n_head": 2, "train_length": 16, "eval_multiples": [1, 2, 4],
                      "steps": 30, "batch_size": 16, "lr": 3e-3, "samples": 32},
    },
    "quick": {
        "pos": ["rope", "kerple"], "seeds": [0, 1, 2], "eval_multiples": [1, 2, 4, 8], "eval_tokens": 16384,
        "hook_points": 10,
        "fade_multiples": [0.125, 0.25, 0.5, 1, 2, 4, 8], "fade_samples": 8,
        "retrieval": {"n_layer": 1, "n_embd": 32, "n_head": 2, "train_length": 32, "eval_multiples": [1, 2, 4, 8],
                      "steps": 400, "batch_size": 32, "lr": 3e-3, "samples": 256},
    },
    "gpu": {
        "pos": list(POSITIONAL), "seeds": [0, 1, 2], "eval_multiples": [1, 2, 4, 8], "eval_tokens": 131072,
        "hook_points": 20, "hook_rows": 4,
        # Fade stops at 4L: eager.record() holds every layer's (H, n, n) map of a window at once, and several
        # runs share the GPU's memory.
        "fade_multiples": [0.125, 0.25, 0.5, 1, 2, 4], "fade_samples": 16,
        "retrieval": {"n_layer": 2, "n_embd": 128, "n_head": 4, "train_length": 128, "eval_multiples": [1, 2, 4, 8],
                      "steps": 2000, "batch_size": 64, "lr": 1e-3, "samples": 1024},
    },
    "paper": {
        "pos": ["rope", "kerple", "dapev2_kerple"], "seeds": [0, 1, 2], "eval_multiples": [1, 2, 4, 8],
        "eval_tokens": 1048576, "hook_points": 50, "hook_rows": 4,
        # Fade stops at 2L here: eager.record() holds every layer's (H, n, n) map of a window at once.
        "fade_multiples": [0.125, 0.25, 0.5, 1, 2], "fade_samples": 32,
        "retrieval": {"n_layer": 2, "n_embd": 128, "n_head": 4, "train_length": 128, "eval_multiples": [1, 2, 4, 8],
                      "steps": 3000, "batch_size": 64, "lr": 1e-3, "samples": 1024},
    },
}


# How a preset uses the machine (not part of the results: it changes speed, not what is computed).
# Small models on a CPU run far faster single-threaded (several threads mostly wait on each other,
# and collapse when other processes compete for the cores); quick runs two tasks at once instead.
# The gpu preset's runs are too small to fill an H100 alone: six share it (each with its own CUDA context).
RESOURCES: dict[str, dict] = {
    "smoke": {"jobs": 1, "threads": 1},
    "quick": {"jobs": 2, "threads": 1},
    "gpu": {"jobs": 6, "threads": 2},
    "paper": {"jobs": 1, "threads": None},
}


def parse_list(text: str, allowed: tuple[str, ...] | list[str], what: str) -> list[str]:
    """"a,b" -> ["a", "b"], each checked against ``allowed``; ValueError naming ``what`` otherwise."""
    items = [part.strip() for part in text.split(",")]
    if not text.strip() or any(not item for item in items):
        raise ValueError(f"{what} must be a comma-separated list of {', '.join(allowed)}; got {text!r}")
    bad = [item for item in items if item not in allowed]
    if bad:
        raise ValueError(f"unknown {what} {bad}; choose from {', '.join(allowed)}")
    if len(set(items)) != len(items):
        raise ValueError(f"{what} must not repeat; got {text!r}")
    return items


def parse_seeds(text: str) -> list[int]:
    """"0,1" -> [0, 1]; ValueError naming --seeds otherwise."""
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"--seeds must be comma-separated ints >= 0, e.g. 0,1; got {text!r}") from None
    if any(seed < 0 for seed in seeds):
        raise ValueError(f"--seeds must be ints >= 0; got {text!r}")
    return seeds


def plan(
    preset: str,
    *,
    pos: list[str] | None = None,
    variants: list[str] | None = None,
    seeds: list[int] | None = None,
    steps: int | None = None,
    data: str | None = None,
    ssmax_init: float = SSMAX_PAPER_INIT,
    retrieval: bool = True,
) -> dict:
    """The full, JSON-serialisable settings of a comparison (what ``compare.json`` records)."""
    check_choice("preset", preset, SETTINGS)
    settings = json.loads(json.dumps(SETTINGS[preset]))
    pos = list(settings["pos"] if pos is None else pos)
    variants = list(VARIANTS if variants is None else variants)
    for name in pos:
        if name not in POSITIONAL:
            raise ValueError(f"unknown positional encoding {name!r}; choose from {', '.join(POSITIONAL)}")
    for name in variants:
        if name not in VARIANTS:
            raise ValueError(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
    if isinstance(ssmax_init, bool) or not isinstance(ssmax_init, (int, float)) or not 0 < ssmax_init < float("inf"):
        raise ValueError(
            f"ssmax_init (--ssmax-init) must be a finite float > 0 (the initial SSMax s); got {ssmax_init!r}"
        )
    seeds = list(settings["seeds"] if seeds is None else seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be a non-empty list of distinct ints >= 0; got {seeds!r}")
    overrides = {"data": data}
    if steps is not None:
        overrides["steps"] = steps
    for seed in seeds:
        base = make_config(preset, seed=seed, **overrides)  # validates seeds, steps, data
    length = base["seq_len"]
    settings.update(
        preset=preset, pos=pos, variants=variants, seeds=seeds, steps=base["steps"], data=data,
        ssmax_init=float(ssmax_init), seq_len=length, retrieval_enabled=bool(retrieval),
        switch_step=base["steps"] // 2,
        eval_lengths=[m * length for m in settings.pop("eval_multiples")],
        fade_lengths=sorted({max(2, int(m * length)) for m in settings.pop("fade_multiples")}),
        hook_every=max(1, base["steps"] // settings.pop("hook_points")),
        gradient_threshold=DEFAULT_THRESHOLD,
    )
    r = settings["retrieval"]
    r["eval_lengths"] = [m * r["train_length"] for m in r.pop("eval_multiples")]
    r["pos"] = pos[0]
    return settings


def run_config(settings: dict, pos: str, variant: str, seed: int) -> dict:
    """The harness run config of one cell of the grid."""
    normalizer, ssmax = VARIANTS[variant]
    overrides = {"seed": seed, "data": settings["data"], "steps": settings["steps"]}
    if variant in SWITCHED:
        # s = 1/ln(L): at the switch the logits of a row of L keys are exactly the softmax's.
        overrides.update(ssmax=1.0 / math.log(settings["seq_len"]), ssmax_from=settings["switch_step"])
    else:
        overrides["ssmax"] = settings["ssmax_init"] if ssmax else None
    return make_config(settings["preset"], normalizer=normalizer, pos=pos, **overrides)


def needle_variants(settings: dict) -> list[str]:
    """The variants of ``settings`` that train a needle model (none when retrieval is off)."""
    if not settings["retrieval_enabled"]:
        return []
    return [v for v in settings["variants"] if v in NEEDLE_VARIANTS]


def run_name(pos: str, variant: str, seed: int) -> str:
    return f"{pos}-{variant}-s{seed}"


def compare(
    settings: dict, out: str | Path, *, progress: bool = True, jobs: int = 1, threads: int | None = None
) -> dict | None:
    """Run (or resume) the comparison ``settings`` (from :func:`plan`) in ``out``; returns the results dict,
    also written to ``out/results.json`` (after every finished task, so a killed compare leaves a valid file,
    unless that would replace one with more entries). ``out`` is held with :func:`~sasoftmax.files.folder_lock`
    (a second compare there is refused); on an error, Ctrl-C or SIGTERM the workers are stopped (each
    training run saves its checkpoint), and a worker whose parent dies stops by itself.

    ``jobs`` > 1 runs that many tasks (training runs and needle models) at once in worker processes, each
    with ``threads`` torch threads (default 1): on a small CPU, independent single-threaded runs use the
    cores far better than one multi-threaded run, and small models leave a GPU mostly idle, so several
    share it (every worker uses the same device). With ``jobs`` = 1 the tasks run in this process, with
    ``threads`` torch threads if given (restored afterwards). Under ``torchrun`` (WORLD_SIZE > 1) the ranks
    train every run together and only rank 0 returns the results (the others return None); ``jobs`` must
    be 1 there. Raises :class:`~sasoftmax.train.RunError` if ``out`` holds a comparison with different settings.
    """
    for name, value in (("jobs", jobs), ("threads", 1 if threads is None else threads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int; got {value!r}")
    out = Path(out)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if jobs != 1:
            raise ValueError(f"jobs must be 1 under torchrun (the ranks share every run); got {jobs}")
        return _compare_distributed(settings, out, progress, threads)
    load_corpus(settings["data"])  # unusable data fails here, before anything is written
    if out.exists() and not out.is_dir():
        raise RunError(f"{out} exists and is not a comparison directory: use an empty --out")
    # One compare per directory (a second is refused); SIGTERM unwinds like Ctrl-C so the workers are stopped.
    with folder_lock(out), raising_signals():
        created = _claim_directory(out, settings)
        try:
            return _compare(settings, out, progress, jobs, threads)
        except (Interrupted, KeyboardInterrupt) as stop:
            signum = getattr(stop, "signum", signal.SIGINT)
            raise Interrupted(signum, f"interrupted by {signal_name(signum)}; finished runs and the checkpoints of "
                                      "interrupted ones are kept: rerun the same command to resume") from stop
        except Exception:
            if created and not _has_entries_besides(out, "compare.json"):
                (out / "compare.json").unlink(missing_ok=True)  # a failure before any work: leave no trace
            raise


def _has_entries_besides(folder: Path, *names: str) -> bool:
    return any(p.name not in names and not is_leftover(p) for p in folder.iterdir())


def _compare(settings: dict, out: Path, progress: bool, jobs: int, threads: int | None) -> dict:
    start = time.perf_counter()
    tasks = _tasks(settings, out)
    done: dict[str, dict] = {}
    bar = _TaskProgress(progress, tasks, jobs, threads)  # says what runs before anything else takes time
    # The running results.json never replaces one with more entries (a rerun that fails keeps the full one).
    previous = _result_count(out / "results.json")

    def finished(name: str, entry: dict) -> None:
        done[name] = entry
        bar.done(name)
        if len(done) >= previous:
            write_json(out / "results.json", _collect(settings, tasks, done, time.perf_counter() - start, setup))

    try:
        setup = setup_of(settings, jobs=jobs, threads=threads)
        if jobs == 1:
            previous_threads = torch.get_num_threads()
            try:
                if threads is not None:
                    torch.set_num_threads(threads)
                for name, (fn, *args) in tasks:
                    bar.started(name)
                    finished(name, fn(*args, progress=progress))
            finally:
                torch.set_num_threads(previous_threads)
        else:
            context = multiprocessing.get_context("spawn")
            pool = ProcessPoolExecutor(jobs, mp_context=context, initializer=_init_worker,
                                       initargs=(threads or 1, os.getpid()))  # fmt: skip
            try:
                futures = {
                    pool.submit(_in_worker, fn, *args, progress=False): name for name, (fn, *args) in _schedule(tasks)
                }
                for future in as_completed(futures):
                    finished(futures[future], future.result())
            except BaseException as err:
                _stop_workers(pool)  # an error, Ctrl-C or SIGTERM: no worker outlives this compare
                if isinstance(err, BrokenProcessPool):
                    raise RunError(f"a worker process of this compare died ({err}); rerun the same command to "
                                   "resume (finished runs are kept)") from err  # fmt: skip
                raise
            pool.shutdown()
    finally:
        bar.close()
    results = _collect(settings, tasks, done, time.perf_counter() - start, setup)
    write_json(out / "results.json", results)  # the exact dict returned, so `report` redraws the same report
    return results


def _tasks(settings: dict, out: Path) -> list[tuple[str, tuple]]:
    """(name, (function, *arguments)) of every training run, in grid order, then every needle model."""
    tasks: list[tuple[str, tuple]] = [
        (name, (complete_run, settings, out / "runs" / name, pos, variant, seed))
        for seed in settings["seeds"] for pos in settings["pos"] for variant in settings["variants"]
        for name in [run_name(pos, variant, seed)]
    ]
    tasks += [
        (f"needle-{variant}-s{seed}",
         (complete_needle, settings, out / "retrieval" / f"{variant}-s{seed}.json", variant, seed))
        for seed in settings["seeds"] for variant in needle_variants(settings)
    ]
    return tasks


def _schedule(tasks: list[tuple[str, tuple]]) -> list[tuple[str, tuple]]:
    """The order in which worker processes start the tasks: per seed, variant by variant and within a variant
    encoding by encoding, so that the runs training at once use different positional encodings (the DAPE
    ones materialise score maps and need the most memory; six of them at once could overflow a GPU).
    Results keep the grid order of :func:`_tasks`."""
    runs = [t for t in tasks if t[1][0] is complete_run]
    others = [t for t in tasks if t[1][0] is not complete_run]
    settings = runs[0][1][1] if runs else None

    def key(task: tuple[str, tuple]) -> tuple[int, int, int]:
        _, (_, _, _, pos, variant, seed) = task
        return seed, settings["variants"].index(variant), settings["pos"].index(pos)

    return sorted(runs, key=key) + others


def _compare_distributed(settings: dict, out: Path, progress: bool, threads: int | None) -> dict | None:
    """:func:`compare` under torchrun: every rank trains each run (DDP, :func:`sasoftmax.train.train`), rank 0
    evaluates, analyses and writes; needle models are spread over the ranks, one GPU each."""
    if threads is not None:
        torch.set_num_threads(threads)
    created = not dist.is_initialized()
    if created:
        # Rank 0 evaluates each run while the others wait at a barrier: allow it hours, not NCCL's minutes.
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                                timeout=timedelta(hours=6))
    rank, world = dist.get_rank(), dist.get_world_size()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        failure = None
        if rank == 0:
            try:
                out.mkdir(parents=True, exist_ok=True)
                _claim_directory(out, settings)
            except (RunError, OSError) as err:
                failure = str(err)
        flag = [failure]
        dist.broadcast_object_list(flag, src=0)
        if flag[0] is not None:
            raise RunError(flag[0])
        start = time.perf_counter()
        setup = setup_of(settings, jobs=1, threads=threads) if rank == 0 else {}
        tasks = _tasks(settings, out)
        runs = [(name, task) for name, task in tasks if task[0] is complete_run]
        needles = [(name, task) for name, task in tasks if task[0] is complete_needle]
        bar = _TaskProgress(progress and rank == 0, tasks, 1, threads, world=world)
        done: dict[str, dict] = {}
        try:
            for name, (fn, *args) in runs:
                bar.started(name)
                entry = fn(*args, progress=progress and rank == 0)
                dist.barrier()  # rank 0 has written analysis.json before anyone moves on
                if rank == 0:
                    done[name] = entry
                    bar.done(name)
            for i, (_name, (fn, *args)) in enumerate(needles):
                if i % world == rank:
                    fn(*args, progress=False)
            dist.barrier()
            if rank != 0:
                return None
            for name, (fn, *args) in needles:  # rank 0 reads what every rank wrote
                done[name] = fn(*args, progress=False)
                bar.done(name)
        finally:
            bar.close()
        results = _collect(settings, tasks, done, time.perf_counter() - start, setup)
        write_json(out / "results.json", results)
        return results
    finally:
        if created:
            dist.destroy_process_group()


def _result_count(path: Path) -> int:
    """How many runs and needle results an existing results.json holds (0 if none or unreadable)."""
    try:
        results = read_json(path)
        return len(results.get("runs", [])) + len(results.get("retrieval", []))
    except (ValueError, TypeError, AttributeError):
        return 0


def _stop_workers(pool: ProcessPoolExecutor, grace_s: float = 60.0) -> None:
    """Cancel the queued tasks and stop the workers: SIGTERM (a training run saves its checkpoint and exits),
    then SIGKILL for any still alive after ``grace_s``."""
    processes = list((pool._processes or {}).values())  # the executor has no public handle on its processes
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        if process.is_alive():
            process.terminate()
    deadline = time.monotonic() + grace_s
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()


def _in_worker(fn, *args, **kwargs):
    """Run a task in a worker; a signal that stopped it (after its checkpoint was saved) ends the worker."""
    try:
        return fn(*args, **kwargs)
    except Interrupted as stop:
        os._exit(stop.exit_code)
    except KeyboardInterrupt:
        os._exit(128 + signal.SIGINT)


def _init_worker(threads: int, parent: int) -> None:
    torch.set_num_threads(threads)
    # Ctrl-C reaches the whole process group: the parent decides, and stops the workers with SIGTERM (a training
    # run still catches SIGINT itself and saves its checkpoint).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    watch_parent(parent)  # a parent killed with kill -9 takes its workers with it


class _TaskProgress:
    """The comparison's progress on stderr: a tqdm bar over its tasks with elapsed time and ETA (plain lines
    without tqdm). It names what the tasks are and where they run before the first one starts."""

    def __init__(self, enabled: bool, tasks: list[tuple[str, tuple]], jobs: int, threads: int | None,
                 world: int = 1) -> None:
        self.enabled, self.bar, self.count, self.total = enabled, None, 0, len(tasks)
        if not enabled:
            return
        runs = sum(task[0] is complete_run for _, task in tasks)
        needles = self.total - runs
        where = "cuda" if torch.cuda.is_available() else "cpu"
        how = (f"{world} processes (torchrun) training each run together" if world > 1
               else f"{jobs} at a time" if jobs > 1 else "one at a time")
        _say(True, f"{runs} training runs + {needles} needle models = {self.total} tasks, {how}, on {where} "
                   f"({threads or 'default'} torch thread(s) per task); finished tasks are reused on a rerun")
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return
        self.bar = tqdm(total=self.total, desc="compare", unit="task", dynamic_ncols=True, position=0,
                        bar_format="{desc}: {n}/{total} tasks |{bar}| {elapsed} elapsed, ETA {remaining} {postfix}")

    def started(self, name: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"running {name}")
        elif self.enabled:
            _say(True, f"{name} ...")

    def done(self, name: str) -> None:
        self.count += 1
        if self.bar is not None:
            self.bar.set_postfix_str(f"{name} done")
            self.bar.update(1)
        elif self.enabled:
            _say(True, f"[{self.count}/{self.total} tasks] {name} done")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _collect(
    settings: dict, tasks: list[tuple[str, tuple]], done: dict[str, dict], seconds: float, setup: dict
) -> dict:
    """results.json from the finished tasks, in grid order."""
    entries = [done[name] for name, _ in tasks if name in done]
    runs = [e for e in entries if "eval" in e]
    needle = [e for e in entries if "accuracy" in e]
    return _results(settings, runs, needle, seconds, setup)


def complete_run(
    settings: dict, run_dir: Path, pos: str, variant: str, seed: int, *, progress: bool = True
) -> dict | None:
    """Train (or resume), evaluate and analyse one run; reuses ``run_dir/analysis.json`` when complete.

    Under torchrun every rank trains; ranks other than 0 return None after training."""
    config = run_config(settings, pos, variant, seed)
    done = run_dir / "analysis.json"
    if done.exists():
        entry = read_json(done)
        if entry.get("config") == config:
            return entry
    began = time.perf_counter()
    hook = GradientFlowHook(settings["gradient_threshold"], max_rows=settings.get("hook_rows"))
    summary = train(config, run_dir, resume=True, progress=progress, step_hook=hook, hook_every=settings["hook_every"])
    if _rank() != 0:
        return None
    scores = evaluate(run_dir, settings["eval_lengths"], max_tokens=settings["eval_tokens"])
    model, _ = load_model(run_dir)
    device = _device()
    model.to(device)
    val = load_corpus(config["data"]).val
    fade = attention_fade(model, val, settings["fade_lengths"], samples=settings["fade_samples"])
    normalizer, ssmax = VARIANTS[variant]
    entry = {
        "name": run_name(pos, variant, seed),
        "variant": variant,
        "normalizer": normalizer,
        "ssmax": config["ssmax"],
        "ssmax_from": config["ssmax_from"],
        "pos": pos,
        "seed": config["seed"],
        "steps": config["steps"],
        "seq_len": config["seq_len"],
        "parameters": model.num_parameters(),
        "tokens": config["steps"] * config["batch_size"] * config["grad_accum"] * config["seq_len"],
        "device": str(device),
        "eval": {length: {"loss": row["loss"], "ppl": row["ppl"]} for length, row in scores.items()},
        "train": _curve(run_dir / "metrics.jsonl"),
        "final_loss": summary["loss"],
        "train_seconds": summary.get("elapsed"),
        "seconds": round(time.perf_counter() - began, 2),
        "ssmax_s": _ssmax_values(model),
        "analysis": {"gradient_flow": summarize(read_hooks(run_dir / "hooks.jsonl")), "fade": fade},
        "config": config,
    }
    write_json(done, entry)
    return entry


def _device() -> torch.device:
    """Where this process computes: the current CUDA device (every --jobs worker shares it), else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def complete_needle(settings: dict, path: Path, variant: str, seed: int, *, progress: bool = True) -> dict:
    """Train the needle-retrieval model of ``variant`` and measure it; reuses ``path`` when it matches."""
    r = settings["retrieval"]
    normalizer, ssmax = VARIANTS[variant]
    key = {"settings": r, "seed": seed, "variant": variant, "ssmax_init": settings["ssmax_init"]}
    if path.exists():
        entry = read_json(path)
        if entry.get("key") == key:
            return entry
    task = NeedleTask()
    torch.manual_seed(seed)
    model = GPT(GPTConfig(
        vocab_size=task.vocab_size, block_size=r["train_length"], n_layer=r["n_layer"], n_embd=r["n_embd"],
        n_head=r["n_head"], normalizer=normalizer, ssmax=settings["ssmax_init"] if ssmax else None, pos=r["pos"],
    )).to(_device())
    result = run_needle(
        model, task, train_length=r["train_length"], eval_lengths=r["eval_lengths"], steps=r["steps"],
        batch_size=r["batch_size"], lr=r["lr"], seed=seed, samples=r["samples"],
    )
    entry = {"variant": variant, "normalizer": normalizer, "ssmax": settings["ssmax_init"] if ssmax else None,
             "pos": r["pos"], "seed": seed, "parameters": model.num_parameters(), "device": str(_device()),
             **result, "key": key}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, entry)
    return entry


def _claim_directory(out: Path, settings: dict) -> bool:
    """Record the settings in ``out/compare.json`` (True), or check that a previous comparison there matches
    (False)."""
    marker = out / "compare.json"
    if marker.exists():
        try:
            saved = read_json(marker)
        except ValueError as err:
            raise RunError(str(err)) from err
        if saved != settings:
            diff = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
            raise RunError(f"{out} holds a comparison with different settings ({', '.join(diff)}); "
                           "use another --out or the same options")
        return False
    if has_entries(out):
        raise RunError(f"{out} exists and is not a comparison directory (no compare.json): use an empty --out")
    write_json(marker, settings)
    return True


def _curve(path: Path, points: int = 200) -> dict:
    """The training-loss curve from metrics.jsonl, thinned to about ``points`` points."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    stride = max(1, len(rows) // points)
    kept = rows[::stride]
    if rows and kept[-1] is not rows[-1]:
        kept.append(rows[-1])
    return {"step": [r["step"] for r in kept], "loss": [r["loss"] for r in kept]}


def _ssmax_values(model: torch.nn.Module) -> list[list[float]] | None:
    """The learned SSMax s per layer and head, or None without SSMax."""
    values = [m.ssmax.s.detach().tolist() for m in model.modules() if getattr(m, "ssmax", None) is not None]
    return values or None


def _results(settings: dict, runs: list[dict], needle: list[dict], seconds: float, setup: dict) -> dict:
    public = [{k: v for k, v in run.items() if k != "config"} for run in runs]
    results = {
        "settings": settings,
        "setup": setup,
        "runs": public,
        "retrieval": [{k: v for k, v in row.items() if k != "key"} for row in needle],
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "seconds": round(seconds, 1),
        "machine": setup["machine"],
    }
    # Per-seed values, means with intervals, paired differences and verdicts, as the report shows them.
    results["statistics"] = report.statistics(results)
    return results


def setup_of(settings: dict, *, jobs: int = 1, threads: int | None = None) -> dict:
    """What a reader needs to judge the comparison: model and training setup, data and its fingerprint,
    versions, the code's commit and the machine (``results.json["setup"]``)."""
    config = run_config(settings, settings["pos"][0], "softmax", settings["seeds"][0])
    corpus = load_corpus(settings["data"])
    keys = ("n_layer", "n_embd", "n_head", "n_kv_head", "mlp_ratio", "seq_len", "batch_size", "grad_accum",
            "steps", "lr", "min_lr", "warmup", "weight_decay", "grad_clip", "dropout")
    cuda = torch.cuda.is_available()
    return {
        "model": {k: config[k] for k in keys},
        "tokens_per_run": config["steps"] * config["batch_size"] * config["grad_accum"] * config["seq_len"],
        "optimizer": "AdamW (betas 0.9, 0.95; eps 1e-8; weight decay on matrices only), linear warmup then "
                     "cosine decay to min_lr, gradient clipping at grad_clip; bfloat16 autocast on CUDA",
        "data": {"description": corpus.description, "fingerprint": corpus.fingerprint,
                 "train_tokens": int(corpus.train.numel()), "val_tokens": int(corpus.val.numel())},
        "versions": _versions(),
        "commit": git_commit(),
        "machine": {
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu": cpu_name(), "cores": os.cpu_count(),
            "gpu": torch.cuda.get_device_name() if cuda else None,
            "device": "cuda" if cuda else "cpu", "jobs": jobs,
            "threads": threads if threads is not None else torch.get_num_threads(),
            "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        },
    }


def _versions() -> dict:
    from importlib import metadata

    found = {}
    for name in ("sasoftmax", "torch", "scipy", "matplotlib", "triton"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def _say(enabled: bool, message: str) -> None:
    if enabled:
        print(f"compare: {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``sasoftmax compare``."""
    parser.add_argument("--preset", choices=tuple(SETTINGS), default="quick",
                        help="smoke (seconds; tests), quick (default; 36 runs, about 7 min on a quiet 2-core CPU), "
                             "gpu (126 runs at the mid size, several at once on one GPU), paper (torchrun, GPUs)")
    parser.add_argument("--out", required=True, help="output directory (rerun the same command to resume)")
    parser.add_argument("--pos", help="comma-separated positional encodings (default: the preset's: rope,kerple; "
                                      "all seven on gpu)")
    parser.add_argument("--normalizers", help=f"comma-separated variants (default: all of {', '.join(VARIANTS)})")
    parser.add_argument("--seeds", help="comma-separated seeds; each seed trains the whole grid "
                                        "(default: the preset's, 0,1,2; intervals need 2 or more)")
    parser.add_argument("--steps", type=int, help="training steps per run (default: the preset's)")
    parser.add_argument("--data", help="text file or directory, or hf:NAME[:CONFIG] (default: the Python stdlib)")
    parser.add_argument("--ssmax-init", type=float, default=SSMAX_PAPER_INIT,
                        help=f"initial SSMax s of the ssmax variants (default {SSMAX_PAPER_INIT}); softmax_to_ssmax "
                             "starts from 1/ln(training length)")
    parser.add_argument("--jobs", type=int,
                        help="tasks run at once in worker processes, sharing the CPU cores or the one GPU "
                             "(default: the preset's; quick 2, gpu 6; 1 under torchrun)")
    parser.add_argument("--threads", type=int, help="torch threads per task (default: the preset's; 1 on CPU presets)")
    parser.add_argument("--no-retrieval", action="store_true", help="skip the needle-retrieval experiment")
    parser.add_argument("--no-progress", action="store_true", help="no progress output")


def run(args: argparse.Namespace) -> int:
    """Run ``sasoftmax compare``; 0 on success, 2 on bad input (message on stderr)."""
    try:
        import scipy.stats  # noqa: F401  (the report's intervals: fail before training, not after)
    except ImportError:
        print("sasoftmax compare: error: the report needs scipy: pip install 'sasoftmax[harness]'", file=sys.stderr)
        return 2
    try:
        settings = plan(
            args.preset,
            pos=None if args.pos is None else parse_list(args.pos, POSITIONAL, "--pos"),
            variants=None if args.normalizers is None else parse_list(args.normalizers, tuple(VARIANTS),
                                                                       "--normalizers"),
            seeds=None if args.seeds is None else parse_seeds(args.seeds), steps=args.steps, data=args.data,
            ssmax_init=args.ssmax_init,
            retrieval=not args.no_retrieval,
        )
        distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        jobs = (1 if distributed else RESOURCES[args.preset]["jobs"]) if args.jobs is None else args.jobs
        threads = RESOURCES[args.preset]["threads"] if args.threads is None else args.threads
        results = compare(settings, args.out, progress=not args.no_progress, jobs=jobs, threads=threads)
    except (ValueError, TypeError) as err:
        print(f"sasoftmax compare: error: {err}", file=sys.stderr)
        return 2
    if results is None:  # a torchrun rank other than 0: rank 0 writes the report
        return 0
    paths = report.write_report(args.out, results)
    needles = len(results["retrieval"])
    print(f"{args.out}: {len(results['runs'])} training runs and {needles} needle models in "
          f"{results['seconds']:.0f} s; report {paths[0]}")
    return 0
