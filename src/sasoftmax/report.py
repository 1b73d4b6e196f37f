"""``sasoftmax report DIR``: the report of a comparison (``report.md`` and ``plots/*.png``) from its
``results.json`` alone, so it can be regenerated (e.g. after installing matplotlib) without training.

The report opens with the full setup (sizes, parameter counts, tokens, optimiser, data and its
fingerprint, versions, commit, machine) and how far it is from the papers' scale, then sets each claim
of the two papers beside what the runs measured: per positional encoding, the variant's and softmax's
means with 95% intervals over seeds, the paired difference with its interval, and a verdict from that
interval (:data:`sasoftmax.analysis.statistics.VERDICT_RULE`). Per-seed values follow in tables and an
appendix. Plots need matplotlib and the intervals scipy (``pip install 'sasoftmax[harness]'``); without
matplotlib the markdown is still written, with a note.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

from .analysis.statistics import VERDICT_RULE, describe, interval_text, paired, verdict
from .files import write_atomic

BASELINE = "softmax"
VARIANT_LABELS = {
    "softmax": "softmax",
    "sa_norm": "SA-Softmax (norm)",
    "sa": "SA-Softmax (raw)",
    "ssmax": "SSMax",
    "ssmax_sa_norm": "SSMax + SA (norm)",
    "softmax_to_ssmax": "softmax → SSMax",
}
# Colour-blind-safe (Okabe-Ito) colours, and a line style and marker per variant, so that curves stay
# apart in greyscale and where they overlap.
STYLES = {
    "softmax": {"color": "#000000", "linestyle": "-", "marker": "o"},
    "sa_norm": {"color": "#0072B2", "linestyle": "--", "marker": "s"},
    "sa": {"color": "#56B4E9", "linestyle": ":", "marker": "^"},
    "ssmax": {"color": "#D55E00", "linestyle": "-", "marker": "D"},
    "ssmax_sa_norm": {"color": "#CC79A7", "linestyle": "-.", "marker": "v"},
    "softmax_to_ssmax": {"color": "#009E73", "linestyle": (0, (5, 1, 1, 1)), "marker": "P"},
}
PAPER_SCALE_PARAMETERS = 125e6
"""The smallest models of the papers' language-model experiments have about 125M parameters."""


def load_results(out: str | Path) -> dict:
    """``out/results.json`` as a dict; ValueError if it is missing or not a comparison's results."""
    out = Path(out)
    path = out / "results.json"
    if not path.is_file():
        if (out / "checkpoint.pt").is_file() or (out / "config.json").is_file():
            raise ValueError(f"{out} is a training run (written by `sasoftmax train`), not a comparison: "
                             f"`sasoftmax eval {out}` measures it; `sasoftmax compare --out NEW_DIR` writes a report")
        raise ValueError(f"{path} does not exist: `sasoftmax compare --out DIR` writes one (into a new or empty DIR)")
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(results, dict) or not isinstance(results.get("runs"), list) or "settings" not in results:
        raise ValueError(f"{path} is not the results of `sasoftmax compare` (no 'settings'/'runs')")
    return results


# ------------------------------------------------------------------------------------------ measures


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


