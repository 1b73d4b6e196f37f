"""``sasoftmax report DIR``: the report of a comparison (``report.md`` and ``plots/*.png``) from its
``results.json`` alone, so it can be regenerated (e.g. after installing matplotlib) without training.

The report sets each claim of the two papers beside what the runs measured and says plainly whether it
held at this scale. Plots need matplotlib (``pip install 'sasoftmax[harness]'``); without it the
markdown is still written, with a note.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

from .files import write_atomic

BASELINE = "softmax"
VARIANT_LABELS = {
    "softmax": "softmax",
    "sa_norm": "SA-Softmax (norm)",
    "sa": "SA-Softmax (raw)",
    "ssmax": "SSMax",
    "ssmax_sa_norm": "SSMax + SA (norm)",
}
COLORS = {
    "softmax": "black", "sa_norm": "tab:blue", "sa": "tab:cyan", "ssmax": "tab:red", "ssmax_sa_norm": "tab:purple",
}


def load_results(out: str | Path) -> dict:
    """``out/results.json`` as a dict; ValueError if it is missing or not a comparison's results."""
    path = Path(out) / "results.json"
    if not path.is_file():
        raise ValueError(f"{path} does not exist: run `sasoftmax compare --out {out}` first")
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(results, dict) or not isinstance(results.get("runs"), list) or "settings" not in results:
        raise ValueError(f"{path} is not the results of `sasoftmax compare` (no 'settings'/'runs')")
    return results


# ------------------------------------------------------------------------------------------ claims


def _seeds(results: dict) -> list[int]:
    return list(results["settings"].get("seeds", [results["settings"].get("seed", 0)]))


def _groups(results: dict) -> dict[tuple[str, str], dict[int, dict]]:
    """(pos, variant) -> {seed: run}, in grid order."""
    groups: dict[tuple[str, str], dict[int, dict]] = {}
    for run in results["runs"]:
        groups.setdefault((run["pos"], run["variant"]), {})[run.get("seed", 0)] = run
    return groups


def _needles(results: dict) -> dict[str, dict[int, dict]]:
    """variant -> {seed: needle result}."""
    table: dict[str, dict[int, dict]] = {}
    for row in results.get("retrieval", []):
        table.setdefault(row["variant"], {})[row.get("seed", 0)] = row
    return table


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _mean_series(series: list[list[float]]) -> list[float]:
    """Elementwise mean of equally long series (runs of different seeds)."""
    return [sum(column) / len(column) for column in zip(*series)]


def _longest(run: dict) -> str:
    return max(run["eval"], key=int)


def _shortest(run: dict) -> str:
    return min(run["eval"], key=int)


