"""Redo a finished demo's statistics with this version's analysis, from its results.json alone.

Training and measurements are untouched: the records are read back as they are and only the verdict, the tables and
the plots are recomputed (e.g. the probes' intervals that resample probe seeds as well as training seeds, see
docs/demo.md, "How sure is a probe result"). ``meta.reanalysis`` records the command and the date.

    python benchmarks/reanalyze_demo.py docs/demo/main_job            # in place
    python benchmarks/reanalyze_demo.py docs/demo/main_job --out /tmp/main_job_now
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("demo", help="the demo's output directory (its results.json)")
    ap.add_argument("--out", default=None, help="where to write the outputs (default: the demo's directory)")
    args = ap.parse_args(argv)
    path = os.path.join(args.demo, "results.json")
    if not os.path.isfile(path):
        ap.error(f"no {path}: pass a directory that `supple demo --out DIR` wrote")

    from supple.testbed.analysis import analyze
    from supple.testbed.pipeline import summarize
    from supple.testbed.report import write_outputs
    from supple.testbed.verdict import format_verdict

    with open(path, encoding="utf-8") as fh:
        results = json.load(fh)
    out = args.out or args.demo
    measure_path = os.path.join(args.demo, "measure_records.json")
    measure_rows = None
    if out != args.demo and os.path.exists(measure_path):
        with open(measure_path, encoding="utf-8") as fh:
            measure_rows = json.load(fh).get("records", [])
    results["summary"] = summarize(results["records"])
    results["analysis"] = analyze(results)
    results["meta"]["reanalysis"] = {"date": time.strftime("%Y-%m-%d %H:%M:%S"),
                                     "command": "python benchmarks/reanalyze_demo.py " + " ".join(argv or sys.argv[1:])}
    files = write_outputs(results, measure_rows, out)
    print(format_verdict(results))
    print(f"wrote {', '.join(sorted(os.path.join(out, f) for f in files.values()))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