def _mean(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


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


def measures(settings: dict) -> dict[str, tuple[str, str, Callable[[dict], float | None]]]:
    """name -> (what it is, number format, function of a run) for every per-run measure the report uses."""
    seq_len, longest_fade = settings["seq_len"], max(settings["fade_lengths"])

    def ppl(n: int) -> Callable[[dict], float | None]:
        return lambda run: run["eval"].get(str(n), {}).get("ppl")

    def flow(key: str) -> Callable[[dict], float | None]:
        return lambda run: run["analysis"]["gradient_flow"].get(key)

    def retained(run: dict) -> float | None:
        at_train, at_long = _fade_at(run, seq_len), _fade_at(run, longest_fade)
        return None if not at_train or at_long is None else at_long / at_train

    table = {f"ppl@{n}": (f"validation perplexity at length {n}", "{:.3f}", ppl(n)) for n in settings["eval_lengths"]}
    table.update({
        "train_loss": ("training loss over the last 10% of steps", "{:.4f}", _tail_loss),
        "logit_grad_rms": ("RMS of dL/dlogits, mean over layers and training", "{:.3g}", flow("mean_logit_grad_rms")),
        "vanish_frac": (f"fraction of logit gradients below {settings.get('gradient_threshold')}", "{:.2%}",
                        flow("mean_vanish_frac")),
        "fade_retained": (f"largest attention weight at n={longest_fade} over that at n={seq_len} "
                          f"(1 = no fade; uniform attention gives {seq_len / longest_fade:.3g})", "{:.3f}", retained),
    })
    return table


def _summary(per_seed: dict[int, float | None]) -> dict:
    """describe() of one (pos, variant, measure) cell, with the per-seed values keyed by seed."""
    stats = describe([per_seed[s] for s in sorted(per_seed)])
    stats["per_seed"] = {str(s): per_seed[s] for s in sorted(per_seed)}
    del stats["values"]
    return stats


def statistics(results: dict) -> dict:
    """Every number of the report: ``{"runs": {pos: {variant: {measure: {"per_seed", "mean", "low", "high", "n",
    "sd", "vs_softmax": paired difference}}}}, "retrieval": {variant: {"acc@n": {...}}}, "claims": [...]}``."""
    settings = results["settings"]
    table = measures(settings)
    groups = _groups(results)
    runs: dict = {}
    for (pos, variant), by_seed in groups.items():
        base = groups.get((pos, BASELINE), {})
        cells = {}
        for name, (_, _, fn) in table.items():
            ours = {s: fn(r) for s, r in by_seed.items()}
            cells[name] = _summary(ours)
            if variant != BASELINE and base:
                difference = paired(ours, {s: fn(r) for s, r in base.items()})
                cells[name]["vs_softmax"] = {k: v for k, v in difference.items() if k != "values"}
        runs.setdefault(pos, {})[variant] = cells
    needles: dict = {}
    table_n = _needles(results)
    for variant, by_seed in table_n.items():
        lengths = sorted({int(n) for row in by_seed.values() for n in row["accuracy"]})
        cells = {}
        for n in lengths:
            ours = {s: row["accuracy"].get(str(n)) for s, row in by_seed.items()}
            cells[f"acc@{n}"] = _summary(ours)
            if variant != BASELINE and BASELINE in table_n:
                base = {s: row["accuracy"].get(str(n)) for s, row in table_n[BASELINE].items()}
                cells[f"acc@{n}"]["vs_softmax"] = {k: v for k, v in paired(ours, base).items() if k != "values"}
        cells["final_loss"] = _summary({s: row["final_loss"] for s, row in by_seed.items()})
        needles[variant] = cells
    return {"runs": runs, "retrieval": needles, "claims": claims(results, runs, needles)}


# ------------------------------------------------------------------------------------------ claims

# (paper, claim, variant, measure key or a callable of settings giving it, the direction the paper claims)
CLAIMS: list[tuple[str, str, str, str, str]] = [
    ("SA-Softmax", "larger gradients reach the attention logits", "sa_norm", "logit_grad_rms", "higher"),
    ("SA-Softmax", "fewer vanishing logit gradients", "sa_norm", "vanish_frac", "lower"),
    ("SA-Softmax", "lower perplexity", "sa_norm", "ppl@L", "lower"),
    ("SA-Softmax", "better length extrapolation", "sa_norm", "ppl@8L", "lower"),
    ("SSMax", "attention does not fade with context length", "ssmax", "fade_retained", "higher"),
    ("SSMax", "faster loss reduction in pretraining", "ssmax", "train_loss", "lower"),
    ("SSMax", "better length generalisation", "ssmax", "ppl@8L", "lower"),
    ("SSMax", "switching from softmax to SSMax during pretraining brings part of the length generalisation",
     "softmax_to_ssmax", "ppl@8L", "lower"),
]


def _measure_key(key: str, settings: dict) -> str:
    if key == "ppl@L":
        return f"ppl@{settings['seq_len']}"
    if key == "ppl@8L":
        return f"ppl@{max(settings['eval_lengths'])}"
    return key


def claims(results: dict, runs: dict | None = None, needles: dict | None = None) -> list[dict]:
    """The papers' claims with what was measured, one row per claim and positional encoding:
    ``[{"paper", "claim", "variant", "measure", "what", "claimed", "pos", "ours", "softmax", "difference",
    "verdict", "also"}]`` (see :data:`~sasoftmax.analysis.statistics.VERDICT_RULE`)."""
    settings = results["settings"]
    if runs is None or needles is None:
        stats = statistics(results)
        return stats["claims"]
    table = measures(settings)
    rows = []
    for paper, claim, variant, key, claimed in CLAIMS:
        key = _measure_key(key, settings)
        what = table[key][0]
        base_row = {"paper": paper, "claim": claim, "variant": variant, "measure": key, "what": what,
                    "claimed": claimed}
        measured = [pos for pos in settings["pos"] if variant in runs.get(pos, {}) and BASELINE in runs.get(pos, {})]
        if not measured:
            rows.append({**base_row, "pos": None, "verdict": "not measured",
                         "note": f"needs the {variant} and softmax variants in the grid"})
            continue
        for pos in measured:
            cell = runs[pos][variant][key]
            row = {**base_row, "pos": pos, "ours": _public(cell), "softmax": _public(runs[pos][BASELINE][key]),
                   "difference": cell["vs_softmax"], "verdict": verdict(cell["vs_softmax"], claimed)}
            if variant == "softmax_to_ssmax" and "ssmax" in runs[pos]:
                row["also"] = {"variant": "ssmax", **_public(runs[pos]["ssmax"][key])}
            rows.append(row)
    rows.append(_retrieval_claim(results, needles))
    rows.append(_dapev2_claim(results, runs))
    return rows


def _public(cell: dict) -> dict:
    return {k: v for k, v in cell.items() if k != "vs_softmax"}


def _retrieval_claim(results: dict, needles: dict) -> dict:
    row = {"paper": "SSMax", "claim": "better key-information retrieval in long contexts", "variant": "ssmax",
           "claimed": "higher"}
    if "ssmax" not in needles or BASELINE not in needles:
        return {**row, "pos": None, "measure": "needle accuracy", "verdict": "not measured",
                "note": "the needle task did not run for ssmax and softmax"}
    r = results["settings"]["retrieval"]
    key = f"acc@{max(r['eval_lengths'])}"
    cell = needles["ssmax"][key]
    return {**row, "pos": r["pos"], "measure": key,
            "what": f"needle accuracy at n={max(r['eval_lengths'])} (trained at {r['train_length']})",
            "ours": _public(cell), "softmax": _public(needles[BASELINE][key]), "difference": cell["vs_softmax"],
            "verdict": verdict(cell["vs_softmax"], "higher")}


def _dapev2_claim(results: dict, runs: dict) -> dict:
    """Whether SA-Softmax's relative perplexity gain over softmax at the longest length is largest with
    DAPEV2-Kerple: the paired (per seed) difference of the gain there and with the best other encoding."""
    settings = results["settings"]
    key = f"ppl@{max(settings['eval_lengths'])}"
    row = {"paper": "SA-Softmax", "claim": "gains are largest with DAPEV2-Kerple", "variant": "sa_norm",
           "measure": key, "claimed": "higher", "pos": "dapev2_kerple"}
    gains: dict[str, dict[int, float]] = {}
    for pos, cells in runs.items():
        if "sa_norm" in cells and BASELINE in cells:
            ours, base = cells["sa_norm"][key]["per_seed"], cells[BASELINE][key]["per_seed"]
            gains[pos] = {int(s): 1 - ours[s] / base[s] for s in ours if s in base and ours[s] and base[s]}
    if "dapev2_kerple" not in gains or len(gains) < 2:
        return {**row, "verdict": "not measured",
                "note": "needs sa_norm and softmax with dapev2_kerple and another encoding (the gpu and paper "
                        "presets run it; `--pos` adds it)"}
    others = {p: g for p, g in gains.items() if p != "dapev2_kerple"}
    best = max(others, key=lambda p: _mean(list(others[p].values())) or -math.inf)
    difference = paired(gains["dapev2_kerple"], others[best])
    return {**row, "what": f"relative ppl gain of SA-Softmax (norm) over softmax at {key[4:]}: dapev2_kerple minus "
            f"the best other encoding ({best})", "ours": _summary(gains["dapev2_kerple"]),
            "softmax": _summary(others[best]), "versus": best,
            "difference": {k: v for k, v in difference.items() if k != "values"},
            "verdict": verdict(difference, "higher")}


# ------------------------------------------------------------------------------------------ markdown


def _label(variant: str) -> str:
    return VARIANT_LABELS.get(variant, variant)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _format_of(row: dict, settings: dict) -> str:
    if row["measure"].startswith("acc@"):
        return "{:.1%}"
    if row["claim"] == "gains are largest with DAPEV2-Kerple":
        return "{:+.1%}"
    return measures(settings)[row["measure"]][1]


def _difference_text(difference: dict, fmt: str) -> str:
    text = interval_text(difference, fmt, signed=True)
    if difference.get("relative") is not None and "%" not in fmt:
        mean = text.split(" [")[0]
        text = text.replace(mean, f"{mean} ({difference['relative']:+.1%})", 1)
    return text


def summary(rows: list[dict]) -> str:
    """One plain sentence per verdict: which claims (and with which encodings) held at this scale."""
    groups: dict[str, list[str]] = {}
    for row in rows:
        where = f" ({row['pos']})" if row.get("pos") else ""
        groups.setdefault(row["verdict"], []).append(f"{row['paper']}: {row['claim']}{where}")
    parts = []
    for word, title in (("reproduced", "Reproduced here"), ("contradicted", "Contradicted here"),
                        ("inconclusive", "Inconclusive (the interval contains 0)"), ("not measured", "Not measured")):
        if word in groups:
            parts.append(f"**{title}:** " + "; ".join(groups[word]) + ".")
    return "In short. " + " ".join(parts)


def _count(n: float) -> str:
    """12,345 or 16.4 M."""
    return f"{n / 1e6:.3g} M" if n >= 1e6 else f"{int(n):,}"


def _setup_lines(results: dict) -> list[str]:
    s, setup = results["settings"], results.get("setup") or {}
    model, machine = setup.get("model", {}), setup.get("machine", results.get("machine", {}))
    params = sorted({r["parameters"] for r in results["runs"] if r.get("parameters")})
    seeds = _seeds(results)
    rows = []
    if model:
        head_dim = model["n_embd"] // model["n_head"]
        rows.append(["model", f"decoder LM, {model['n_layer']} layers × width {model['n_embd']}, {model['n_head']} "
                              f"heads of {head_dim}, MLP ×{model['mlp_ratio']}, byte vocabulary (256), dropout "
                              f"{model['dropout']}"])
    if params:
        rows.append(["parameters", f"{params[0]:,}" if len(params) == 1 else
                     f"{params[0]:,} – {params[-1]:,} (positional encodings and SSMax add a few)"])
    if model:
        tokens = setup.get("tokens_per_run")
        rows.append(["training", f"{model['steps']} steps × {model['batch_size'] * model['grad_accum']} sequences × "
                                 f"{model['seq_len']} tokens = {_count(tokens)} tokens per run (L = "
                                 f"{model['seq_len']})"])
        rows.append(["optimiser", f"{setup.get('optimizer', 'AdamW')}; peak lr {model['lr']}, min lr "
                                  f"{model['min_lr']}, warmup {model['warmup']} steps, weight decay "
                                  f"{model['weight_decay']}, clip {model['grad_clip']}"])
    data = setup.get("data")
    if data:
        rows.append(["data", f"{data['description']}: {_count(data['train_tokens'])} training / "
                             f"{_count(data['val_tokens'])} validation bytes; SHA-256 fingerprint "
                             f"{data['fingerprint'][:16]}…"])
    else:
        rows.append(["data", "the Python standard library" if s["data"] is None else str(s["data"])])
    rows.append(["grid", f"{len(s['variants'])} variants ({', '.join(s['variants'])}) × {len(s['pos'])} positional "
                         f"encodings ({', '.join(s['pos'])}) × {len(seeds)} seeds ({', '.join(map(str, seeds))}) = "
                         f"{len(results['runs'])} runs"])
    rows.append(["SSMax", f"learnable s per head, initialised to {s['ssmax_init']}; softmax → SSMax trains softmax for "
                          f"{s.get('switch_step', '?')} of {s['steps']} steps, then SSMax from s = 1/ln {s['seq_len']} "
                          f"= {1 / math.log(s['seq_len']):.3f}"])
    rows.append(["evaluation", f"perplexity at {', '.join(map(str, s['eval_lengths']))} on up to "
                               f"{s['eval_tokens']} validation tokens per length; fade at n = "
                               f"{', '.join(map(str, s['fade_lengths']))} ({s['fade_samples']} windows each); "
                               f"gradient flow every {s['hook_every']} steps"])
    versions = setup.get("versions") or {"torch": machine.get("torch")}
    rows.append(["software", ", ".join(f"{k} {v}" for k, v in versions.items() if v) +
                 f"; Python {machine.get('python', '?')}; commit {setup.get('commit') or 'unknown'}"])
    where = machine.get("gpu") or f"{machine.get('cpu', '?')}, {machine.get('cores', '?')} cores"
    rows.append(["machine", f"{where} ({machine.get('platform', '?')}); {machine.get('jobs', 1)} task(s) at once, "
                            f"{machine.get('threads', '?')} torch thread(s) each"
                 + (f"; {machine['world_size']} processes (torchrun)" if machine.get("world_size", 1) > 1 else "")])
    rows.append(["generated", f"{results.get('created', '?')}, {results.get('seconds', 0):.0f} s of compute in "
                              "the last invocation (runs reused from an earlier one are not counted)"])
    lines = ["## Setup", "", _table(["", ""], rows), ""]
    if params and model:
        tokens = setup.get("tokens_per_run") or 0
        lines += [
            f"**Scale.** These models have {_count(params[0])} parameters, about "
            f"{PAPER_SCALE_PARAMETERS / params[0]:.0f}× fewer than the smallest models of the papers' language-model "
            f"experiments (about 125M parameters; SA-Softmax goes up to 2.7B), and each saw {_count(tokens)} "
            "tokens where those are trained on billions. Verdicts here hold for this scale only"
            + (": one seed of the mid size (the gpu preset, 6 layers × 384, 1000 steps at length 512) put "
               "SA-Softmax (norm) ahead of softmax with RoPE at the training length (ppl 2.752 vs 2.831), where "
               "the quick preset puts it behind." if s["preset"] in ("smoke", "quick") else "."),
            "",
        ]
    return lines


def _notes(results: dict, stats: dict) -> list[str]:
    """Findings the claims table does not cover, detected from the numbers."""
    notes = []
    s = results["settings"]
    needles = stats["retrieval"]
    if needles:
        r = s["retrieval"]
        for variant, cells in needles.items():
            at_train = cells.get(f"acc@{r['train_length']}", {}).get("mean")
            if at_train is not None and at_train < 0.9:
                notes.append(f"{_label(variant)} did not learn the needle task even at its training length "
                             f"({r['train_length']}): accuracy {at_train:.1%}, final training loss "
                             f"{cells['final_loss']['mean']:.3f} (guessing gives ln {int(1 / _chance(results))} = "
                             f"{math.log(1 / _chance(results)):.3f}); its long-context accuracy says nothing about "
                             "fading.")
    for pos, cells in stats["runs"].items():
        for variant in ("ssmax", "ssmax_sa_norm", "softmax_to_ssmax"):
            diff = cells.get(variant, {}).get("vanish_frac", {}).get("vs_softmax")
            if diff and verdict(diff, "higher") == "reproduced":
                ours, base = cells[variant]["vanish_frac"]["mean"], cells[BASELINE]["vanish_frac"]["mean"]
                notes.append(f"{_label(variant)} *raises* the fraction of vanishing logit gradients with {pos} "
                             f"({ours:.1%} vs softmax {base:.1%}, interval excludes 0): its sharper attention "
                             "saturates the softmax, the very effect SA-Softmax targets.")
        for variant, by_measure in cells.items():
            diff = by_measure.get(f"ppl@{s['seq_len']}", {}).get("vs_softmax")
            worse = diff is not None and verdict(diff, "higher") == "reproduced" and (diff.get("relative") or 0) > 0.1
            if variant != BASELINE and worse:
                key = f"ppl@{s['seq_len']}"
                notes.append(f"{_label(variant)} with {pos} is {diff['relative']:.0%} *worse* than softmax at the "
                             f"training length ({interval_text(by_measure[key], '{:.3f}')} vs "
                             f"{interval_text(cells[BASELINE][key], '{:.3f}')}).")
    lines = ["## Findings the claims do not cover", ""]
    lines += [f"- {note}" for note in notes] or ["- None detected (checked: needle task learnt at the training "
                                                 "length; SSMax and vanishing gradients; perplexity 10% worse "
                                                 "than softmax)."]
    lines += [
        "",
        "**How to read the measures.** *Attention fade* is the largest attention weight of the last query of "
        "windows of n validation tokens (it attends to exactly n keys), averaged over windows, heads and layers. "
        "For the SA variants this is the weight w = factor · p that multiplies the values, *not renormalised*: "
        "`sa_norm` weights lie in [0, p] and their row sums are ≤ 1, and raw `sa` weights x·p can be negative or "
        "above 1, so their fade compares the size of the largest contribution, not a probability; the entropy "
        "uses |w| / Σ|w|. *Gradient flow*: RMS of dL/dx over allowed (query, key) entries, x the final logits, "
        "per-token loss, measured on a training batch every few steps on the eager backend. The SA-Softmax (norm) "
        "weight (x − m)/(M − m + ε)·p divides by the logit range M − m, so its logit gradients are large when the "
        "logits span a small range (as early in training): larger gradients are what the paper claims, but they "
        "are partly a matter of scale.",
        "",
    ]
    return lines


def _chance(results: dict) -> float:
    rows = results.get("retrieval") or [{"chance": 1 / 16}]
    return rows[0]["chance"]


def _cell(stats: dict, fmt: str) -> str:
    """mean [95% interval]; fractions (formatted as %) have their interval clipped to [0, 1]."""
    return interval_text(stats, fmt, bounds=(0.0, 1.0) if fmt.endswith("%}") and "+" not in fmt else None)


def markdown(results: dict, plots: list[Path], plot_note: str | None = None) -> str:
    """The text of report.md."""
    s = results["settings"]
    stats = statistics(results)
    seeds = _seeds(results)
    rows = stats["claims"]
    table = measures(s)
    lines = [
        "# sasoftmax compare: softmax vs SA-Softmax vs SSMax",
        "",
        f"Preset `{s['preset']}`. Runs of one seed share initialisation seed, data order and budget; only the "
        "attention differs. Numbers are means over seeds with their 95% t-interval in brackets "
        f"([low, high], {len(seeds)} seeds, Student's t with {len(seeds) - 1} degrees of freedom); differences "
        "are paired by seed (variant − softmax). Intervals of fractions (percentages) are clipped to [0, 100%].",
        "",
        *_setup_lines(results),
        "## The papers' claims beside what we measured",
        "",
        VERDICT_RULE,
        "",
    ]
    claim_rows = []
    for row in rows:
        if row["verdict"] == "not measured":
            claim_rows.append([row["paper"], row["claim"], row.get("pos") or "–", row.get("what", row["measure"]),
                               "–", "–", row.get("note", "–"), "not measured"])
            continue
        fmt = _format_of(row, s)
        ours = _cell(row["ours"], fmt)
        if row.get("also"):
            ours += f"; SSMax from scratch {_cell(row['also'], fmt)}"
        base_label = f"{row['versus']}" if row.get("versus") else "softmax"
        claim_rows.append([
            row["paper"], row["claim"], row["pos"], row["what"], f"{_label(row['variant'])}: {ours}",
            f"{base_label}: {_cell(row['softmax'], fmt)}", _difference_text(row["difference"], fmt),
            f"**{row['verdict']}**",
        ])
    lines += [
        _table(["paper", "claim", "pos", "measure", "variant [95% CI]", "baseline [95% CI]",
                "paired difference [95% CI]", "verdict"], claim_rows),
        "",
        summary(rows),
        "",
        *_notes(results, stats),
    ]
    lengths = s["eval_lengths"]
    ppl_rows = []
    for pos, cells in stats["runs"].items():
        for variant, by_measure in cells.items():
            ppl_rows.append([pos, _label(variant)] + [_cell(by_measure[f"ppl@{n}"], "{:.3f}") for n in lengths]
                            + [_cell(by_measure["train_loss"], "{:.4f}")])
    lines += [
        "## Perplexity vs evaluation length",
        "",
        _table(["pos", "variant", *[f"ppl@{n}" for n in lengths], "train loss (last 10%)"], ppl_rows),
        "",
        "## Gradient flow into attention (during training)",
        "",
        f"Means over layers and the measured steps (every {s['hook_every']} steps); an entry vanishes below "
        f"{s.get('gradient_threshold')}.",
        "",
        _table(["pos", "variant", "RMS dL/dlogits", "vanishing"],
               [[pos, _label(v), _cell(c["logit_grad_rms"], "{:.3g}"), _cell(c["vanish_frac"], "{:.2%}")]
                for pos, cells in stats["runs"].items() for v, c in cells.items()]),
        "",
        "## Attention fade: largest weight of the last query vs context length n",
        "",
    ]
    fade_lengths = s["fade_lengths"]
    groups = _groups(results)
    fade_rows = []
    for (pos, variant), runs in groups.items():
        fades = [r["analysis"]["fade"] for r in runs.values()]
        cells = [_cell(describe([f["max_weight"][i] for f in fades]), "{:.3f}") for i in range(len(fade_lengths))]
        entropy = _mean([f["entropy"][-1] for f in fades])
        fade_rows.append([pos, _label(variant), *cells, _cell(stats["runs"][pos][variant]["fade_retained"], "{:.3f}"),
                          f"{entropy:.2f} / {math.log(fade_lengths[-1]):.2f}"])
    lines += [_table(["pos", "variant", *[f"n={n}" for n in fade_lengths], "retained (n=max / n=L)",
                      f"entropy at n={fade_lengths[-1]} / ln n"], fade_rows), ""]
    learned = [(key, runs) for key, runs in groups.items() if any(r.get("ssmax_s") for r in runs.values())]
    if learned:
        parts = []
        for (pos, variant), runs in learned:
            per_layer = [[sum(v) / len(v) for v in r["ssmax_s"]] for r in runs.values() if r.get("ssmax_s")]
            layers = [sum(col) / len(col) for col in zip(*per_layer)]
            parts.append(f"{pos}/{variant}: " + ", ".join(f"{v:.3f}" for v in layers))
        lines += ["Learned SSMax s (mean over heads and seeds, per layer): " + "; ".join(parts), ""]
    if stats["retrieval"]:
        r = s["retrieval"]
        needle_lengths = r["eval_lengths"]
        lines += [
            "## Needle retrieval: trained at one length, tested at longer ones",
            "",
            f"A {r['n_layer']}-layer, width-{r['n_embd']} model per variant and seed ({r['pos']}), {r['steps']} "
            f"steps at length {r['train_length']}; accuracy over {r['samples']} windows per length (chance "
            f"{_chance(results):.1%}).",
            "",
            _table(["variant", *[f"acc@{n}" for n in needle_lengths], "final train loss"],
                   [[_label(v)] + [_cell(c[f"acc@{n}"], "{:.1%}") for n in needle_lengths]
                    + [_cell(c["final_loss"], "{:.3f}")] for v, c in stats["retrieval"].items()]),
            "",
        ]
    lines += _per_seed_lines(results, table)
    lines += ["## Plots", ""]
    if plot_note:
        lines += [plot_note, ""]
    lines += [f"![{p.stem}](plots/{p.name})" for p in plots]
    return "\n".join(lines) + "\n"


def _per_seed_lines(results: dict, table: dict) -> list[str]:
    s = results["settings"]
    keys = [f"ppl@{s['seq_len']}", f"ppl@{max(s['eval_lengths'])}", "train_loss", "logit_grad_rms", "vanish_frac",
            "fade_retained"]
    rows = []
    for run in results["runs"]:
        rows.append([run["pos"], _label(run["variant"]), str(run.get("seed", 0))]
                    + ["–" if (v := table[k][2](run)) is None else table[k][1].format(v) for k in keys])
    lines = ["## Appendix: every run", "", _table(["pos", "variant", "seed", *keys], rows), ""]
    if results.get("retrieval"):
        lengths = s["retrieval"]["eval_lengths"]
        lines += [_table(["needle variant", "seed", *[f"acc@{n}" for n in lengths], "final train loss"],
                         [[_label(row["variant"]), str(row.get("seed", 0))]
                          + [f"{row['accuracy'][str(n)]:.1%}" for n in lengths] + [f"{row['final_loss']:.3f}"]
                          for row in results["retrieval"]]), ""]
    return lines


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


def _columns(panels: int) -> int:
    return min(panels, 4)


def _panel_grid(plt, panels: int, rows_per_panel: int = 1, sharey: str | bool = "row"):
    """A figure with one cell of ``rows_per_panel`` stacked axes per panel, ≤ 4 panels a row; returns
    (fig, [[axes of panel 0], [axes of panel 1], ...]) with unused axes hidden."""
    cols = _columns(panels)
    grid_rows = math.ceil(panels / cols)
    fig, axes = plt.subplots(grid_rows * rows_per_panel, cols, figsize=(4.3 * cols, 3.0 * grid_rows * rows_per_panel),
                             squeeze=False, sharey=sharey)
    cells = []
    for i in range(grid_rows * cols):
        r, c = divmod(i, cols)
        stack = [axes[r * rows_per_panel + k][c] for k in range(rows_per_panel)]
        if i < panels:
            cells.append(stack)
        else:
            for ax in stack:
                ax.set_visible(False)
    return fig, cells


def _style(variant: str, markers: bool = True) -> dict:
    style = dict(STYLES.get(variant, {"color": "grey", "linestyle": "-", "marker": "x"}))
    if not markers:
        style.pop("marker")
    return style


def _columnwise(
    series: list[list[float]], log: bool = False, bounds: tuple[float, float] | None = None
) -> tuple[list[float], list[float | None], list[float | None]]:
    """Mean and 95% interval bounds, column by column, of equally long series (one per seed). ``log``: of
    log10 of the values, returned as the geometric mean and its interval (for positive values on a log
    axis); ``bounds`` clips the interval (fractions)."""
    if log:
        series = [[math.log10(v) if v and v > 0 else math.nan for v in row] for row in series]
    stats = [describe(list(column)) for column in zip(*series)]
    mean, low, high = [s["mean"] for s in stats], [s["low"] for s in stats], [s["high"] for s in stats]
    if log:
        mean, low, high = ([None if v is None else 10**v for v in seq] for seq in (mean, low, high))
    if bounds is not None:
        low = [None if v is None else max(bounds[0], v) for v in low]
        high = [None if v is None else min(bounds[1], v) for v in high]
    return mean, low, high


def _plot_band(ax, variant: str, xs, series: list[list[float]], markers: bool = False, log: bool = False,
               bounds: tuple[float, float] | None = None, **kw) -> None:
    """Mean line over seeds with its 95% interval as a band (no band with one seed); ``log``: geometric."""
    mean, low, high = _columnwise(series, log, bounds)
    style = _style(variant, markers)
    ax.plot(xs, mean, label=_label(variant), linewidth=1.4, markersize=4, **style, **kw)
    if all(v is not None for v in low):
        ax.fill_between(xs, low, high, color=style["color"], alpha=0.15, linewidth=0)


def _plot_bars(ax, variant: str, xs, series: list[list[float]], index: int, count: int,
               bounds: tuple[float, float] | None = None) -> None:
    """Mean over seeds at each x with 95%-interval error bars, dodged sideways (log-2 x axis) so that
    variants at one x do not hide each other."""
    mean, low, high = _columnwise(series, bounds=bounds)
    shift = 2 ** (0.05 * (index - (count - 1) / 2))
    xs = [x * shift for x in xs]
    style = _style(variant)
    errors = None
    if all(v is not None for v in low):
        errors = [[m - lo for m, lo in zip(mean, low)], [hi - m for m, hi in zip(mean, high)]]
    ax.errorbar(xs, mean, yerr=errors, label=_label(variant), capsize=2.5, linewidth=1.2, markersize=4, **style)


def _length_axis(ax, lengths: list[int]) -> None:
    """Log-2 x axis labelled with the lengths themselves."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths)
    ax.set_xticklabels([str(n) for n in lengths], fontsize=7)
    ax.minorticks_off()


def _finish(fig, results: dict, title: str, path: Path) -> Path:
    """A figure title saying what is averaged, one legend below the panels (covering no data), and save."""
    seeds = _seeds(results)
    spread = "; bands and bars: 95% t-interval over seeds" if len(seeds) > 1 else ""
    width_in = fig.get_size_inches()[0]
    title = textwrap.fill(title, width=int(width_in * 13))
    fig.suptitle(f"{title}\n{results['settings']['preset']} preset, mean of {len(seeds)} seed"
                 f"{'s' if len(seeds) > 1 else ''}{spread}", fontsize=10)
    handles, labels = {}, []
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            if label not in handles:
                handles[label] = handle
                labels.append(label)
    columns = max(1, min(len(labels), int(width_in / 1.9)))
    rows = math.ceil(len(labels) / columns)
    legend_in, title_in = 0.22 * rows + 0.1, 0.18 * (title.count("\n") + 2)  # inches for the legend, the title
    height_in = fig.get_size_inches()[1] + legend_in + title_in
    fig.set_size_inches(width_in, height_in)
    fig.legend([handles[label] for label in labels], labels, loc="lower center", ncol=columns, fontsize=8,
               frameon=False)
    fig.tight_layout(rect=(0, legend_in / height_in, 1, 1))  # tight_layout leaves room for the suptitle
    return _save(fig, path)


def _smooth(values: list[float], window: int) -> list[float]:
    """Centred moving average (shorter windows at the ends)."""
    half = window // 2
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - half) : i + half + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def plot_loss(results: dict, path: Path) -> Path:
    """Training loss vs step (top) and its paired difference to softmax (bottom), per positional encoding."""
    plt = _pyplot()
    groups = _by_pos(results)
    fig, cells = _panel_grid(plt, len(groups), rows_per_panel=2, sharey=False)
    window = 9
    for (top, bottom), (pos, variants) in zip(cells, groups.items()):
        base = {r.get("seed", 0): _smooth(r["train"]["loss"], window) for r in variants.get(BASELINE, [])}
        low_y, high_y = math.inf, -math.inf
        for variant, runs in variants.items():
            steps = runs[0]["train"]["step"]
            curves = [_smooth(r["train"]["loss"], window) for r in runs]
            _plot_band(top, variant, steps, curves)
            skip = len(steps) // 5  # the first fifth falls steeply; the y range shows the rest
            low_y = min(low_y, *(min(c[skip:]) for c in curves))
            high_y = max(high_y, *(max(c[skip:]) for c in curves))
            if variant != BASELINE and base:
                diffs = [[a - b for a, b in zip(_smooth(r["train"]["loss"], window), base[r.get("seed", 0)])]
                         for r in runs if r.get("seed", 0) in base]
                if diffs:
                    _plot_band(bottom, variant, steps, diffs)
        margin = 0.05 * (high_y - low_y)
        top.set_ylim(low_y - margin, high_y + margin)
        top.set(title=f"{pos}", xlabel="training step", ylabel="training loss (nats/token)")
        bottom.axhline(0, color="#000000", linewidth=0.8)
        switch = results["settings"].get("switch_step")
        switched = switch is not None and "softmax_to_ssmax" in variants
        if switched:
            bottom.axvline(switch, color=STYLES["softmax_to_ssmax"]["color"], linestyle=":", linewidth=1)
        bottom.set(xlabel="training step", ylabel="loss − softmax's (nats/token)")
        bottom.set_title(f"{pos}: difference to softmax, paired by seed", fontsize=9)
    note = "; dotted: where softmax → SSMax switches" if "softmax_to_ssmax" in results["settings"]["variants"] else ""
    return _finish(fig, results, f"Training loss (moving average over {window} logged steps; below 0 in the lower "
                   f"panels = lower loss than softmax{note})", path)


def plot_ppl(results: dict, path: Path) -> Path:
    """Validation perplexity vs evaluation length, one panel per encoding, shared log y axis."""
    plt = _pyplot()
    groups = _by_pos(results)
    lengths = results["settings"]["eval_lengths"]
    fig, cells = _panel_grid(plt, len(groups), sharey=True)
    for (ax,), (pos, variants) in zip(cells, groups.items()):
        for i, (variant, runs) in enumerate(variants.items()):
            _plot_bars(ax, variant, lengths, [[r["eval"][str(n)]["ppl"] for n in lengths] for r in runs],
                       i, len(variants))
        ax.axvline(results["settings"]["seq_len"], color="grey", linestyle=":", linewidth=1)
        ax.set(title=f"{pos} (dotted: training length)", xlabel="evaluation length (tokens)")
        _length_axis(ax, lengths)
        ax.tick_params(axis="y", labelleft=True)
    # One y range for every panel (shared axes); a log scale only when it spans more than a factor of 3,
    # so that small differences are not magnified and large ones not squeezed.
    values = [r["eval"][str(n)]["ppl"] for r in results["runs"] for n in lengths]
    axis = cells[0][0]
    if max(values) > 3 * min(values):
        axis.set_yscale("log")
        from matplotlib.ticker import LogLocator, ScalarFormatter

        axis.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        axis.yaxis.set_major_formatter(ScalarFormatter())
        axis.yaxis.set_minor_formatter(ScalarFormatter() if max(values) < 10 * min(values) else "")
    for (ax,) in cells:
        ax.set_ylabel("validation perplexity" + (" (log scale)" if axis.get_yscale() == "log" else ""))
    return _finish(fig, results, "Perplexity vs evaluation length", path)


def plot_gradient_flow(results: dict, path: Path) -> Path:
    """RMS logit gradient and vanishing fraction (mean over layers) vs training step, per encoding."""
    plt = _pyplot()
    groups = _by_pos(results)
    threshold = results["settings"].get("gradient_threshold")
    fig, cells = _panel_grid(plt, len(groups), rows_per_panel=2)
    for (top, bottom), (pos, variants) in zip(cells, groups.items()):
        for variant, runs in variants.items():
            flows = [r["analysis"]["gradient_flow"] for r in runs]
            rms = [[_mean(layers) for layers in f["logit_grad_rms"]] for f in flows]
            frac = [[_mean(layers) for layers in f["vanish_frac"]] for f in flows]
            _plot_band(top, variant, flows[0]["steps"], rms, markers=True, log=True)
            _plot_band(bottom, variant, flows[0]["steps"], frac, markers=True, bounds=(0.0, 1.0))
        top.set(title=pos, xlabel="training step", ylabel="RMS of dL/dlogits (per token)\ngeometric mean over seeds",
                yscale="log")
        bottom.set(xlabel="training step", ylabel=f"fraction with |dL/dlogits| < {threshold}")
        bottom.set_title(f"{pos}: vanishing logit gradients", fontsize=8)
        for ax in (top, bottom):
            ax.tick_params(axis="y", labelleft=True)
    return _finish(fig, results, "Gradient flow into the attention logits (mean over layers)", path)


def plot_fade(results: dict, path: Path) -> Path:
    """Largest attention weight and attention entropy vs context length, per encoding (shared y per row)."""
    plt = _pyplot()
    groups = _by_pos(results)
    lengths = results["settings"]["fade_lengths"]
    fig, cells = _panel_grid(plt, len(groups), rows_per_panel=2)
    for (top, bottom), (pos, variants) in zip(cells, groups.items()):
        for variant, runs in variants.items():
            fades = [r["analysis"]["fade"] for r in runs]
            _plot_band(top, variant, lengths, [f["max_weight"] for f in fades], markers=True)
            _plot_band(bottom, variant, lengths, [f["entropy"] for f in fades], markers=True)
        top.plot(lengths, [1 / n for n in lengths], color="grey", linestyle=":", label="uniform weights (1/n, ln n)")
        bottom.plot(lengths, [math.log(n) for n in lengths], color="grey", linestyle=":")
        top.axvline(results["settings"]["seq_len"], color="grey", linestyle="--", linewidth=0.8)
        bottom.axvline(results["settings"]["seq_len"], color="grey", linestyle="--", linewidth=0.8)
        top.set(title=f"{pos} (dashed: training length)", xlabel="context length n (keys)",
                ylabel="largest attention weight")
        bottom.set(xlabel="context length n (keys)", ylabel="attention entropy (nats)")
        bottom.set_title(f"{pos}: entropy of the last query's weights", fontsize=8)
        for ax in (top, bottom):
            _length_axis(ax, lengths)
            ax.tick_params(axis="y", labelleft=True)
    return _finish(fig, results, "Attention fade of the last query (mean over layers and heads)", path)


def plot_retrieval(results: dict, path: Path) -> Path:
    """Needle accuracy vs length per variant, with 95%-interval error bars."""
    plt = _pyplot()
    fig, cells = _panel_grid(plt, 1)
    ax = cells[0][0]
    r = results["settings"]["retrieval"]
    lengths = r["eval_lengths"]
    needles = _needles(results)
    for i, (variant, rows) in enumerate(needles.items()):
        _plot_bars(ax, variant, lengths, [[row["accuracy"][str(n)] for n in lengths] for row in rows.values()],
                   i, len(needles), bounds=(0.0, 1.0))
    ax.axhline(_chance(results), color="grey", linestyle=":", label="chance")
    ax.axvline(r["train_length"], color="grey", linestyle="--", linewidth=1)
    ax.set(title=f"{r['n_layer']}-layer needle model, {r['pos']} (dashed: training length)",
           xlabel="context length (tokens)", ylabel="accuracy", ylim=(0, 1.05))
    _length_axis(ax, lengths)
    fig.set_size_inches(7, 4.4)
    return _finish(fig, results, "Needle retrieval", path)


def _save(fig, path: Path) -> Path:
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
