"""Closed-form checks of the geometry metrics in supple.regularizers.geometry."""

from __future__ import annotations

import math

import pytest
import torch

from supple.regularizers import ipr
from supple.regularizers.geometry import (
    anisotropy,
    covariance_spectrum,
    effective_rank,
    effective_rank_ratio,
    geometry_summary,
    linear_cka,
    lora_delta_svd,
    norm_stats,
    participation_ratio,
    principal_cosines,
    singular_value_stats,
    stable_rank,
    subspace_overlap,
    top_pc_share,
)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _equal_spectrum(n, d, k, seed=0):
    """n×d tokens whose centered matrix has exactly k equal non-zero singular values."""
    g = _gen(seed)
    x = torch.randn(n, k, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(x - x.mean(0))  # centered, orthonormal columns
    w, _ = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))
    return (q @ w.T + torch.randn(d, generator=g, dtype=torch.float64)).float()  # plus a constant offset


def test_isotropic_gaussian_has_full_effective_rank():
    d = 16
    h = torch.randn(8000, d, generator=_gen())
    assert effective_rank(h).item() == pytest.approx(d, rel=0.01)
    assert effective_rank_ratio(h).item() == pytest.approx(1.0, rel=0.01)
    assert participation_ratio(h).item() == pytest.approx(d, rel=0.02)
    assert top_pc_share(h).item() == pytest.approx(1 / d, rel=0.15)
    assert abs(anisotropy(h).item()) < 0.01


@pytest.mark.parametrize("n,d", [(200, 12), (10, 50)])  # feature side and Gram side
def test_rank_one_data_has_effective_rank_one(n, d):
    g = _gen(1)
    h = torch.randn(n, 1, generator=g) * torch.randn(1, d, generator=g) + torch.randn(1, d, generator=g)
    assert effective_rank(h).item() == pytest.approx(1.0, abs=1e-3)
    assert participation_ratio(h).item() == pytest.approx(1.0, abs=1e-4)
    assert top_pc_share(h).item() == pytest.approx(1.0, abs=1e-5)
    assert effective_rank_ratio(h).item() == pytest.approx(1 / min(n - 1, d), abs=1e-4)


@pytest.mark.parametrize("n,d,k", [(300, 20, 5), (12, 40, 7)])
def test_k_equal_directions(n, d, k):
    h = _equal_spectrum(n, d, k)
    for dtype in (torch.float32, torch.float64):
        assert effective_rank(h, dtype=dtype).item() == pytest.approx(k, rel=1e-4)
        assert participation_ratio(h, dtype=dtype).item() == pytest.approx(k, rel=1e-4)
        assert top_pc_share(h, dtype=dtype).item() == pytest.approx(1 / k, rel=1e-4)
    lam = covariance_spectrum(h, dtype=torch.float64)
    assert lam.shape == (min(n, d),)
    assert int((lam > 1e-8 * lam[0]).sum()) == k


def test_gram_and_feature_side_agree_and_pr_is_inverse_ipr():
    h = torch.randn(30, 45, generator=_gen(2)) * torch.linspace(0.1, 3, 45)
    for normalize in (False, True):
        pr = participation_ratio(h, normalize_tokens=normalize, dtype=torch.float64)
        assert pr.item() == pytest.approx(1 / ipr(h, normalize=normalize).item(), rel=1e-4)
        # feature side on the transpose problem padded: compare with explicit eigenvalues
        z = h.double()
        if normalize:
            z = z / z.norm(dim=1, keepdim=True)
        zc = z - z.mean(0)
        lam = torch.linalg.eigvalsh(zc.T @ zc)
        assert pr.item() == pytest.approx((lam.sum() ** 2 / (lam**2).sum()).item(), rel=1e-8)
        sv = torch.linalg.svdvals(zc)
        p = sv / sv.sum()
        er = math.exp(-(p * p.clamp_min(1e-300).log()).sum().item())
        assert effective_rank(h, normalize_tokens=normalize, dtype=torch.float64).item() == pytest.approx(
            er, rel=1e-6
        )


def test_geometry_summary_matches_single_functions():
    h = torch.randn(50, 20, generator=_gen(3)) + 2.0
    s = geometry_summary(h, normalize_tokens=True, dtype=torch.float64)
    kw = dict(normalize_tokens=True, dtype=torch.float64)
    assert s["erank"].item() == pytest.approx(effective_rank(h, **kw).item(), rel=1e-10)
    assert s["erank_ratio"].item() == pytest.approx(effective_rank_ratio(h, **kw).item(), rel=1e-10)
    assert s["participation_ratio"].item() == pytest.approx(participation_ratio(h, **kw).item(), rel=1e-10)
    assert s["pr_ratio"].item() == pytest.approx(s["participation_ratio"].item() / 20, rel=1e-10)
    assert s["top_pc_share"].item() == pytest.approx(top_pc_share(h, **kw).item(), rel=1e-10)
    assert s["anisotropy"].item() == pytest.approx(anisotropy(h, **kw).item(), rel=1e-10)
    assert s["anisotropy_centered"].item() == pytest.approx(
        anisotropy(h, center=True, **kw).item(), abs=1e-10
    )


def test_unit_normalization_removes_massive_activation():
    h = torch.randn(400, 16, generator=_gen(4))
    h[0] *= 1000.0  # one "attention sink"
    assert participation_ratio(h).item() < 1.01
    assert participation_ratio(h, normalize_tokens=True).item() > 10
    scaled = h * torch.rand(400, 1, generator=_gen(5)).add(0.5)
    for f in (effective_rank, participation_ratio, top_pc_share):
        assert f(scaled, normalize_tokens=True).item() == pytest.approx(
            f(h, normalize_tokens=True).item(), rel=1e-4
        )


