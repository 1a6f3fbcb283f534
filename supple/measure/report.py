"""Writing measurement records: CSV, JSON, PNG plots (metric vs layer, one line per model), Markdown."""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from .records import RECORD_FIELDS

__all__ = ["plot_records", "read_records_json", "write_records_csv", "write_records_json", "write_summary"]

GEOMETRY_PLOTS = (
    "erank",
    "erank_ratio",
    "participation_ratio",
    "top_pc_share",
    "anisotropy",
    "anisotropy_centered",
)
OVERVIEW = (  # (group, metric, tokens, space, title)
    ("geometry", "erank_ratio", "no_sink", "unit", "effective rank / min(n-1, d)\n(unit vectors, no sink)"),
    ("geometry", "participation_ratio", "no_sink", "unit", "participation ratio\n(unit vectors, no sink)"),
    ("geometry", "anisotropy", "no_sink", "raw", "anisotropy (mean cosine)\n(no sink)"),
    ("geometry", "norm_max_over_median", "all", "raw", "max / median token norm\n(all tokens)"),
    ("trajectory", "cos_prev", "no_sink", None, "cosine to previous block\n(no sink)"),
    (
        "trajectory",
        "lens_agreement",
        "no_sink",
        None,
        "logit-lens top-1 agreement\nwith final layer (no sink)",
    ),
)


def _columns(records: Sequence[dict]) -> list[str]:
    extra = sorted({k for r in records for k in r} - set(RECORD_FIELDS))
    return list(RECORD_FIELDS) + extra


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def write_records_csv(records: Sequence[dict], path) -> Path:
    """CSV with the standard columns first (missing values empty, NaN as ``nan``)."""
    path = Path(path)
    cols = _columns(records)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, restval="")
        w.writeheader()
        for r in records:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})
    return path


def write_records_json(records: Sequence[dict], path, meta: dict | None = None) -> Path:
    """``{"meta": ..., "records": [...]}`` as strict JSON (NaN / inf written as null)."""
    path = Path(path)
    doc = {"meta": meta or {}, "records": [{k: _clean(v) for k, v in r.items()} for r in records]}
    path.write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    return path


def read_records_json(path) -> list[dict]:
    """Records written by :func:`write_records_json` (null values back as NaN)."""
    doc = json.loads(Path(path).read_text(encoding="utf-8"))
    out = []
    for r in doc["records"]:
        r = dict(r)
        if r.get("value") is None:
            r["value"] = float("nan")
        out.append(r)
    return out


def _models(records) -> list[str]:
    return list(dict.fromkeys(r["model"] for r in records))


def _series(records, group, metric, tokens=None, space=None, reduce_modules=False):
    """{model: (layers, values)} of per-layer records, sorted by layer (mean over modules if asked)."""
    acc: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        if r["group"] != group or r["metric"] != metric or r.get("layer") is None:
            continue
        if tokens is not None and r.get("tokens") != tokens:
            continue
        if space is not None and r.get("space") != space:
            continue
        if r.get("module") is not None and not reduce_modules:
            continue
        acc[r["model"]][int(r["layer"])].append(float(r["value"]))
    out = {}
    for model, by_layer in acc.items():
        layers = sorted(by_layer)
        vals = []
        for k in layers:
            finite = [v for v in by_layer[k] if math.isfinite(v)]
            vals.append(sum(finite) / len(finite) if finite else float("nan"))
        out[model] = (layers, vals)
    return out


