"""Where does a memorization probe's noise come from: the items a probe seed draws, or its training trajectory?

Runs the demo's ``word_codes`` probe (a fresh LoRA r8 fitting ``--n`` distinct items, scored on them) on one model
once per ``--seeds`` value and appends one JSON row per run to ``--out``: the final loss, the area under the eval
curve and the eval curve (every 20 steps). By default each seed draws its own items, LoRA initialization and batch
order, as in the demo; ``--fixed-pool P`` keeps the items of probe seed P for every run, so the spread that remains is
the trajectory's alone. ``--warmup``/``--clip`` tame the first steps (``supple probe --warmup/--max-grad-norm``); ``--cooldown`` decays the
learning rate to zero over the last steps (``supple probe --cooldown``).

    python benchmarks/probe_noise.py --fixed-pool 0 --tag fixedpool64 --out benchmarks/results/probe_noise.jsonl
    python benchmarks/probe_noise.py --n 256 --model DIR/seed0/baseline/sft2 --tag n256 --out ...
    python benchmarks/probe_noise.py --summary benchmarks/results/probe_noise_2026-12-01.jsonl
    python benchmarks/probe_noise.py --summary benchmarks/results/probe_noise_2026-12-02.jsonl --by-step steps160

``--by-step TAG`` reads a longer probe as several shorter ones: with a constant learning rate, the evaluation at step
k of one run is the final loss a k-step run of the same seed would reach (the same items, initialization and batch
order up to step k). Per evaluation step it prints the base model's mean and sd over its runs, the trained
checkpoints' (every other model of the tag, pooled), and their gap in units of the base model's sd: how far apart
the two sit for the probe's own noise, at every horizon.
"""

from __future__ import annotations

import argparse
import json
import time


def summarize(path: str) -> str:
    """Per (tag, model): runs, the final loss and the tail loss (``supple.measure.probe.tail_loss``, from the
    stored eval curve) as mean and sd over the rows."""
    import statistics

    from supple.measure.probe import tail_loss

    groups: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for r in _rows(path):
        groups.setdefault((r["tag"], r["model"]), []).append((r["final"], tail_loss(_eval_steps(r), r["eval"],
                                                                                      r["steps"])))
    out = ["| tag | model | runs | final loss mean (sd) | tail loss mean (sd) |", "|---|---|---:|---:|---:|"]
    for (tag, model), vals in groups.items():
        cells = []
        for xs in zip(*vals):
            sd = statistics.stdev(xs) if len(xs) > 1 else float("nan")
            cells.append(f"{statistics.mean(xs):.3f} ({sd:.3f})")
        out.append(f"| {tag} | {model} | {len(vals)} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def _rows(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _eval_steps(r: dict) -> list[int]:
    return list(range(0, r["steps"], 20)) + [r["steps"]]  # this script evaluates every 20 steps and at the end


def by_step(path: str, tag: str, base: str = "embedded") -> str:
    """Per evaluation step of ``tag``'s runs: the base model's eval loss (mean, sd over its runs), the trained
    checkpoints' (all other models, pooled over their runs), the gap between the two means and that gap over the
    base model's sd. Steps are those every run of the tag evaluated, except step 0."""
    import statistics

    rows = [r for r in _rows(path) if r["tag"] == tag and r.get("cooldown", 0) == 0]
    if not any(r["model"] == base for r in rows) or all(r["model"] == base for r in rows):
        raise ValueError(f"tag {tag!r} needs constant-rate runs of the base model ({base!r}) and of other checkpoints")
    steps = sorted(set.intersection(*(set(_eval_steps(r)) for r in rows)) - {0})
    out = ["| step | base model mean (sd, runs) | checkpoints mean (sd, runs, models) | gap | gap / base sd |",
           "|---:|---:|---:|---:|---:|"]
    n_models = len({r["model"] for r in rows if r["model"] != base})
    for k in steps:
        b = [r["eval"][_eval_steps(r).index(k)] for r in rows if r["model"] == base]
        c = [r["eval"][_eval_steps(r).index(k)] for r in rows if r["model"] != base]
        sd_b = statistics.stdev(b) if len(b) > 1 else float("nan")
        sd_c = statistics.stdev(c) if len(c) > 1 else float("nan")
        gap = statistics.mean(c) - statistics.mean(b)
        out.append(f"| {k} | {statistics.mean(b):.3f} ({sd_b:.3f}, {len(b)}) | {statistics.mean(c):.3f} ({sd_c:.3f}, "
                   f"{len(c)}, {n_models}) | {gap:+.3f} | {gap / sd_b:+.2f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded", help="'embedded', 'tiny' or a merged checkpoint directory")
    ap.add_argument("--n", type=int, default=64, help="distinct items the probe fits (default 64, the demo's)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=0, help="linear warm-up steps (default 0)")
    ap.add_argument("--clip", type=float, default=0.0, help="gradient-norm clipping (default 0 = none)")
    ap.add_argument("--cooldown", type=int, default=0, help="linear decay to zero over the last N steps (default 0)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3], help="probe seeds (default 0 1 2 3)")
    ap.add_argument("--fixed-pool", type=int, default=None, metavar="P",
                    help="draw every run's items with probe seed P (default: each run its own)")
    ap.add_argument("--tag", default="", help="a label copied into every row")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="JSON lines file to append the rows to")
    ap.add_argument("--summary", default=None, metavar="FILE",
                    help="run nothing: print each tag's mean and sd over its rows of the final and tail loss")
    ap.add_argument("--by-step", default=None, metavar="TAG",
                    help="with --summary: the base model against the other checkpoints at every evaluation step of "
                         "TAG's runs (see above)")
    a = ap.parse_args(argv)
    if a.by_step and not a.summary:
        ap.error("--by-step reads a file of rows: pass --summary FILE as well")
    if a.summary:
        try:
            print(by_step(a.summary, a.by_step) if a.by_step else summarize(a.summary))
        except (OSError, ValueError) as e:
            ap.error(str(e))
        return 0
    if not a.out:
        ap.error("--out is required (or --summary FILE)")
    if a.n < 1 or a.steps < 1 or not 0 < a.lr < 1 or a.warmup < 0 or a.clip < 0:
        ap.error("--n >= 1, --steps >= 1, 0 < --lr < 1, --warmup >= 0 and --clip >= 0")
    if not 0 <= a.cooldown <= a.steps - a.warmup:
        ap.error("--cooldown between 0 and --steps minus --warmup")

    import torch

    from supple.measure.probe import plasticity_probe
    from supple.testbed.evaluation import load_testbed_model, probe_texts

    torch.set_num_threads(a.threads)
    model, tok, _ = load_testbed_model(a.model)
    for s in a.seeds:
        t0 = time.time()
        pool_seed = s if a.fixed_pool is None else a.fixed_pool
        train, held = probe_texts("word_codes", a.steps * 4, a.n, pool_seed, "plain", tok)
        r = plasticity_probe(model, tok, train, held, steps=a.steps, lr=a.lr, rank=8, alpha=16.0, batch_size=4,
                             seed=s, eval_every=20, progress=False, warmup_steps=a.warmup,
                             max_grad_norm=a.clip or None, cooldown_steps=a.cooldown)
        row = dict(tag=a.tag, model=a.model, n=a.n, steps=a.steps, lr=a.lr, warmup=a.warmup, clip=a.clip,
                   cooldown=a.cooldown, seed=s,
                   pool_seed=pool_seed, final=r["final_loss"], area=r["area"], eval=r["eval_loss"],
                   s=time.time() - t0)
        print(json.dumps(row), flush=True)
        with open(a.out, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