def test_anisotropy_closed_forms():
    v = torch.randn(1, 8, generator=_gen(6))
    same = v.repeat(20, 1) * torch.rand(20, 1, generator=_gen(7)).add(0.1)
    assert anisotropy(same).item() == pytest.approx(1.0, abs=1e-5)
    assert anisotropy(same, num_pairs=100, generator=_gen(0)).item() == pytest.approx(1.0, abs=1e-5)
    m = 5
    pm = torch.cat([v.repeat(m, 1), -v.repeat(m, 1)])
    assert anisotropy(pm).item() == pytest.approx(-1 / (2 * m - 1), abs=1e-6)
    # sampled pairs: distinct tokens, reproducible, close to the exact mean
    h = torch.randn(300, 10, generator=_gen(8)) + 1.0
    a1 = anisotropy(h, num_pairs=20000, generator=_gen(1))
    a2 = anisotropy(h, num_pairs=20000, generator=_gen(1))
    assert a1.item() == a2.item()
    assert a1.item() == pytest.approx(anisotropy(h).item(), abs=0.02)
    # a shared offset makes raw anisotropy high; centering removes it
    assert anisotropy(h).item() > 0.4
    assert abs(anisotropy(h, center=True).item()) < 0.01
    assert math.isnan(anisotropy(torch.ones(1, 4)).item())


def test_norm_stats():
    h = torch.zeros(4, 3)
    h[:, 0] = torch.tensor([1.0, 2.0, 3.0, 100.0])
    s = norm_stats(h)
    assert s["norm_mean"].item() == pytest.approx(26.5)
    assert s["norm_max"].item() == pytest.approx(100.0)
    assert s["norm_min"].item() == pytest.approx(1.0)
    assert s["norm_median"].item() == pytest.approx(2.0)  # lower median
    assert s["norm_max_over_median"].item() == pytest.approx(50.0)


@pytest.mark.parametrize("n", [20, 200])  # Gram side (n < d) and feature side
def test_linear_cka(n):
    g = _gen(9)
    x = torch.randn(n, 32, generator=g)
    q, _ = torch.linalg.qr(torch.randn(32, 32, generator=g))
    assert linear_cka(x, x).item() == pytest.approx(1.0, abs=1e-5)
    assert linear_cka(x, 3.0 * x @ q + 1.0).item() == pytest.approx(1.0, abs=1e-4)  # rotation, scale, shift
    y = torch.randn(n, 24, generator=g)
    # explicit HSIC form
    xc, yc = (x - x.mean(0)).double(), (y - y.mean(0)).double()
    kx, ky = xc @ xc.T, yc @ yc.T
    ref = (kx * ky).sum() / (kx.norm() * ky.norm())
    assert linear_cka(x, y, dtype=torch.float64).item() == pytest.approx(ref.item(), rel=1e-8)
    assert 0 <= linear_cka(x, y).item() < 1
    with pytest.raises(ValueError):
        linear_cka(x, y[:-1])


def test_lora_delta_spectrum():
    g = _gen(10)
    a, b, s = torch.randn(4, 30, generator=g), torch.randn(20, 4, generator=g), 0.5
    u, sv, vh = lora_delta_svd(a, b, s, dtype=torch.float64)
    dw = s * b.double() @ a.double()
    torch.testing.assert_close(sv, torch.linalg.svdvals(dw)[:4])
    torch.testing.assert_close(u @ torch.diag(sv) @ vh, dw)
    st = singular_value_stats(sv)
    assert st["stable_rank"].item() == pytest.approx(stable_rank(dw, dtype=torch.float64).item(), rel=1e-8)
    assert st["frobenius"].item() == pytest.approx(dw.norm().item(), rel=1e-8)
    assert st["top_share"].item() == pytest.approx((sv[0] / sv.sum()).item())
    flat = singular_value_stats(torch.ones(5))
    assert flat["stable_rank"].item() == pytest.approx(5)
    assert flat["effective_rank"].item() == pytest.approx(5)
    assert flat["top_share"].item() == pytest.approx(0.2)
    one = singular_value_stats(torch.tensor([3.0, 0.0, 0.0]))
    assert one["stable_rank"].item() == pytest.approx(1)
    assert one["effective_rank"].item() == pytest.approx(1)
    zero = singular_value_stats(torch.zeros(3))  # LoRA at init (B = 0)
    assert math.isnan(zero["stable_rank"].item()) and zero["frobenius"].item() == 0


def test_subspace_overlap():
    e = torch.eye(6)
    assert subspace_overlap(
        e[:, :2], e[:, :2] @ torch.tensor([[2.0, 1.0], [0.0, 1.0]])
    ).item() == pytest.approx(1.0)
    assert subspace_overlap(e[:, :2], e[:, 2:4]).item() == pytest.approx(0.0, abs=1e-7)
    assert subspace_overlap(e[:, [0, 1]], e[:, [0, 2]]).item() == pytest.approx(0.5)
    torch.testing.assert_close(principal_cosines(e[:, [0, 1]], e[:, [0, 2]]), torch.tensor([1.0, 0.0]))
    assert subspace_overlap(e[:, :1], e[:, :3]).item() == pytest.approx(1.0)  # contained
