"""Each measurement against its published definition, with the reference written here from the formula.

- effective rank: Roy & Vetterli (2007) on the centered matrix; RankMe: Garrido et al. (2023),
  uncentered, p = σ/Σσ + 1e-7;
- coverage: Naeem et al. (2020), a target point covered when some training point lies *strictly* inside
  its k-NN ball (as their public code ``prdc`` computes it);
- ECE: torchmetrics' binning, bins [b/B, (b+1)/B) and confidence 1.0 in a bin of its own.
"""

from __future__ import annotations

import math

import pytest
import torch

from supple.measure.calibration import expected_calibration_error
from supple.measure.coverage import coverage_from_embeddings
from supple.regularizers.geometry import effective_rank, geometry_summary, rankme, top_pc_share

N, D = 512, 576


def _svdvals64(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(x.double())


def roy_vetterli_ref(x: torch.Tensor) -> float:
    """exp(H(p)), p_i = σ_i / Σσ over the singular values of the column-centered matrix (0·log 0 = 0)."""
    x = x.double()
    s = _svdvals64(x - x.mean(dim=0, keepdim=True))
    p = s / s.sum()
    p = p[p > 0]
    return math.exp(-float((p * p.log()).sum()))


def rankme_ref(x: torch.Tensor, eps: float = 1e-7) -> float:
    """RankMe: p_k = σ_k / ‖σ‖₁ + ε over all min(n, d) singular values of the uncentered matrix."""
    s = _svdvals64(x)
    p = s / s.sum() + eps
    return math.exp(-float((p * p.log()).sum()))


def _power_law(sink: float | None, seed: int = 0) -> torch.Tensor:
    """n×d tokens whose feature variances fall as 1/i, optionally one token at ``sink`` × the median norm."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g, dtype=torch.float64) * torch.arange(1, D + 1, dtype=torch.float64) ** -0.5
    if sink is not None:
        x[0] = x[0] / x[0].norm() * sink * x.norm(dim=1).median()
    return x.float()


def _rank4_noise(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(N, 4, generator=g, dtype=torch.float64) @ torch.randn(4, D, generator=g, dtype=torch.float64)
    return (low + 0.07 * torch.randn(N, D, generator=g, dtype=torch.float64)).float()


CASES = {
    "power_law_sink_100x": lambda: _power_law(100.0),
    "power_law_sink_300x": lambda: _power_law(300.0),
    "rank4_plus_noise": _rank4_noise,
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_effective_rank_in_float32_matches_the_float64_definition(case):
    x = CASES[case]()  # float32 data, the dtype of the live metrics
    ref = roy_vetterli_ref(x)
    assert ref > 15  # the case is not degenerate: float32's old rounding floor read 2.2–44 here
    got32 = effective_rank(x).item()
    assert got32 == pytest.approx(ref, rel=0.02)
    assert effective_rank(x, dtype=torch.float64).item() == pytest.approx(ref, rel=1e-6)
    assert geometry_summary(x)["erank"].item() == pytest.approx(ref, rel=0.02)
    # the top-PC share from the same spectrum
    s = _svdvals64(x.double() - x.double().mean(0))
    assert top_pc_share(x).item() == pytest.approx(float(s[0] ** 2 / (s**2).sum()), rel=1e-4)


def test_effective_rank_is_centered_and_rankme_is_not():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(300, 64, generator=g) * torch.linspace(0.2, 2.0, 64) + 3.0 * torch.randn(64, generator=g)
    er, rm = effective_rank(x, dtype=torch.float64).item(), rankme(x, dtype=torch.float64).item()
    assert er == pytest.approx(roy_vetterli_ref(x), rel=1e-8)
    assert rm == pytest.approx(rankme_ref(x), rel=1e-8)
    assert rankme(x).item() == pytest.approx(rankme_ref(x), rel=1e-5)  # float32 path
    assert abs(er - rm) > 5  # the offset is one more dominant direction for RankMe only
    # the offset changes nothing for the centered definition
    assert effective_rank(x + 100.0).item() == pytest.approx(er, rel=1e-4)
    # unit-normalized tokens, as both take them
    z = x / x.norm(dim=1, keepdim=True)
    assert rankme(x, normalize_tokens=True, dtype=torch.float64).item() == pytest.approx(rankme_ref(z), rel=1e-8)
    assert geometry_summary(x, dtype=torch.float64)["rankme"].item() == pytest.approx(rm, rel=1e-10)
    # RankMe of rank-deficient data counts the ε of every zero singular value, as published
    low = torch.randn(40, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 20, generator=g, dtype=torch.float64)
    assert rankme(low, dtype=torch.float64).item() == pytest.approx(rankme_ref(low), rel=1e-6)
    with pytest.raises(ValueError, match="eps"):
        rankme(x, eps=-1.0)


# ------------------------------------------------------------------------------------------- coverage
def coverage_ref(train: list[list[float]], target: list[list[float]], k: int) -> float:
    """Naeem et al. coverage as prdc computes it: the k-th nearest *other* real point sets the radius,
    and a real point is covered when the nearest fake point is strictly closer."""
    covered = 0
    for j, y in enumerate(target):
        others = sorted(math.dist(y, z) for i, z in enumerate(target) if i != j)
        radius = others[k - 1]
        covered += min(math.dist(y, x) for x in train) < radius
    return covered / len(target)


def test_coverage_counts_a_training_point_on_the_boundary_as_outside():
    # points on a line at 0, 1, ..., 7 and k = 2: the radii of points 0, 1, 3 are 2, 1, 1, and a training
    # copy of point 2 lies exactly on each of those boundaries; it covers only point 2 itself (a "≤"
    # would count 4 of 8)
    target = torch.tensor([[float(i), 0.0] for i in range(8)])
    train = target[[2]]
    assert coverage_ref(train.tolist(), target.tolist(), k=2) == pytest.approx(1 / 8)
    assert coverage_from_embeddings(train, target, k=2) == pytest.approx(1 / 8)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_coverage_with_shared_texts_matches_the_reference(seed):
    """Shared texts embed to bitwise-identical vectors: training copies of target points create exact ties."""
    g = torch.Generator().manual_seed(seed)
    target = torch.nn.functional.normalize(torch.randn(60, 16, generator=g), dim=1)
    shared = target[torch.randperm(60, generator=g)[:12]]
    extra = torch.nn.functional.normalize(torch.randn(10, 16, generator=g), dim=1)
    train = torch.cat([shared, extra])
    for k in (1, 3, 5):
        want = coverage_ref(train.double().tolist(), target.double().tolist(), k)
        assert coverage_from_embeddings(train, target, k=k) == pytest.approx(want, abs=1e-12)
    assert coverage_from_embeddings(target, target) == 1.0


# ------------------------------------------------------------------------------------------------ ECE
def ece_ref(conf: list[float], correct: list[bool], n_bins: int) -> float:
    """torchmetrics' binning: bin b holds b/B ≤ c < (b+1)/B; c = 1.0 has a bin of its own."""
    bins: dict[int, list[tuple[float, bool]]] = {}
    for c, ok in zip(conf, correct):
        b = n_bins if c == 1.0 else next(b for b in range(n_bins) if b / n_bins <= c < (b + 1) / n_bins)
        bins.setdefault(b, []).append((c, ok))
    total = 0.0
    for members in bins.values():
        acc = sum(ok for _, ok in members) / len(members)
        mean_conf = sum(c for c, _ in members) / len(members)
        total += len(members) / len(conf) * abs(acc - mean_conf)
    return total


@pytest.mark.parametrize("n_bins", [4, 10, 15])
def test_ece_bins_like_torchmetrics_on_bin_edges(n_bins):
    g = torch.Generator().manual_seed(n_bins)
    edges = [b / n_bins for b in range(n_bins + 1)]  # every edge, 1.0 included, many times over
    conf = edges * 20 + torch.rand(200, generator=g, dtype=torch.float64).tolist()
    correct = (torch.rand(len(conf), generator=g) < 0.6).tolist()
    want = ece_ref(conf, correct, n_bins)
    got = expected_calibration_error(torch.tensor(conf, dtype=torch.float64), torch.tensor(correct), n_bins)
    assert got.item() == pytest.approx(want, abs=1e-12)


def test_ece_edge_values_open_a_new_bin():
    # 0.5 with B = 2 is in the upper bin [0.5, 1); 1.0 is alone: bins {0.25}, {0.5, 0.75}, {1.0}
    conf = torch.tensor([0.25, 0.5, 0.75, 1.0], dtype=torch.float64)
    correct = torch.tensor([False, True, True, False])
    want = (abs(0 - 0.25) + 2 * abs(1 - 0.625) + abs(0 - 1.0)) / 4
    assert expected_calibration_error(conf, correct, n_bins=2).item() == pytest.approx(want)
    with pytest.raises(ValueError, match="n_bins"):
        expected_calibration_error(conf, correct, n_bins=0)
