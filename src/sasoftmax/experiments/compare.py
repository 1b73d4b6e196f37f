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
====================  ==============  ==================================

Per run: training with the gradient-flow hook (:mod:`sasoftmax.analysis.gradient_flow`), evaluation at
L, 2L, 4L, 8L (L the training length), and attention fade (:mod:`sasoftmax.analysis.fade`). Per variant,
once: the needle retrieval task (:mod:`sasoftmax.analysis.retrieval`).

Layout of DIR: ``compare.json`` (the settings; a rerun must match them), ``runs/<pos>-<variant>-s<seed>/``
(a training run directory plus ``analysis.json``, written when the run is complete),
``retrieval/<variant>-s<seed>.json``,
``results.json``, ``report.md`` and ``plots/*.png``. Rerunning the same command resumes: complete runs
are reused, unfinished ones continue from their checkpoints.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import signal
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from datetime import datetime, timezone
from pathlib import Path

import torch

from .. import report
from ..analysis.fade import attention_fade
from ..analysis.gradient_flow import DEFAULT_THRESHOLD, GradientFlowHook, read_hooks, summarize
from ..analysis.retrieval import NeedleTask, run_needle
from ..checks import check_choice
from ..data import load_corpus
from ..evaluate import evaluate
from ..files import LOCK_NAME, folder_lock, has_entries, read_json, write_json
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
}
"""variant -> (normalizer, SSMax on)."""

# What each preset runs besides the harness preset itself. Eval lengths are multiples of the training
# length; fade lengths too (fractions below 1 included, to see the trend from short contexts).
SETTINGS: dict[str, dict] = {
    "smoke": {
        "pos": ["rope", "kerple"], "seeds": [0], "eval_multiples": [1, 2, 4, 8], "eval_tokens": 1024,
        "hook_points": 4,
        "fade_multiples": [0.5, 1, 2, 4, 8], "fade_samples": 2,
        "retrieval": {"n_layer": 1, "n_embd": 32, "n_head": 2, "train_length": 16, "eval_multiples": [1, 2, 4],
                      "steps": 30, "batch_size": 16, "lr": 3e-3, "samples": 32},
    },
    "quick": {
        "pos": ["rope", "kerple"], "seeds": [0, 1], "eval_multiples": [1, 2, 4, 8], "eval_tokens": 16384,
        "hook_points": 10,
        "fade_multiples": [0.125, 0.25, 0.5, 1, 2, 4, 8], "fade_samples": 8,
        "retrieval": {"n_layer": 1, "n_embd": 32, "n_head": 2, "train_length": 32, "eval_multiples": [1, 2, 4, 8],
                      "steps": 400, "batch_size": 32, "lr": 3e-3, "samples": 256},
    },
    "paper": {
        "pos": ["rope", "kerple", "dapev2_kerple"], "seeds": [0], "eval_multiples": [1, 2, 4, 8],
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
RESOURCES: dict[str, dict] = {
    "smoke": {"jobs": 1, "threads": 1},
    "quick": {"jobs": 2, "threads": 1},
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
        raise ValueError(f"ssmax_init must be a finite float > 0; got {ssmax_init!r}")
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
    return make_config(
        settings["preset"], normalizer=normalizer, ssmax=settings["ssmax_init"] if ssmax else None, pos=pos,
        **overrides,
    )


def run_name(pos: str, variant: str, seed: int) -> str:
    return f"{pos}-{variant}-s{seed}"


def compare(
    settings: dict, out: str | Path, *, progress: bool = True, jobs: int = 1, threads: int | None = None
) -> dict:
    """Run (or resume) the comparison ``settings`` (from :func:`plan`) in ``out``; returns the results dict,
    also written to ``out/results.json`` (after every finished task, so a killed compare leaves a valid file,
    unless that would replace one with more entries). ``out`` is held with :func:`~sasoftmax.files.folder_lock`
    (a second compare there is refused); on an error, Ctrl-C or SIGTERM the workers are stopped (each
    training run saves its checkpoint), and a worker whose parent dies stops by itself.

    ``jobs`` > 1 runs that many tasks (training runs and needle models) at once in worker processes, each
    with ``threads`` torch threads (default 1): on a small CPU, independent single-threaded runs use the
    cores far better than one multi-threaded run. With ``jobs`` = 1 the tasks run in this process, with
    ``threads`` torch threads if given (restored afterwards). Raises :class:`~sasoftmax.train.RunError` if ``out``
    holds a comparison with different settings.
    """
    for name, value in (("jobs", jobs), ("threads", 1 if threads is None else threads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int; got {value!r}")
    out = Path(out)
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
    return any(p.name not in (LOCK_NAME, *names) for p in folder.iterdir())


def _compare(settings: dict, out: Path, progress: bool, jobs: int, threads: int | None) -> dict:
    start = time.perf_counter()
    tasks: list[tuple[str, tuple]] = [
        (name, (complete_run, settings, out / "runs" / name, pos, variant, seed))
        for seed in settings["seeds"] for pos in settings["pos"] for variant in settings["variants"]
        for name in [run_name(pos, variant, seed)]
    ]
    if settings["retrieval_enabled"]:
        tasks += [
            (f"needle-{variant}-s{seed}",
             (complete_needle, settings, out / "retrieval" / f"{variant}-s{seed}.json", variant, seed))
            for seed in settings["seeds"] for variant in settings["variants"]
        ]
    done: dict[str, dict] = {}
    # The running results.json never replaces one with more entries (a rerun that fails keeps the full one).
    previous = _result_count(out / "results.json")

    def finished(name: str, entry: dict) -> None:
        done[name] = entry
        _say(progress, f"[{len(done)}/{len(tasks)}] {name} done")
        if len(done) >= previous:
            write_json(out / "results.json", _collect(settings, tasks, done, time.perf_counter() - start))

    if jobs == 1:
        previous_threads = torch.get_num_threads()
        try:
            if threads is not None:
                torch.set_num_threads(threads)
            for name, (fn, *args) in tasks:
                _say(progress, f"{name} ...")
                finished(name, fn(*args, progress=progress))
        finally:
            torch.set_num_threads(previous_threads)
    else:
        context = multiprocessing.get_context("spawn")
        pool = ProcessPoolExecutor(jobs, mp_context=context, initializer=_init_worker,
                                   initargs=(threads or 1, os.getpid()))  # fmt: skip
        try:
            futures = {pool.submit(_in_worker, fn, *args, progress=False): name for name, (fn, *args) in tasks}
            for future in as_completed(futures):
                finished(futures[future], future.result())
        except BaseException as err:
            _stop_workers(pool)  # an error, Ctrl-C or SIGTERM: no worker outlives this compare
            if isinstance(err, BrokenProcessPool):
                raise RunError(f"a worker process of this compare died ({err}); rerun the same command to resume "
                               "(finished runs are kept)") from err  # fmt: skip
            raise
        pool.shutdown()
    results = _collect(settings, tasks, done, time.perf_counter() - start)
    write_json(out / "results.json", results)  # the exact dict returned, so `report` redraws the same report
    return results


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


def _collect(settings: dict, tasks: list[tuple[str, tuple]], done: dict[str, dict], seconds: float) -> dict:
    """results.json from the finished tasks, in grid order."""
    entries = [done[name] for name, _ in tasks if name in done]
    runs = [e for e in entries if "eval" in e]
    needle = [e for e in entries if "accuracy" in e]
    return _results(settings, runs, needle, seconds)


def complete_run(
    settings: dict, run_dir: Path, pos: str, variant: str, seed: int, *, progress: bool = True
) -> dict:
    """Train (or resume), evaluate and analyse one run; reuses ``run_dir/analysis.json`` when complete."""
    config = run_config(settings, pos, variant, seed)
    done = run_dir / "analysis.json"
    if done.exists():
        entry = read_json(done)
        if entry.get("config") == config:
            return entry
    began = time.perf_counter()
    hook = GradientFlowHook(settings["gradient_threshold"], max_rows=settings.get("hook_rows"))
    summary = train(config, run_dir, resume=True, progress=progress, step_hook=hook, hook_every=settings["hook_every"])
    scores = evaluate(run_dir, settings["eval_lengths"], max_tokens=settings["eval_tokens"])
    model, _ = load_model(run_dir)
    val = load_corpus(config["data"]).val
    fade = attention_fade(model, val, settings["fade_lengths"], samples=settings["fade_samples"])
    normalizer, ssmax = VARIANTS[variant]
    entry = {
        "name": run_name(pos, variant, seed),
        "variant": variant,
        "normalizer": normalizer,
        "ssmax": config["ssmax"],
        "pos": pos,
        "seed": config["seed"],
        "steps": config["steps"],
        "seq_len": config["seq_len"],
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
    ))
    result = run_needle(
        model, task, train_length=r["train_length"], eval_lengths=r["eval_lengths"], steps=r["steps"],
        batch_size=r["batch_size"], lr=r["lr"], seed=seed, samples=r["samples"],
    )
    entry = {"variant": variant, "normalizer": normalizer, "ssmax": settings["ssmax_init"] if ssmax else None,
             "pos": r["pos"], "seed": seed, **result, "key": key}
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


def _results(settings: dict, runs: list[dict], needle: list[dict], seconds: float) -> dict:
    public = [{k: v for k, v in run.items() if k != "config"} for run in runs]
    return {
        "settings": settings,
        "runs": public,
        "retrieval": [{k: v for k, v in row.items() if k != "key"} for row in needle],
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "seconds": round(seconds, 1),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
    }


def _say(enabled: bool, message: str) -> None:
    if enabled:
        print(f"compare: {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``sasoftmax compare``."""
    parser.add_argument("--preset", choices=tuple(SETTINGS), default="quick",
                        help="smoke (seconds; tests), quick (default; ~11 min on a 2-core CPU), paper (GPUs)")
    parser.add_argument("--out", required=True, help="output directory (rerun the same command to resume)")
    parser.add_argument("--pos", help="comma-separated positional encodings (default: the preset's, e.g. rope,kerple)")
    parser.add_argument("--normalizers", help=f"comma-separated variants (default: all of {', '.join(VARIANTS)})")
    parser.add_argument("--seeds", help="comma-separated seeds; each seed trains the whole grid "
                                        "(default: the preset's: smoke 0, quick 0,1)")
    parser.add_argument("--steps", type=int, help="training steps per run (default: the preset's)")
    parser.add_argument("--data", help="text file or directory, or hf:NAME[:CONFIG] (default: the Python stdlib)")
    parser.add_argument("--ssmax-init", type=float, default=SSMAX_PAPER_INIT,
                        help=f"initial SSMax s of the ssmax variants (default {SSMAX_PAPER_INIT})")
    parser.add_argument("--jobs", type=int,
                        help="tasks run at once in worker processes, 1 torch thread each unless --threads "
                             "(default: the preset's; quick uses 2)")
    parser.add_argument("--threads", type=int, help="torch threads per task (default: the preset's; 1 on CPU presets)")
    parser.add_argument("--no-retrieval", action="store_true", help="skip the needle-retrieval experiment")
    parser.add_argument("--no-progress", action="store_true", help="no progress output")


def run(args: argparse.Namespace) -> int:
    """Run ``sasoftmax compare``; 0 on success, 2 on bad input (message on stderr)."""
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
        jobs = RESOURCES[args.preset]["jobs"] if args.jobs is None else args.jobs
        threads = RESOURCES[args.preset]["threads"] if args.threads is None else args.threads
        results = compare(settings, args.out, progress=not args.no_progress, jobs=jobs, threads=threads)
    except (ValueError, TypeError) as err:
        print(f"sasoftmax compare: error: {err}", file=sys.stderr)
        return 2
    paths = report.write_report(args.out, results)
    print(f"{args.out}: {len(results['runs'])} runs in {results['seconds']:.0f} s; report {paths[0]}")
    return 0