def _draw(ax, series, models, title, extra_values=()):
    """Plot one line per model (``series``: {model: (layers, values)}) and style the axes; a log y scale
    when the positive values (plus ``extra_values`` plotted by the caller) span more than 20×."""
    from matplotlib.ticker import MaxNLocator

    values = list(extra_values)
    for m in models:
        if m in series:
            layers, vals = series[m]
            ax.plot(layers, vals, marker="o", markersize=3, label=m)
            values += vals
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("decoder block", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    finite = [v for v in values if math.isfinite(v)]
    if finite and min(finite) > 0 and max(finite) > 20 * min(finite):  # e.g. attention sinks
        ax.set_yscale("log")
    ax.grid(alpha=0.3)


def plot_records(records: Sequence[dict], out_dir, dpi: int = 110) -> list[Path]:
    """PNG plots of every per-layer metric, one line per model; returns the written paths.

    ``overview.png`` (the headline metrics), ``geometry_<metric>.png`` (2×2 panels: all tokens /
    no sink × raw / unit vectors), ``norms.png``, ``trajectory.png``, and when present ``cka.png``
    (linear CKA vs the reference model) and ``lora.png`` (ΔW spectra, mean over modules per block).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    models = _models(records)
    written = []

    def save(fig, fname):
        handles, labels = [], []
        for ax in fig.axes:
            for h, lab in zip(*ax.get_legend_handles_labels()):
                if lab not in labels:
                    handles.append(h)
                    labels.append(lab)
        if handles:
            fig.legend(
                handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=8, frameon=False
            )
        # fixed margins in inches (tight_layout costs ~0.5 s a figure)
        w, h = fig.get_size_inches()
        fig.subplots_adjust(
            left=0.75 / w,
            right=1 - 0.2 / w,
            top=1 - 0.55 / h,
            bottom=(0.95 if handles else 0.6) / h,
            hspace=0.75 * 3.2 / h,
            wspace=0.3,
        )
        path = out_dir / fname
        fig.savefig(path, dpi=dpi)
        plt.close(fig)
        written.append(path)

    fig, axes = plt.subplots(2, 3, figsize=(12, 6.5))
    for ax, (group, metric, tokens, space, title) in zip(axes.flat, OVERVIEW):
        _draw(ax, _series(records, group, metric, tokens, space), models, title)
    save(fig, "overview.png")

    for metric in GEOMETRY_PLOTS:
        if not any(r["group"] == "geometry" and r["metric"] == metric for r in records):
            continue
        fig, axes = plt.subplots(2, 2, figsize=(9, 6.5))
        for i, tokens in enumerate(("all", "no_sink")):
            for j, space in enumerate(("raw", "unit")):
                title = f"{metric}: {'all tokens' if tokens == 'all' else 'no sink'}, {space} vectors"
                _draw(axes[i, j], _series(records, "geometry", metric, tokens, space), models, title)
        save(fig, f"geometry_{metric}.png")

    if any(r["metric"] == "norm_median" for r in records):
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
        for ax, metric in zip(axes, ("norm_median", "norm_max", "norm_max_over_median")):
            values = []
            for tokens, ls in (("all", "-"), ("no_sink", "--")):
                for i, m in enumerate(models):
                    s = _series(records, "geometry", metric, tokens, "raw").get(m)
                    if s:
                        ax.plot(
                            *s, ls=ls, color=f"C{i % 10}", marker="o", markersize=3, label=f"{m} ({tokens})"
                        )
                        values += [v for v in s[1] if math.isfinite(v) and v > 0]
            _draw(ax, {}, [], f"{metric} (raw block outputs)\nsolid: all tokens, dashed: no sink", values)
        save(fig, "norms.png")

    if any(r["group"] == "trajectory" for r in records):
        fig, axes = plt.subplots(1, 4, figsize=(15, 3.8))
        panels = (
            ("cos_prev", None, "cosine(block input, block output)"),
            ("step_length", "raw", "step length ‖out − in‖ (raw)"),
            ("step_length", "unit", "step length (unit vectors)"),
            ("lens_agreement", None, "logit-lens top-1 agreement"),
        )
        for ax, (metric, space, title) in zip(axes, panels):
            _draw(ax, _series(records, "trajectory", metric, "no_sink", space), models, title + "\n(no sink)")
        save(fig, "trajectory.png")

    if any(r["group"] == "compare" for r in records):
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
        refs = sorted({r["reference"] for r in records if r["group"] == "compare"})
        for ax, space in zip(axes, ("raw", "unit")):
            _draw(
                ax,
                _series(records, "compare", "linear_cka", "no_sink", space),
                models,
                f"linear CKA vs {', '.join(refs)}\n({space} vectors, no sink)",
            )
            ax.set_ylim(0, 1.05)
        save(fig, "cka.png")

    lora = [r for r in records if r["group"] == "lora" and r["source"] == "lora_delta"]
    if lora:
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
        for ax, metric in zip(axes, ("stable_rank", "effective_rank", "top_share")):
            _draw(
                ax,
                _series(lora, "lora", metric, reduce_modules=True),
                models,
                f"LoRA ΔW {metric}\n(mean over modules)",
            )
        save(fig, "lora.png")
    return written


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, int):
        return str(v)
    a = abs(v)
    if a != 0 and (a >= 1e4 or a < 1e-3):
        return f"{v:.2e}"
    return f"{v:.3f}" if a < 100 else f"{v:.1f}"


def _pick(records, model, group, metric, layer="any", tokens=None, space=None, module=None):
    vals = [
        float(r["value"])
        for r in records
        if r["model"] == model
        and r["group"] == group
        and r["metric"] == metric
        and (layer == "any" or r.get("layer") == layer)
        and (tokens is None or r.get("tokens") == tokens)
        and (space is None or r.get("space") == space)
        and (module is None or r.get("module") == module)
    ]
    finite = [v for v in vals if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


def write_summary(
    records: Sequence[dict], path, meta: dict | None = None, plots: Sequence[Path] = ()
) -> Path:
    """A short Markdown report: settings, next-token metrics, geometry at the last measured block and
    averaged over blocks, CKA and LoRA spectra when present, and the files written."""
    meta = meta or {}
    models = _models(records)
    lines = ["# supple measure", ""]
    if meta:
        for k in ("data", "texts", "max_tokens", "max_length", "layers"):
            if k in meta:
                lines.append(f"- {k}: `{meta[k]}`")
        lines.append("")
    lines += [
        "Hidden states are the outputs of the decoder blocks (forward hooks; before the final norm), over",
        "non-padding tokens. *no sink* leaves out the first position of each sequence (attention sinks carry",
        "activations hundreds of times larger); *unit* scales each token vector to length 1 first.",
        "",
        "## Next-token prediction (final logits)",
        "",
        "| model | NLL | perplexity | entropy | top-1 prob | accuracy | ECE (15 bins) | Brier |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in models:
        vals = [
            _pick(records, m, "logits", k)
            for k in ("nll", "perplexity", "entropy", "top1_prob", "accuracy", "ece", "brier")
        ]
        lines.append(f"| {m} | " + " | ".join(_fmt(v) for v in vals) + " |")
    geo = [r for r in records if r["group"] == "geometry"]
    if geo:
        last = max(int(r["layer"]) for r in geo)
        lines += [
            "",
            f"## Geometry (block {last} = last measured / mean over measured blocks)",
            "",
            "| model | erank ratio (unit, no sink) | participation ratio (unit, no sink) | participation ratio (raw, all) "
            "| anisotropy (no sink) | top-PC share (raw, no sink) | max/median norm |",
            "|---|---|---|---|---|---|---|",
        ]
        cols = (
            ("erank_ratio", "no_sink", "unit"),
            ("participation_ratio", "no_sink", "unit"),
            ("participation_ratio", "all", "raw"),
            ("anisotropy", "no_sink", "raw"),
            ("top_pc_share", "no_sink", "raw"),
            ("norm_max_over_median", "all", "raw"),
        )
        for m in models:
            cells = []
            for metric, tokens, space in cols:
                a = _pick(records, m, "geometry", metric, last, tokens, space)
                b = _pick(records, m, "geometry", metric, "any", tokens, space)
                cells.append(f"{_fmt(a)} / {_fmt(b)}")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    traj = [r for r in records if r["group"] == "trajectory"]
    if traj:
        lines += [
            "",
            "## Token trajectories",
            "",
            "| model | trajectory length (raw) | trajectory length (unit) "
            "| mean cosine to previous block | logit-lens agreement, middle block |",
            "|---|---|---|---|---|",
        ]
        for m in models:
            layers = sorted({int(r["layer"]) for r in traj if r["model"] == m and r.get("layer") is not None})
            mid = layers[(len(layers) - 1) // 2] if layers else None
            cells = [
                _pick(records, m, "trajectory", "trajectory_length", None, "no_sink", "raw"),
                _pick(records, m, "trajectory", "trajectory_length", None, "no_sink", "unit"),
                _pick(records, m, "trajectory", "cos_prev", "any", "no_sink"),
                _pick(records, m, "trajectory", "lens_agreement", mid, "no_sink"),
            ]
            lines.append(f"| {m} | " + " | ".join(_fmt(v) for v in cells) + " |")
    cka = [r for r in records if r["group"] == "compare"]
    if cka:
        last = max(int(r["layer"]) for r in cka)
        lines += [
            "",
            f"## Linear CKA vs reference (no sink; block {last} / mean over blocks)",
            "",
            "| model | reference | raw | unit |",
            "|---|---|---|---|",
        ]
        for m in models:
            ref = next((r["reference"] for r in cka if r["model"] == m), None)
            if ref is None:
                continue
            cells = [
                f"{_fmt(_pick(records, m, 'compare', 'linear_cka', last, 'no_sink', s))} / "
                f"{_fmt(_pick(records, m, 'compare', 'linear_cka', 'any', 'no_sink', s))}"
                for s in ("raw", "unit")
            ]
            lines.append(f"| {m} | {ref} | " + " | ".join(cells) + " |")
    lora = [r for r in records if r["group"] == "lora" and r["source"] == "lora_delta"]
    if lora:
        lines += [
            "",
            "## LoRA updates ΔW = (α/r)·B·A (mean over modules)",
            "",
            "| model | modules | stable rank | effective rank | top singular share |",
            "|---|---|---|---|---|",
        ]
        for m in models:
            n_mod = len({(r.get("layer"), r.get("module")) for r in lora if r["model"] == m})
            if not n_mod:
                continue
            cells = [_pick(lora, m, "lora", k) for k in ("stable_rank", "effective_rank", "top_share")]
            lines.append(f"| {m} | {n_mod} | " + " | ".join(_fmt(v) for v in cells) + " |")
    ov = [r for r in records if r["group"] == "lora" and r["source"] == "overlap"]
    if ov:
        lines += [
            "",
            "## LoRA subspace overlap (mean squared principal-angle cosine, mean over modules)",
            "",
            "| model | reference | input | output |",
            "|---|---|---|---|",
        ]
        for m in models:
            ref = next((r["reference"] for r in ov if r["model"] == m), None)
            if ref is None:
                continue
            cells = [_pick(ov, m, "lora", k) for k in ("input_overlap", "output_overlap")]
            lines.append(f"| {m} | {ref} | " + " | ".join(_fmt(v) for v in cells) + " |")
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    lines.append("")
    path = Path(path)
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
