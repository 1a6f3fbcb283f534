"""Semantic coverage of training data on the embedded SmolLM2-135M (about 1–2 minutes on CPU).

    python examples/coverage_demo.py [--n 48]

The target distribution mixes four generated task families (arithmetic, sorting, number words, general
knowledge). A narrow training set (arithmetic only) covers part of it; duplicating that set ten times changes
nothing; adding a second family raises coverage; the target set covers itself completely. This is the
property arXiv 2606.00674 relies on: out-of-domain error tracks the coverage of the semantic space, not the
number of samples. See supple.measure.coverage for the exact definition.
"""

from __future__ import annotations

import argparse

from supple.measure.coverage import semantic_coverage
from supple.testbed import get_family, load_embedded_model


def questions(family: str, n: int, seed: int) -> list[str]:
    fam = get_family(family)
    exs = fam.eval_examples(n) if fam.finite else fam.train_examples(n, seed, split="coverage")
    return [f"{ex.question} {ex.answer}" for ex in exs]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=48, help="texts per family")
    args = p.parse_args()
    model, tok = load_embedded_model()
    fams = ["arithmetic", "sorting", "number_words", "knowledge"]
    target = [t for f in fams for t in questions(f, args.n, seed=1)]
    narrow = questions("arithmetic", args.n, seed=2)
    wider = narrow + questions("sorting", args.n, seed=2)
    runs = {
        "arithmetic only": narrow,
        "arithmetic only, duplicated ×10": narrow * 10,
        "arithmetic + sorting": wider,
        "target vs itself": target,
    }
    print(f"target: {len(target)} texts from {', '.join(fams)}; k = 5, last decoder block, mean-pooled")
    print(f"{'training set':<34}{'texts':>7}{'coverage':>10}{'erank ratio':>13}")
    for name, train in runs.items():
        r = semantic_coverage(train, target, model, tok, progress=False)
        print(f"{name:<34}{len(train):>7}{r['coverage']:>10.3f}{r['erank_ratio']:>13.3f}")


if __name__ == "__main__":
    main()
