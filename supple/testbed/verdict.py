"""The demo's verdict, for people: a per-arm table (terminal and Markdown) and the recovered-share plot, from
:func:`supple.testbed.analysis.analyze`."""

from __future__ import annotations

import math

__all__ = ["VERDICT_LEGEND", "format_verdict", "plot_recovered", "verdict_markdown"]

VERDICT_LEGEND = [
    "rec = recovered: the share of the baseline's degradation (vs the base model) the arm wins back at the last stage: "
    "1 = as good as the base model, 0 = no better than the baseline, < 0 = worse; [95 % paired bootstrap CI over "
    "training seeds, and for a probe over its probe seeds too, when the records keep them]; 'no loss' = the baseline did not degrade there (paired CI), so there is nothing to recover",
    "probe X = plasticity probe loss on family X after the last stage (a fresh LoRA's loss after its steps; lower = "
    "adapts better): wor = word_codes, memorizing arbitrary codes, scored on the items it trained on (fitting); "
    "rev, num = reverse_words, number_words, scored on held-out items (transfer)",
    "OOD = out-of-domain held-out accuracy; forget CE = answer cross-entropy on the first stage's task after the "
    "last stage (higher = forgot more); ECE = calibration error of in-domain answer tokens",
    "quality = worst ratio arm / baseline over the stages' own metrics (task accuracy; DPO reward accuracy and "
    "margin, on its training batches and on held-out pairs); "
    "time = training wall time / baseline's",
]


def _num(x: float, dec: int = 2) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.{dec}f}"


def _ci(d: dict, dec: int = 2) -> str:
    est, lo, hi = d.get("estimate"), d.get("lo"), d.get("hi")
    if est is None or not math.isfinite(est):
        return "-"
    if lo is None or not math.isfinite(lo):
        return f"{est:+.{dec}f}"
    return f"{est:+.{dec}f} [{lo:+.{dec}f},{hi:+.{dec}f}]"


def _rows(an: dict) -> tuple[list[str], list[list[str]]]:
    probes, ood = an["probes"], an["ood"]
    short = {p: p.split("_")[0][:3] for p in probes}
    header = ["arm"]
    for p in probes:
        header += [f"probe {short[p]}", f"rec {short[p]}"]
    header += ["OOD", "rec OOD", "forget CE", "ECE", "quality", "time"]
    rows = []
    problem = an.get("problem", {})
    for arm, a in an["arms"].items():
        row = [arm]
        for p in probes:
            lost = problem.get(f"probe {p}", {}).get("degraded", True)
            rec = "" if arm == "baseline" else (_ci(a[f"recovered probe {p}"]) if lost else "no loss")
            row += [_num(a[f"probe {p}"]["estimate"], 3), rec]
        row += [_num(a[f"OOD acc {ood}"]["estimate"]), "" if arm == "baseline" else _ci(a["recovered OOD"])]
        f_ce = next(v for k, v in a.items() if k.startswith("forgetting") and k.endswith(" CE"))
        rel = [q["relative"]["estimate"] for q in a["stage quality"].values() if math.isfinite(q["relative"]["estimate"])]
        row += [_num(f_ce["estimate"]), _num(a["ECE"]["estimate"], 3), _num(min(rel) if rel else float("nan")),
                _num(a["wall time vs baseline"])]
        rows.append(row)
    return header, rows


def _problem_lines(an: dict) -> list[str]:
    lines = []
    for name, p in an.get("problem", {}).items():
        noise = ""
        if "noise" in p:
            noise = f"; probe noise (max - min over probe seeds): base model {p['noise']:.3f}"
            if math.isfinite(p.get("noise_sd", float("nan"))):
                noise += (f" (sd {p['noise_sd']:.3f} over {p['n_probe_base']} probe seeds: standard error of their mean "
                          f"{p['noise_se_base']:.3f})")
            if math.isfinite(p.get("noise_last", float("nan"))):
                noise += f", baseline after {an['last_stage']} up to {p['noise_last']:.3f}"
            if "quiet" in p:
                noise += " (quiet: at most a third of the change)" if p["quiet"] else " (noisy: over a third of the change)"
            if math.isfinite(p.get("noise_se", float("nan"))):
                noise += (f"; as measured, means over probe seeds, their standard error in the change {p['noise_se']:.3f}"
                          + (" (at most a third of it)" if p.get("quiet_mean") else " (over a third of it)"))
        verdict = "degraded" if p.get("degraded") else "not degraded"
        over = f" over {p['ci']}" if p.get("ci") else ""
        lines.append(f"{name}: base {p['base']:.3f} -> baseline after {an['last_stage']} "
                     f"{p['base'] + p['estimate']:.3f}, change {_ci(p, 3)}{over} ({verdict}){noise}")
    return lines