def _tail_loss(run: dict) -> float:
    """Mean training loss over the last 10% of logged steps (less noisy than the last step)."""
    losses = run["train"]["loss"] or [run["final_loss"]]
    tail = losses[-max(1, len(losses) // 10) :]
    return sum(tail) / len(tail)


def _fade_at(run: dict, length: int) -> float | None:
    fade = run["analysis"]["fade"]
    if length in fade["lengths"]:
        return fade["max_weight"][fade["lengths"].index(length)]
    return None


def _verdict(outcomes: list[bool]) -> str:
    if not outcomes:
        return "not measured"
    if all(outcomes):
        return "**reproduced**"
    if not any(outcomes):
        return "**not reproduced**"
    return f"**mixed** ({sum(outcomes)} of {len(outcomes)})"


def _pairwise(
    results: dict, variant: str, measure: Callable[[dict], float | None], better: Callable[[float, float], bool],
    fmt: str,
) -> tuple[list[bool], str]:
    """Compare ``variant`` with the softmax baseline on ``measure``, seed by seed (same seed = same
    initialisation and data order), per positional encoding. Returns the outcomes of all (encoding, seed)
    pairs and a text with the means over seeds."""
    groups = _groups(results)
    outcomes, parts = [], []
    for pos in results["settings"]["pos"]:
        ours_runs, base_runs = groups.get((pos, variant), {}), groups.get((pos, BASELINE), {})
        pairs = [(measure(ours_runs[s]), measure(base_runs[s])) for s in ours_runs if s in base_runs]
        pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
        if not pairs:
            continue
        wins = [better(a, b) for a, b in pairs]
        outcomes += wins
        text = f"{pos}: {fmt.format(_mean([a for a, _ in pairs]))} vs {fmt.format(_mean([b for _, b in pairs]))}"
        if len(pairs) > 1:
            text += f" (holds for {sum(wins)} of {len(pairs)} seeds)"
        parts.append(text)
    return outcomes, "; ".join(parts) if parts else "not run (needs this variant and softmax)"


def claims(results: dict) -> list[dict]:
    """The papers' claims with what was measured: ``[{"paper", "claim", "measured", "verdict"}]``.

    A verdict is "reproduced" when the claim holds for every (positional encoding, seed) pair, "not
    reproduced" when it holds for none, "mixed" otherwise.
    """
    settings = results["settings"]
    rows = []

    def lower(a: float, b: float) -> bool:
        return a < b

    def higher(a: float, b: float) -> bool:
        return a > b

    def add(paper: str, claim: str, variant: str, measure, better, fmt: str, what: str) -> None:
        outcomes, text = _pairwise(results, variant, measure, better, fmt)
        rows.append({"paper": paper, "claim": claim, "measured": f"{what} ({VARIANT_LABELS[variant]} vs softmax) — "
                     f"{text}", "verdict": _verdict(outcomes)})

    def grad(run):
        return run["analysis"]["gradient_flow"].get("mean_logit_grad_rms")

    def vanish(run):
        return run["analysis"]["gradient_flow"].get("mean_vanish_frac")

    def ppl_train_length(run):
        return run["eval"][_shortest(run)]["ppl"]

    def ppl_longest(run):
        return run["eval"][_longest(run)]["ppl"]

    add("SA-Softmax", "larger gradients reach the attention logits", "sa_norm", grad, higher,
        "{:.3g}", "mean RMS of dL/dlogits over layers and training")
    add("SA-Softmax", "fewer vanishing logit gradients", "sa_norm", vanish, lower,
        "{:.2%}", f"fraction of entries with |dL/dlogits| < {settings.get('gradient_threshold')}")
    add("SA-Softmax", "lower perplexity", "sa_norm", ppl_train_length, lower, "{:.3f}",
        "validation ppl at the training length")
    add("SA-Softmax", "better length extrapolation", "sa_norm", ppl_longest, lower, "{:.3f}",
        f"validation ppl at {max(settings['eval_lengths'])} (8× training length)")
    rows.append(_dapev2_claim(results, ppl_longest))
    seq_len = settings["seq_len"]
    longest_fade = max(settings["fade_lengths"])

    def retained(run):
        at_train, at_long = _fade_at(run, seq_len), _fade_at(run, longest_fade)
        return None if not at_train or at_long is None else at_long / at_train

    add("SSMax", "attention does not fade with context length", "ssmax", retained, higher, "{:.2f}",
        f"largest attention weight at n={longest_fade} relative to n={seq_len} (1 = no fade; uniform "
        f"attention would give {seq_len / longest_fade:.3g})")
    add("SSMax", "faster loss reduction in pretraining", "ssmax", _tail_loss, lower, "{:.4f}",
        "training loss over the last 10% of steps")
    add("SSMax", "better length generalisation", "ssmax", ppl_longest, lower, "{:.3f}",
        f"validation ppl at {max(settings['eval_lengths'])}")
    rows.append(_retrieval_claim(results))
    return rows


def _dapev2_claim(results: dict, ppl_longest: Callable[[dict], float]) -> dict:
    claim = {"paper": "SA-Softmax", "claim": "gains are largest with DAPEV2-Kerple"}
    if "dapev2_kerple" not in results["settings"]["pos"]:
        return {**claim, "measured": "dapev2_kerple not in this grid (the paper preset runs it; `--pos` adds it)",
                "verdict": "not measured"}
    groups = _groups(results)
    gains = {}
    for pos in results["settings"]["pos"]:
        ours, base = groups.get((pos, "sa_norm"), {}), groups.get((pos, BASELINE), {})
        ratios = [ppl_longest(ours[s]) / ppl_longest(base[s]) for s in ours if s in base]
        if ratios:
            gains[pos] = 1 - _mean(ratios)
    if not gains:
        return {**claim, "measured": "needs sa_norm and softmax runs", "verdict": "not measured"}
    best = max(gains, key=gains.get)
    return {**claim, "measured": "relative ppl gain of SA-Softmax (norm) over softmax at the longest length: "
            + "; ".join(f"{p}: {g:+.1%}" for p, g in gains.items()), "verdict": _verdict([best == "dapev2_kerple"])}


def _retrieval_claim(results: dict) -> dict:
    table = _needles(results)
    claim = {"paper": "SSMax", "claim": "better key-information retrieval in long contexts"}
    if "ssmax" not in table or BASELINE not in table:
        return {**claim, "measured": "needle task not run for ssmax and softmax", "verdict": "not measured"}
    seeds = [s for s in table["ssmax"] if s in table[BASELINE]]
    first = table["ssmax"][seeds[0]]
    longest, trained = max(first["accuracy"], key=int), str(first["train_length"])
    ours = [table["ssmax"][s]["accuracy"][longest] for s in seeds]
    base = [table[BASELINE][s]["accuracy"][longest] for s in seeds]
    at_train = (_mean([table["ssmax"][s]["accuracy"][trained] for s in seeds]),
                _mean([table[BASELINE][s]["accuracy"][trained] for s in seeds]))
    measured = (f"needle accuracy at n={longest} (trained at {trained}): SSMax {_mean(ours):.1%} vs softmax "
                f"{_mean(base):.1%}; at n={trained}: {at_train[0]:.1%} vs {at_train[1]:.1%}")
    if len(seeds) > 1:
        measured += f" (mean of {len(seeds)} seeds)"
    return {**claim, "measured": measured, "verdict": _verdict([a > b for a, b in zip(ours, base)])}


# ------------------------------------------------------------------------------------------ markdown


def summary(rows: list[dict]) -> str:
    """One plain sentence per verdict: which claims held at this scale and which did not."""
    groups: dict[str, list[str]] = {}
    for row in rows:
        word = row["verdict"].strip("*").split("*")[0].strip()
        groups.setdefault(word, []).append(f"{row['paper']}: {row['claim']}")
    parts = []
    for word, title in (("reproduced", "Reproduced here"), ("mixed", "Mixed (held for some encodings/seeds only)"),
                        ("not reproduced", "Not reproduced here"), ("not measured", "Not measured")):
        if word in groups:
            parts.append(f"**{title}:** " + "; ".join(groups[word]) + ".")
    return "In short. " + " ".join(parts)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _spread(values: list[float | None], fmt: str) -> str:
    """Mean of ``values`` (one per seed), with ± half their range when there are several."""
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return "–"
    text = fmt.format(sum(values) / len(values))
    if len(values) > 1:
        text += " ±" + fmt.format((max(values) - min(values)) / 2)
    return text


def _label(variant: str) -> str:
    return VARIANT_LABELS.get(variant, variant)


def markdown(results: dict, plots: list[Path], plot_note: str | None = None) -> str:
    """The text of report.md."""
    s = results["settings"]
    groups = _groups(results)
    seeds = _seeds(results)
    machine = results.get("machine", {})
    rows = claims(results)
    per_seed = f"seed {seeds[0]}"
    if len(seeds) > 1:
        per_seed = f"mean over seeds {', '.join(map(str, seeds))} ± half the range"
    lines = [
        "# sasoftmax compare: softmax vs SA-Softmax vs SSMax",
        "",
        f"Preset `{s['preset']}`: {len(results['runs'])} runs ({', '.join(s['variants'])} × {', '.join(s['pos'])}"
        f" × seeds {', '.join(map(str, seeds))}), {s['steps']} steps each at training length {s['seq_len']}, data "
        f"{'the Python standard library' if s['data'] is None else s['data']}; SSMax s initialised to "
        f"{s['ssmax_init']}. Generated {results.get('created', '?')} in {results.get('seconds', 0):.0f} s on "
        f"{machine.get('platform', '?')} (torch {machine.get('torch', '?')}).",
        "",
        "Runs of one seed share initialisation seed, data order and budget; only the attention normalizer "
        "differs. Small models and short training: differences within the seed-to-seed spread are noise, and "
        "small-scale results need not carry over to the papers' scale (125M–2.7B parameters).",
        "",
        "## The papers' claims beside what we measured",
        "",
        _table(["paper", "claim", "measured here", "verdict"],
               [[c["paper"], c["claim"], c["measured"], c["verdict"]] for c in rows]),
        "",
        summary(rows),
        "",
        "A verdict is *reproduced* when the claim holds for every (positional encoding, seed) pair, *not "
        "reproduced* when it holds for none, *mixed* otherwise. The SA-Softmax (norm) weight "
        "(x − m)/(M − m + ε)·p divides by the logit range M − m, so its logit gradients are large when the logits "
        "span a small range (as early in training): larger gradients are what the paper claims, but they are "
        "partly a matter of scale. Attention fade is measured on the last query of windows of n validation "
        "tokens (it attends to exactly n keys).",
        "",
        f"## Perplexity vs evaluation length ({per_seed})",
        "",
    ]
    lengths = sorted({int(k) for run in results["runs"] for k in run["eval"]})
    rows = []
    for (pos, variant), runs in groups.items():
        cells = [_spread([r["eval"].get(str(n), {}).get("ppl") for r in runs.values()], "{:.3f}") for n in lengths]
        rows.append([pos, _label(variant), *cells, _spread([_tail_loss(r) for r in runs.values()], "{:.4f}")])
    lines += [_table(["pos", "variant", *[f"ppl@{n}" for n in lengths], "train loss (last 10%)"], rows), ""]
    rows = []
    for (pos, variant), runs in groups.items():
        flows = [r["analysis"]["gradient_flow"] for r in runs.values()]
        rows.append([pos, _label(variant)] + [
            _spread([f.get(key) for f in flows], fmt) for key, fmt in (
                ("mean_logit_grad_rms", "{:.3g}"), ("mean_vanish_frac", "{:.2%}"), ("mean_q_grad_norm", "{:.3g}"),
                ("mean_k_grad_norm", "{:.3g}"))])
    lines += [
        "## Gradient flow into attention (during training)",
        "",
        f"Means over layers and the measured steps (every {s['hook_every']} steps); {per_seed}. dL/dlogits is per "
        f"token (summed loss); an entry vanishes below {s.get('gradient_threshold')}.",
        "",
        _table(["pos", "variant", "RMS dL/dlogits", "vanishing", "‖dL/dW_q‖", "‖dL/dW_k‖"], rows),
        "",
        f"## Attention fade: largest weight of the last query vs context length n ({per_seed})",
        "",
    ]
    fade_lengths = s["fade_lengths"]
    rows = []
    for (pos, variant), runs in groups.items():
        fades = [r["analysis"]["fade"] for r in runs.values()]
        cells = [_spread([f["max_weight"][i] for f in fades], "{:.3f}") for i in range(len(fade_lengths))]
        entropy = _mean([f["entropy"][-1] for f in fades])
        rows.append([pos, _label(variant), *cells, f"{entropy:.2f} / {math.log(fade_lengths[-1]):.2f}"])
    lines += [_table(["pos", "variant", *[f"n={n}" for n in fade_lengths], f"entropy at n={fade_lengths[-1]} / ln n"],
                     rows), ""]
    learned = [(key, runs) for key, runs in groups.items() if any(r.get("ssmax_s") for r in runs.values())]
    if learned:
        parts = []
        for (pos, variant), runs in learned:
            layers = _mean_series([[sum(v) / len(v) for v in r["ssmax_s"]] for r in runs.values()])
            parts.append(f"{pos}/{variant}: " + ", ".join(f"{v:.3f}" for v in layers))
        lines += ["Learned SSMax s (mean over heads and seeds, per layer; initialised to "
                  f"{s['ssmax_init']}): " + "; ".join(parts), ""]
    needles = _needles(results)
    if needles:
        r = s["retrieval"]
        needle_lengths = r["eval_lengths"]
        chance = next(iter(next(iter(needles.values())).values()))["chance"]
        lines += [
            f"## Needle retrieval: trained at one length, tested at longer ones ({per_seed})",
            "",
            f"A {r['n_layer']}-layer, width-{r['n_embd']} model per variant ({r['pos']}), {r['steps']} steps at "
            f"length {r['train_length']}; accuracy over {r['samples']} windows per length (chance {chance:.1%}).",
            "",
            _table(["variant", *[f"acc@{n}" for n in needle_lengths], "final train loss"],
                   [[_label(variant)]
                    + [_spread([row["accuracy"].get(str(n)) for row in rows_.values()], "{:.1%}")
                       for n in needle_lengths]
                    + [_spread([row["final_loss"] for row in rows_.values()], "{:.3f}")]
                    for variant, rows_ in needles.items()]),
            "",
        ]
    lines += ["## Plots", ""]
    if plot_note:
        lines += [plot_note, ""]
    lines += [f"![{p.stem}](plots/{p.name})" for p in plots]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ plots


def _pyplot():
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError("plots need matplotlib: pip install 'sasoftmax[harness]'") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _by_pos(results: dict) -> dict[str, dict[str, list[dict]]]:
    """pos -> variant -> runs (one per seed)."""
    grouped: dict[str, dict[str, list[dict]]] = {}
    for (pos, variant), runs in _groups(results).items():
        grouped.setdefault(pos, {})[variant] = list(runs.values())
    return grouped


def _grid(plt, rows: int, cols: int):
    return plt.subplots(rows, cols, figsize=(4.5 * cols, 3.4 * rows), squeeze=False)


def _line(ax, variant: str, xs, ys, **kw) -> None:
    ax.plot(xs, ys, label=_label(variant), color=COLORS.get(variant), **kw)


def _length_axis(ax, lengths: list[int]) -> None:
    """Log-2 x axis labelled with the lengths themselves."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths)
    ax.set_xticklabels([str(n) for n in lengths], fontsize=7)
    ax.minorticks_off()


def _seed_note(results: dict) -> str:
    seeds = _seeds(results)
    return f" (mean of {len(seeds)} seeds)" if len(seeds) > 1 else ""


def plot_loss(results: dict, path: Path) -> Path:
    """Training loss vs step, one panel per positional encoding."""
    plt = _pyplot()
    groups = _by_pos(results)
    fig, axes = _grid(plt, 1, len(groups))
    for ax, (pos, variants) in zip(axes[0], groups.items()):
        for variant, runs in variants.items():
            _line(ax, variant, runs[0]["train"]["step"], _mean_series([r["train"]["loss"] for r in runs]),
                  linewidth=1)
        ax.set(title=f"training loss ({pos}){_seed_note(results)}", xlabel="step", ylabel="loss")
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_ppl(results: dict, path: Path) -> Path:
    """Validation perplexity vs evaluation length, one panel per positional encoding."""
    plt = _pyplot()
    groups = _by_pos(results)
    lengths = results["settings"]["eval_lengths"]
    fig, axes = _grid(plt, 1, len(groups))
    for ax, (pos, variants) in zip(axes[0], groups.items()):
        for variant, runs in variants.items():
            ppl = _mean_series([[r["eval"][str(n)]["ppl"] for n in lengths] for r in runs])
            _line(ax, variant, lengths, ppl, marker="o")
        ax.axvline(results["settings"]["seq_len"], color="grey", linestyle=":", linewidth=1)
        ax.set(title=f"perplexity vs length ({pos})", xlabel="evaluation length", ylabel="ppl")
        _length_axis(ax, lengths)
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_gradient_flow(results: dict, path: Path) -> Path:
    """RMS logit gradient and vanishing fraction (mean over layers and seeds) vs training step."""
    plt = _pyplot()
    groups = _by_pos(results)
    fig, axes = _grid(plt, 2, len(groups))
    for col, (pos, variants) in enumerate(groups.items()):
        for variant, runs in variants.items():
            flows = [r["analysis"]["gradient_flow"] for r in runs]
            rms = _mean_series([[_mean(layers) for layers in f["logit_grad_rms"]] for f in flows])
            frac = _mean_series([[_mean(layers) for layers in f["vanish_frac"]] for f in flows])
            _line(axes[0][col], variant, flows[0]["steps"], rms, marker=".")
            _line(axes[1][col], variant, flows[0]["steps"], frac, marker=".")
        axes[0][col].set(title=f"RMS dL/dlogits ({pos})", xlabel="step", yscale="log")
        axes[1][col].set(title=f"fraction of vanishing logit gradients ({pos})", xlabel="step")
        axes[0][col].legend(fontsize=7)
    return _save(fig, path)


def plot_fade(results: dict, path: Path) -> Path:
    """Largest attention weight and attention entropy vs context length, one column per encoding."""
    plt = _pyplot()
    groups = _by_pos(results)
    lengths = results["settings"]["fade_lengths"]
    fig, axes = _grid(plt, 2, len(groups))
    for col, (pos, variants) in enumerate(groups.items()):
        for variant, runs in variants.items():
            fades = [r["analysis"]["fade"] for r in runs]
            _line(axes[0][col], variant, lengths, _mean_series([f["max_weight"] for f in fades]), marker="o")
            _line(axes[1][col], variant, lengths, _mean_series([f["entropy"] for f in fades]), marker="o")
        axes[0][col].plot(lengths, [1 / n for n in lengths], color="grey", linestyle=":", label="uniform 1/n")
        axes[1][col].plot(lengths, [math.log(n) for n in lengths], color="grey", linestyle=":", label="ln n")
        axes[0][col].set(title=f"largest attention weight ({pos})", xlabel="context length n", yscale="log")
        axes[1][col].set(title=f"attention entropy ({pos})", xlabel="context length n", ylabel="nats")
        for ax in axes[:, col]:
            _length_axis(ax, lengths)
        axes[0][col].legend(fontsize=7)
    return _save(fig, path)


def plot_retrieval(results: dict, path: Path) -> Path:
    """Needle accuracy vs length per variant."""
    plt = _pyplot()
    fig, axes = _grid(plt, 1, 1)
    ax = axes[0][0]
    r = results["settings"]["retrieval"]
    lengths = r["eval_lengths"]
    chance = None
    for variant, rows in _needles(results).items():
        rows = list(rows.values())
        chance = rows[0]["chance"]
        _line(ax, variant, lengths, _mean_series([[row["accuracy"][str(n)] for n in lengths] for row in rows]),
              marker="o")
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle=":", label="chance")
    ax.axvline(r["train_length"], color="grey", linestyle="--", linewidth=1)
    ax.set(title=f"needle retrieval accuracy{_seed_note(results)}", xlabel="context length", ylabel="accuracy",
           ylim=(0, 1.02))
    _length_axis(ax, lengths)
    ax.legend(fontsize=7)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


PLOTS: dict[str, Callable[[dict, Path], Path]] = {
    "loss_curves": plot_loss,
    "ppl_vs_length": plot_ppl,
    "gradient_flow": plot_gradient_flow,
    "attention_fade": plot_fade,
    "retrieval": plot_retrieval,
}


def write_report(out: str | Path, results: dict | None = None) -> list[Path]:
    """Write ``out/report.md`` and ``out/plots/*.png`` from ``results`` (default: ``out/results.json``).

    Returns the paths written, report.md first. Without matplotlib the report is written with a note
    and no plots (and a warning on stderr).
    """
    out = Path(out)
    results = load_results(out) if results is None else results
    plots: list[Path] = []
    note = None
    if results["runs"]:
        try:
            for name, plot in PLOTS.items():
                if name == "retrieval" and not results.get("retrieval"):
                    continue
                plots.append(plot(results, out / "plots" / f"{name}.png"))
        except ImportError as err:
            note = f"No plots: {err}. Then run `sasoftmax report {out}`."
            print(f"sasoftmax report: warning: {note}", file=sys.stderr)
    report = out / "report.md"
    text = markdown(results, plots, note)
    write_atomic(report, lambda tmp: tmp.write_text(text))
    return [report, *plots]


# ------------------------------------------------------------------------------------------ CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``sasoftmax report``."""
    parser.add_argument("dir", help="a directory written by `sasoftmax compare` (holding results.json)")


def run(args: argparse.Namespace) -> int:
    """Regenerate the report; 0 on success, 2 when DIR holds no usable results.json."""
    try:
        paths = write_report(args.dir)
    except ValueError as err:
        print(f"sasoftmax report: error: {err}", file=sys.stderr)
        return 2
    except (KeyError, TypeError, IndexError, AttributeError) as err:  # a results.json with missing or odd entries
        print(f"sasoftmax report: error: {Path(args.dir) / 'results.json'} is not usable: {type(err).__name__} "
              f"{err}", file=sys.stderr)  # fmt: skip
        return 2
    print(f"wrote {paths[0]} and {len(paths) - 1} plots")
    return 0
