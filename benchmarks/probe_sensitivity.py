"""Which plasticity probe separates a less plastic model from the base model, and how noisy is it?

Runs probe settings (task family, prompt format, steps, learning rate) on checkpoints — the base model and merged
checkpoints a demo saved with ``supple demo --save-models DIR`` — once per probe seed, and prints a table: held-out
loss start → final per checkpoint (mean over probe seeds), the probe's own noise (max − min over probe seeds) and
whether the final loss separates the checkpoints by more than 3× that noise.

    python benchmarks/probe_sensitivity.py --models embedded DIR/seed0/baseline/sft2 --out benchmarks/results/probe_sensitivity.json
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

SETTINGS = {
    # name: (family, format, steps, lr)
    "reverse plain 25@2e-4": ("reverse_words", "plain", 25, 2e-4),
    "reverse chat 25@2e-4": ("reverse_words", "chat", 25, 2e-4),
    "number plain 25@2e-4": ("number_words", "plain", 25, 2e-4),
    "number chat 25@2e-4": ("number_words", "chat", 25, 2e-4),
    "reverse chat 10@1e-3": ("reverse_words", "chat", 10, 1e-3),
    # long probes: trained to near convergence, so a checkpoint's head start (it already answers tersely) fades
    # and what is left is how far the features let a fresh adapter fit the task
    "reverse plain 100@2e-4": ("reverse_words", "plain", 100, 2e-4),
    "reverse plain 50@1e-3": ("reverse_words", "plain", 50, 1e-3),
    "reverse plain 50@5e-4": ("reverse_words", "plain", 50, 5e-4),
    "number plain 100@2e-4": ("number_words", "plain", 100, 2e-4),
    # memorization (word_codes: arbitrary answers, scored on the items trained on): trainability, not transfer
    "codes plain 60@1e-3": ("word_codes", "plain", 60, 1e-3),
    "codes plain 100@1e-3": ("word_codes", "plain", 100, 1e-3),
    "codes plain 60@5e-4": ("word_codes", "plain", 60, 5e-4),
}


def main(argv=None) -> int:
    import torch

    from supple.testbed.evaluation import load_testbed_model, probe_summary
    from supple.testbed.settings import PRESETS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", required=True, help="'embedded' and/or merged checkpoint directories")
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--probe-seeds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    base = PRESETS["default"]
    rows = []
    for spec in args.models:
        model, tok, name = load_testbed_model(spec)
        for setting in args.settings:
            fam, fmt, steps, lr = SETTINGS[setting]
            b = replace(base, probe_format=fmt, probe_seeds=args.probe_seeds).with_probe(fam, steps, lr)
            t0 = time.perf_counter()
            p = probe_summary(model, tok, fam, b, name)
            rows.append({"model": spec, "setting": setting, "start": p["start_loss"], "final": p["final_loss"],
                         "noise": p["final_loss_spread"], "per_seed_final": p["per_seed"]["final_loss"],
                         "eval_steps": p["eval_steps"], "eval_loss": p["eval_loss"],
                         "seconds": time.perf_counter() - t0})
            print(f"{spec[-40:]:>40}  {setting:<24} start {p['start_loss']:.3f}  final {p['final_loss']:.3f}  "
                  f"noise {p['final_loss_spread']:.3f}  ({rows[-1]['seconds']:.0f} s)", flush=True)
        del model
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"date": time.strftime("%Y-%m-%d"), "command": "python benchmarks/probe_sensitivity.py "
                       + " ".join(argv or __import__("sys").argv[1:]), "rows": rows}, fh, indent=1)
    if len(args.models) >= 2:
        print("\nsetting                   " + "  ".join(f"final[{i}]" for i in range(len(args.models)))
              + "  diff(last-first)  noise  separates")
        for setting in args.settings:
            rs = [r for r in rows if r["setting"] == setting]
            d = rs[-1]["final"] - rs[0]["final"]
            noise = max(r["noise"] for r in rs)
            print(f"{setting:<24}  " + "  ".join(f"{r['final']:8.3f}" for r in rs)
                  + f"  {d:+16.3f}  {noise:5.3f}  {'yes' if abs(d) > 3 * noise else 'no'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