def _versus_lines(an: dict) -> list[str]:
    """Each arm's probe losses against the baseline's, directly: arm − baseline with its CI (lower = more
    plastic), which needs no base model."""
    lines = []
    for arm, a in an["arms"].items():
        if arm == "baseline":
            continue
        parts = [f"{p} {_ci(a[f'probe {p} vs baseline'], 3)}" for p in an["probes"] if f"probe {p} vs baseline" in a]
        if parts:
            lines.append(f"{arm} - baseline on the probes (lower = more plastic): " + ", ".join(parts))
    return lines


def _quality_lines(an: dict) -> list[str]:
    """Each arm's stage quality against the baseline's, metric by metric: the ratio of means with its paired CI
    over training seeds (1 = the baseline's; the goal asks for at least 0.95)."""
    lines = []
    for arm, a in an["arms"].items():
        q = a.get("stage quality") or {}
        parts = [f"{label} {r['estimate']:.2f} [{r['lo']:.2f}, {r['hi']:.2f}]" for label, v in q.items()
                 if math.isfinite((r := v["relative"])["estimate"])]
        if arm != "baseline" and parts:
            lines.append(f"{arm} stage quality / baseline's (ratio of means, paired CI): " + ", ".join(parts))
    return lines


def format_verdict(results: dict) -> str:
    """The per-arm table with its legend, and the baseline's degradation (fixed-width text)."""
    an = results.get("analysis") or {}
    if not an.get("arms"):
        return an.get("error", "no verdict")
    header, rows = _rows(an)
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) for i in range(len(header))]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    out = ["The problem (baseline vs base model, paired over seeds " + str(an["seeds"]) + "):"]
    out += ["  " + ln for ln in _problem_lines(an) + _versus_lines(an) + _quality_lines(an)]
    out += ["", fmt(header), "-" * len(fmt(header)), *[fmt(r) for r in rows], ""]
    out += [f"  {ln}" for ln in VERDICT_LEGEND]
    met = [arm for arm, g in an.get("goal", {}).items() if g.get("all")]
    out.append("")
    out.append("goal (>= 50 % of every gap recovered, CI above 0; no more forgetting; quality within 5 %): "
               + (f"met by {', '.join(met)}" if met else "met by no arm"))
    return "\n".join(out)


def verdict_markdown(results: dict) -> str:
    an = results.get("analysis") or {}
    if not an.get("arms"):
        return ""
    header, rows = _rows(an)
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", *[f"- {ln}" for ln in _problem_lines(an) + _versus_lines(an) + _quality_lines(an)], "",
              *[f"- {ln}" for ln in VERDICT_LEGEND]]
    return "\n".join(lines)


def plot_recovered(results: dict, path: str) -> str:
    """One panel per degradation (each probe family, OOD accuracy): the share each arm recovers, with its 95 % CI,
    zero (= the baseline) and one (= the base model) marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    an = results["analysis"]
    arms = [a for a in an["arms"] if a != "baseline"]
    problem = an.get("problem") or {}
    keys = [(f"recovered probe {p}", f"plasticity gap recovered\nprobe {p}", problem.get(f"probe {p}"))
            for p in an["probes"]]
    keys.append(("recovered OOD", f"OOD-accuracy drop recovered\n{an['ood']}", problem.get(f"OOD acc {an['ood']}")))
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 0.5 * len(arms) + 1.8), squeeze=False, sharey=True)
    for ax, (key, title, prob) in zip(axes.flat, keys):
        if prob is not None and not prob.get("degraded", True):
            # no degradation: a share of a gap of the wrong sign would read backwards (an arm worse than the
            # baseline would look like a recovery), so the panel says so instead of plotting one
            ax.text(0.5, 0.5, "no loss to recover:\nthe baseline did not degrade here\n"
                    f"(change {prob['estimate']:+.3f} [{prob['lo']:+.3f}, {prob['hi']:+.3f}])\nsee the table",
                    ha="center", va="center", transform=ax.transAxes, fontsize=9, color="dimgray")
            ax.set_title(title, fontsize=9)
            ax.set_xticks([])
            continue
        for y, arm in enumerate(arms):
            d = an["arms"][arm][key]
            est, lo, hi = d["estimate"], d["lo"], d["hi"]
            if not math.isfinite(est):
                continue
            lo = est if not math.isfinite(lo) else lo
            hi = est if not math.isfinite(hi) else hi
            ax.errorbar([est], [y], xerr=[[est - lo], [hi - est]], fmt="o", capsize=4,
                        color="tab:green" if lo > 0 else ("tab:red" if hi < 0 else "tab:gray"))
        ax.axvline(0, color="black", lw=1)
        ax.axvline(1, color="black", lw=0.8, ls=":")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("recovered share  (0 = baseline, 1 = base model; right is better)", fontsize=8)
        ax.grid(alpha=0.3, axis="x")
    axes.flat[0].set_yticks(range(len(arms)))
    axes.flat[0].set_yticklabels(arms, fontsize=9)
    axes.flat[0].invert_yaxis()
    fig.suptitle(f"{results['meta']['model']}: share of the baseline's degradation each arm recovers after "
                 f"{an['last_stage']} (mean, 95 % paired bootstrap CI over {len(an['seeds'])} seeds)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
