"""How a checkpoint fails the OOD family: the share of wrong answers that echo the question's subject.

The demo's OOD family (``knowledge``) asks for a capital, an opposite, a plural or what comes after a weekday or a
month. This prints, per checkpoint, the accuracy on the held-out items and how the wrong answers split: *echo*
(the answer repeats the question's subject — the country, the quoted word, the day or month asked about — and not
the gold answer) or *other*; ``--show`` prints every item's output.

    python benchmarks/ood_failures.py embedded DIR/seed7/supple/dpo DIR/seed7/supple/sft2
"""

from __future__ import annotations

import argparse
import re
import sys


def question_subject(question: str) -> str:
    """The word or phrase a ``knowledge`` question is about: the quoted word, or what follows 'of' / 'after'."""
    quoted = re.search(r"'([^']+)'", question)
    if quoted:
        return quoted.group(1)
    m = re.search(r"\b(?:of|after)\s+(.+?)\?$", question)
    if m is None:
        raise ValueError(f"no subject in {question!r}: expected a quoted word or '... of X?' / '... after X?'")
    return m.group(1)


def echoes(question: str, output: str) -> bool:
    """Whether ``output`` repeats the subject of ``question`` (case-insensitive, whole words)."""
    return re.search(rf"\b{re.escape(question_subject(question))}\b", output, flags=re.IGNORECASE) is not None


def tally(examples: list[dict]) -> dict:
    """Accuracy and the split of the wrong answers of ``task_metrics(...)["examples"]`` rows."""
    wrong = [e for e in examples if not e["correct"]]
    echo = sum(echoes(e["q"], e["out"]) for e in wrong)
    n = max(len(examples), 1)
    return {"n": len(examples), "acc": 1 - len(wrong) / n, "echo": echo / n, "other": (len(wrong) - echo) / n}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", help="'embedded', 'tiny' or checkpoint directories")
    ap.add_argument("--items", type=int, default=64, help="held-out items of the family")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--show", action="store_true", help="print every item's output")
    args = ap.parse_args(argv)

    import torch

    from supple.testbed.evaluation import load_testbed_model, task_metrics

    torch.set_num_threads(args.threads)
    print(f"{'checkpoint':<60} {'items':>5} {'acc':>5} {'echo':>5} {'other':>5}  (shares of all items)")
    for spec in args.models:
        model, tok, _ = load_testbed_model(spec)
        res = task_metrics(model, tok, "knowledge", args.items, keep_examples=args.items)
        t = tally(res["examples"])
        print(f"{spec[-60:]:<60} {t['n']:>5} {t['acc']:>5.2f} {t['echo']:>5.2f} {t['other']:>5.2f}")
        if args.show:
            for e in res["examples"]:
                mark = "+" if e["correct"] else ("echo" if echoes(e["q"], e["out"]) else "-")
                print(f"    {mark:>4}  {e['q']}  gold {e['gold']!r}  out {e['out']!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
