"""Semantic coverage: the properties the outcome-optimization paper relies on."""

from __future__ import annotations

import json

import pytest
import torch

from supple.cli import main
from supple.measure.coverage import coverage_from_embeddings, semantic_coverage

from ._tiny import make_tiny_llama, make_tokenizer


def _clusters(centers, n, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.cat([c + 0.05 * torch.randn(n, c.shape[0], generator=gen) for c in centers])


def test_coverage_of_constructed_embeddings():
    gen = torch.Generator().manual_seed(0)
    centers = [torch.randn(8, generator=gen) * 3 for _ in range(4)]
    target = _clusters(centers, 20, 1)
    assert coverage_from_embeddings(target, target) == 1.0
    narrow = _clusters(centers[:1], 20, 2)
    c_narrow = coverage_from_embeddings(narrow, target)
    assert 0.1 < c_narrow <= 0.3  # one of four clusters
    assert coverage_from_embeddings(narrow.repeat(10, 1), target) == c_narrow  # duplicates change nothing
    wider = torch.cat([narrow, _clusters(centers[1:2], 20, 3)])
    assert coverage_from_embeddings(wider, target) > c_narrow + 0.15
    assert coverage_from_embeddings(torch.zeros(0, 8), target) == 0.0
    with pytest.raises(ValueError, match="more than k"):
        coverage_from_embeddings(target[:3], target[:3], k=5)


ARITH = [f"{a} plus {b} equals {a + b}" for a in range(7) for b in range(4)]
WORDS = [f"the {w} sat on the {v} mat" for w in ("cat", "dog", "owl", "fox", "bee") for v in ("red", "big", "old", "wet")]


def test_semantic_coverage_with_a_model():
    tok = make_tokenizer()
    model = make_tiny_llama(tok, seed=3)
    target = ARITH + WORDS
    narrow = semantic_coverage(ARITH[::2], target, model, tok, progress=False)
    dup = semantic_coverage(ARITH[::2] * 10, target, model, tok, progress=False)
    wide = semantic_coverage(ARITH[::2] + WORDS[::2], target, model, tok, progress=False)
    self_cov = semantic_coverage(target, target, model, tok, progress=False)
    assert self_cov["coverage"] == 1.0
    assert dup["coverage"] == narrow["coverage"] and dup["erank_train"] == pytest.approx(narrow["erank_train"])
    assert dup["n_train"] == 10 * narrow["n_train"]
    assert wide["coverage"] > narrow["coverage"]
    assert 0 < narrow["erank_ratio"] < wide["erank_ratio"]


def test_coverage_cli(tmp_path):
    tok = make_tokenizer()
    model = make_tiny_llama(tok, seed=3)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    (tmp_path / "train.txt").write_text("\n".join(ARITH[::2]))
    (tmp_path / "target.txt").write_text("\n".join(ARITH + WORDS))
    rc = main(["coverage", str(tmp_path / "train.txt"), str(tmp_path / "target.txt"), "--model",
               str(tmp_path / "m"), "--json", str(tmp_path / "cov.json")])
    assert rc == 0
    res = json.loads((tmp_path / "cov.json").read_text())
    assert 0 < res["coverage"] < 1 and res["k"] == 5
