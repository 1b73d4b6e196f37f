"""The ``sasoftmax`` command: ``train``, ``eval``, ``bench``, ``compare`` and ``report``.

``bench``, ``compare`` and ``report`` live in their own modules (``sasoftmax.benchmark``,
``sasoftmax.experiments.compare``, ``sasoftmax.report``), each exposing ``add_arguments(parser)`` and
``run(args) -> int``. Bad input prints a message on stderr and exits with code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

import torch

from .backends import BACKENDS
from .normalizers import NORMALIZERS
from .positional import POSITIONAL
from .presets import PRESETS
from .signals import Interrupted

DELEGATED = {
    "bench": ("sasoftmax.benchmark", "benchmark the attention backends"),
    "compare": ("sasoftmax.experiments.compare", "train and compare softmax, SA-Softmax and SSMax; write a report"),
    "report": ("sasoftmax.report", "regenerate a comparison's report and plots from results.json"),
}


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=tuple(PRESETS), default="smoke", help="sizes and budget (default smoke)")
    parser.add_argument("--normalizer", choices=NORMALIZERS, default="sa_norm",
                        help="attention normalizer (default sa_norm)")
    parser.add_argument("--ssmax", type=float, default=None, metavar="S",
                        help="turn on Scalable-Softmax with learnable per-head s initialised to S > 0 (e.g. 0.43; "
                             "default off)")
    parser.add_argument("--ssmax-from", type=int, metavar="STEP",
                        help="with --ssmax: train with plain softmax logits before STEP, then with SSMax "
                             "(default: SSMax from the start)")
    parser.add_argument("--pos", choices=POSITIONAL, default="rope", help="positional encoding (default rope)")
    parser.add_argument("--steps", type=int, help="training steps (default: the preset's)")
    parser.add_argument("--decay-steps", type=int, help="horizon of the cosine schedule (default: --steps)")
    parser.add_argument("--seed", type=int, help="seed of the model initialisation and data sampling")
    parser.add_argument("--data", help="text file or directory, or hf:NAME[:CONFIG] (default: the Python stdlib)")
    parser.add_argument("--batch-size", type=int, help="sequences per micro-batch (global, over all processes)")
    parser.add_argument("--grad-accum", type=int, help="micro-batches per step")
    parser.add_argument("--lr", type=float, help="peak learning rate")
    parser.add_argument("--checkpoint-every", type=int, help="checkpoint every K steps (and at the end)")
    parser.add_argument("--backend", choices=("auto",) + BACKENDS, help="attention backend")
    parser.add_argument("--out", required=True, help="run directory")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_threads_argument(parser)


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, help="CPU threads for PyTorch (default: PyTorch's; 1 is often "
                        "fastest for small models on a shared CPU)")


def apply_threads(args: argparse.Namespace) -> None:
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1; got {args.threads}")
        torch.set_num_threads(args.threads)


def run_train(args: argparse.Namespace) -> int:
    from .train import make_config, train

    apply_threads(args)
    overrides = {
        key: getattr(args, key)
        for key in ("steps", "decay_steps", "seed", "data", "batch_size", "grad_accum", "lr", "checkpoint_every",
                    "backend")
        if getattr(args, key) is not None
    }
    config = make_config(args.preset, normalizer=args.normalizer, ssmax=args.ssmax, ssmax_from=args.ssmax_from,
                         pos=args.pos, **overrides)
    summary = train(config, args.out, resume=args.resume, progress=not args.no_progress)
    print(f"{args.out}: step {summary['step']}, loss {summary['loss']:.4f}")
    return 0


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run directory written by `sasoftmax train`")
    parser.add_argument("--lengths", help="comma-separated evaluation lengths (default: the preset's, L..8L)")
    parser.add_argument("--max-tokens", type=int, help="predicted tokens per length (default: the preset's)")
    add_threads_argument(parser)


def run_eval(args: argparse.Namespace) -> int:
    from .evaluate import evaluate, format_table, parse_lengths
    from .train import read_checkpoint

    apply_threads(args)
    if args.lengths is not None:
        lengths = parse_lengths(args.lengths)
    else:
        lengths = read_checkpoint(args.run)["config"]["eval_lengths"]
    results = evaluate(args.run, lengths, max_tokens=args.max_tokens)
    print(format_table(results))
    return 0


def version() -> str:
    """The installed distribution's version (pyproject.toml's when installed with pip), else "unknown"."""
    from importlib import metadata

    try:
        return metadata.version("sasoftmax")
    except metadata.PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sasoftmax", description="Self-Adjust Softmax and Scalable-Softmax")
    parser.add_argument("--version", action="version", version=f"sasoftmax {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train = sub.add_parser("train", help="train a decoder LM", description="Train a decoder LM.")
    add_train_arguments(train)
    train.set_defaults(handler=run_train)
    evaluate = sub.add_parser("eval", help="perplexity of a run at several lengths",
                              description="Validation perplexity of a trained run at several lengths.")
    add_eval_arguments(evaluate)
    evaluate.set_defaults(handler=run_eval)
    for name, (module_name, help_text) in DELEGATED.items():
        module = importlib.import_module(module_name)
        command = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(command)
        command.set_defaults(handler=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default sys.argv[1:]); returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse has printed its message
        return int(exit_.code or 0)
    try:
        return int(args.handler(args) or 0)
    except Interrupted as stop:
        print(f"sasoftmax {args.command}: {stop}", file=sys.stderr)
        return stop.exit_code
    except (ValueError, TypeError, OSError) as err:
        print(f"sasoftmax {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as err:
        if not isinstance(err, (torch.OutOfMemoryError, MemoryError)) and not _is_out_of_memory(err):
            raise  # a bug: keep its traceback
        print(f"sasoftmax {args.command}: error: out of memory ({_one_line(err)}); try a smaller --batch-size",
              file=sys.stderr)  # fmt: skip
        return 2
    except KeyboardInterrupt:
        print(f"sasoftmax {args.command}: interrupted", file=sys.stderr)
        return 130


def _is_out_of_memory(err: RuntimeError) -> bool:
    text = str(err).lower()
    return "out of memory" in text or "can't allocate memory" in text or "not enough memory" in text


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__
