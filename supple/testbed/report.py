"""Tables, JSON and plots of a demo run (``supple demo``)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import asdict

from .settings import Budget

# (column header, metric key in the summary, decimals); per-family accuracy columns are inserted at "acc"
_COLUMNS: list[tuple[str, str, int]] = [
    ("probe", "probe_final_loss", 3),
    ("acc", "acc", 2),
    ("ECE", "ece", 3),
    ("erank", "erank", 0),
    ("train s", "train/wall_s", 0),
]
COLUMN_HELP = {
    "probe": "plasticity probe after the stage: loss of a fresh LoRA after its steps on the primary probe family "
    "(word_codes: memorizing arbitrary codes, scored on the items it trained on; lower = adapts better)",
    "acc": "held-out accuracy (greedy generation, checked answer) per task family; OOD: the out-of-domain family",
    "CE": "held-out answer-token cross-entropy (teacher-forced) on the first stage's family: its rise after later "
    "stages is forgetting",
    "ECE": "expected calibration error of the answer tokens of the in-domain families (15 bins)",
    "erank": "effective rank of the last decoder block's output on general text (pydoc), without the first "
    "token (attention sink)",
    "train s": "wall time of the stage's training",
}


def _cols(summary: Sequence[dict], families: dict) -> list[tuple[str, str, int]]:
    cols = []
    for head, key, dec in _COLUMNS:
        if key == "acc":
            for fam in families.get("stages", []):
                cols.append((f"acc {fam[:5]}", f"acc/{fam}", 2))
            if families.get("ood"):
                cols.append(("OOD", f"acc/{families['ood']}", 2))
            for fam in families.get("stages", [])[:1]:
                cols.append((f"CE {fam}", f"answer_ce/{fam}", 2))
        else:
            cols.append((head, key, dec))
    return cols


def _fmt(m: dict | None, dec: int) -> str:
    if not m or m.get("mean") is None or not math.isfinite(m["mean"]):
        return "-"
    s = f"{m['mean']:.{dec}f}"
    if m.get("n", 1) > 1:
        s += f"±{m['std']:.{dec}f}"
    return s


def table_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    summary = results["summary"]
    cols = _cols(summary, results["meta"].get("families", {}))
    header = ["stage", "arm", *[c[0] for c in cols]]
    rows = []
    for g in summary:
        rows.append([g["stage"], g["arm"], *[_fmt(g["metrics"].get(key), dec) for _, key, dec in cols]])
    return header, rows


def format_table(results: dict) -> str:
    """A fixed-width text table: one row per (stage, arm), mean±std over seeds, and its legend."""
    header, rows = table_rows(results)
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) for i in range(len(header))]
    line = "  ".join(h.ljust(w) if i < 2 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths)))
    out = [line, "-" * len(line)]
    prev = None
    for r in rows:
        if prev is not None and r[0] != prev:
            out.append("")
        prev = r[0]
        out.append("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    out += ["", f"mean±std over training seeds {results['meta']['seeds']}"]
    out += [f"  {k}: {v}" for k, v in COLUMN_HELP.items()]
    return "\n".join(out)


def format_markdown(results: dict) -> str:
    header, rows = table_rows(results)
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def _stage_quality(results: dict) -> list[str]:
    lines = []
    for g in results["summary"]:
        m = g["metrics"]
        bits = []
        for key, label in (("train/loss_final", "train loss"), ("train/rewards/accuracies_final", "DPO reward acc"),
                           ("train/rewards/margins_final", "DPO margin"),
                           ("train/heldout/rewards/accuracies", "held-out reward acc"),
                           ("train/heldout/rewards/margins", "held-out margin"),
                           ("train/supple/diversity_final", "supple/diversity"),
                           ("train/supple/decorrelation_final", "supple/decorrelation"),
                           ("train/supple/cross_overlap_final", "supple/cross_overlap")):
            if key in m:
                bits.append(f"{label} {_fmt(m[key], 3)}")
        forget = [(k.split("/", 1)[1], v) for k, v in m.items() if k.startswith("forget_acc/")]
        for fam, v in forget:
            bits.append(f"forgetting {fam} (acc drop) {_fmt(v, 2)}")
        if bits:
            lines.append(f"- {g['stage']} / {g['arm']}: " + ", ".join(bits))
    return lines


def write_markdown(results: dict, path: str, plots: Sequence[str] = ()) -> str:
    meta = results["meta"]
    b = meta["budget"]
    lines = [
        "# supple demo",
        "",
        f"- model: {meta['model']} ("
        + (f"LoRA r{b['lora_r']}, merged after each stage" if meta["lora"] else "full fine-tuning") + ")",
        "- stages: " + " → ".join(
            "{name} ({kind} on {family}, {steps} steps, lr {lr:g})".format(**s) for s in meta["stages"]
        ),
        f"- budget: {b['name']}; batch {b['batch_size']}; seeds {meta['seeds']}; probes (rank {b['probe_rank']}) "
        f"{Budget.from_fields(b).describe_probes(meta['families'].get('probes', [meta['families']['probe']]))}"
        f" x {b.get('probe_seeds', 1)} probe seeds"
        + (f" (base model {b['probe_seeds_base']})" if b.get("probe_seeds_base") else "")
        + f"; {b['n_eval']} held-out items per family",
        f"- date: {meta['date']}; machine: {meta.get('machine', '?')}; device: {meta['device']} "
        f"({meta.get('workers', 1)} worker(s) x {meta['torch_threads']} threads); total {meta['total_s'] / 60:.1f} min",
    ]
    if meta.get("command"):
        lines.append(f"- command: `{meta['command']}`")
    from .verdict import verdict_markdown

    verdict = verdict_markdown(results)
    if verdict:
        lines += ["", "## Verdict (last stage, paired by training seed)", "", verdict]
    lines += ["", "## Per stage", "", format_markdown(results), "",
              f"Mean ± standard deviation over training seeds {meta['seeds']}.", ""]
    lines += [f"- **{k}**: {v}" for k, v in COLUMN_HELP.items()]
    q = _stage_quality(results)
    if q:
        lines += ["", "## Stage quality and forgetting", "", *q]
    if meta.get("notes"):
        lines += ["", "## Notes", "", *[f"- {n}" for n in meta["notes"]]]
    if meta.get("supple_configs"):
        first = next(iter(meta["supple_configs"].values()))
        from supple import SuppleConfig

        defaults = asdict(SuppleConfig())
        nondefault = {k: v for k, v in first.items() if k in defaults and v != defaults[k] and k != "previous_adapters"}
        lines += ["", f"supple arm (first stage): `{nondefault}`"]
    for p in plots:
        lines += ["", f"![{os.path.basename(p)}]({os.path.basename(p)})"]
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return path


_PLOT_METRICS = [
    ("erank", "erank, last block (no sink)"),
    ("anisotropy", "anisotropy, last block (no sink)"),
    ("probe_start_loss", "probe start loss"),
    ("probe_final_loss", "probe final loss (lower = more plastic)"),
    ("probe_improvement", "probe improvement"),
    ("probe_area", "probe area"),
    ("ece", "ECE (answer tokens)"),
    ("general_nll", "general-text loss (pydoc)"),
]


def plot_summary(results: dict, path: str) -> str:
    """A grid of metric-vs-stage panels, one line per arm (mean ± std over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = results["summary"]
    fams = results["meta"]["families"]
    metrics = [
        *_PLOT_METRICS[:6],
        *[(f"acc/{f}", f"accuracy {f}") for f in fams["stages"]],
        (f"acc/{fams['ood']}", f"OOD accuracy {fams['ood']}"),
        *[(f"answer_ce/{f}", f"answer CE {f} (forgetting)") for f in fams["stages"]],
        *_PLOT_METRICS[6:],
    ]
    stages = list(dict.fromkeys(g["stage"] for g in summary))
    arms = list(dict.fromkeys(g["arm"] for g in summary))
    metrics = [(k, t) for k, t in metrics if any(k in g["metrics"] for g in summary)]  # no empty panels
    ncol = 4
    nrow = math.ceil(len(metrics) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4 * ncol, 3 * nrow), squeeze=False)
    for ax, (key, title) in zip(axes.flat, metrics):
        for k, arm in enumerate(arms):
            xs, ys, es = [], [], []
            for i, st in enumerate(stages):
                g = next((g for g in summary if g["stage"] == st and g["arm"] == arm), None)
                m = g["metrics"].get(key) if g else None
                if m:
                    xs.append(i + (k - (len(arms) - 1) / 2) * 0.06)
                    ys.append(m["mean"])
                    es.append(m["std"])
            if xs:
                ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=arm)
        ax.set_title(title, fontsize=9)
        ax.set_xticks(range(len(stages)))
        ax.set_xticklabels(stages, fontsize=8)
        ax.grid(alpha=0.3)
        # every metric here is >= 0: start the axis at 0 so that small differences look small (accuracies 0-1)
        top = 1.02 if key.startswith("acc/") else max(ax.get_ylim()[1], 1e-9) * 1.05
        ax.set_ylim(0, top)
    for ax in list(axes.flat)[len(metrics) :]:
        fig.delaxes(ax)
    axes.flat[0].legend(fontsize=8)
    meta = results["meta"]
    fig.suptitle(f"supple demo: {meta['model']}, {'LoRA' if meta['lora'] else 'full FT'}; mean over training seeds "
                 f"{meta['seeds']}, error bars = standard deviation over those {len(meta['seeds'])} seeds",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_probe_curves(results: dict, path: str) -> str:
    """The probe's held-out loss curve after each stage, one panel per stage, one line per arm (seed mean)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = results["records"]
    stages = list(dict.fromkeys(r["stage"] for r in recs))
    arms = list(dict.fromkeys(r["arm"] for r in recs))
    fig, axes = plt.subplots(1, len(stages), figsize=(3.6 * len(stages), 3), squeeze=False, sharey=True)
    for ax, st in zip(axes.flat, stages):
        for arm in arms:
            rs = [r for r in recs if r["stage"] == st and r["arm"] == arm and "probe" in r]
            if not rs:
                continue
            steps = rs[0]["probe"]["eval_steps"]
            curves = [r["probe"]["eval_loss"] for r in rs if r["probe"]["eval_steps"] == steps]
            mean = [sum(c[i] for c in curves) / len(curves) for i in range(len(steps))]
            ax.plot(steps, mean, marker=".", label=arm)
        ax.set_title(f"after {st}", fontsize=9)
        ax.set_xlabel("probe step", fontsize=8)
        ax.grid(alpha=0.3)
    axes.flat[0].set_ylabel("held-out probe loss", fontsize=8)
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def read_measure_rows(demo_dir: str) -> list[dict] | None:
    """The measurement rows a demo wrote to ``demo_dir``/measure_records.json, or None when it wrote none. A file an
    earlier ``benchmarks/reprobe_demo.py`` wrote with the whole previous file nested as its ``records`` is read
    through to the rows."""
    import json

    path = os.path.join(demo_dir, "measure_records.json")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as fh:
        rows = json.load(fh).get("records", [])
    while isinstance(rows, dict):
        rows = rows.get("records", [])
    return rows


def write_outputs(results: dict, measure_rows: list[dict] | None, out: str) -> dict[str, str]:
    """Write results.json, measure_records.json, summary.md, table.txt, summary.png, probe_curves.png to ``out``
    (no measure_records.json when ``measure_rows`` is None: a re-analysis that has none keeps what is there)."""
    from .records import save_json

    os.makedirs(out, exist_ok=True)
    files = {
        "results": os.path.join(out, "results.json"),
        "measure_records": os.path.join(out, "measure_records.json"),
        "table": os.path.join(out, "table.txt"),
        "summary_md": os.path.join(out, "summary.md"),
        "summary_png": os.path.join(out, "summary.png"),
        "probe_png": os.path.join(out, "probe_curves.png"),
        "recovered_png": os.path.join(out, "recovered.png"),
    }
    results["meta"]["files"] = {k: os.path.basename(v) for k, v in files.items()}
    plots = []
    try:
        from .verdict import plot_recovered

        plots = [plot_summary(results, files["summary_png"]), plot_probe_curves(results, files["probe_png"])]
        if (results.get("analysis") or {}).get("arms") and len(results["analysis"]["arms"]) > 1:
            plots.insert(0, plot_recovered(results, files["recovered_png"]))
        else:
            files.pop("recovered_png")
            results["meta"]["files"].pop("recovered_png")
    except ImportError as exc:  # matplotlib is in the demo extra
        results["meta"].setdefault("notes", []).append(f"no plots: {exc} (pip install 'supple[demo]')")
        for k in ("summary_png", "probe_png", "recovered_png"):
            results["meta"]["files"].pop(k, None)
            files.pop(k, None)
    if measure_rows is None:
        files.pop("measure_records")
        results["meta"]["files"].pop("measure_records")
    save_json(results, files["results"])
    if measure_rows is not None:
        save_json({"meta": {k: results["meta"][k] for k in ("model", "date", "stages", "seeds", "arms")},
                   "records": measure_rows}, files["measure_records"])
    from .verdict import format_verdict

    with open(files["table"], "w") as fh:
        fh.write(format_verdict(results) + "\n\n" + format_table(results) + "\n")
    write_markdown(results, files["summary_md"], plots)
    return files
