"""The penalty math against hand-written formulas and autograd."""

from __future__ import annotations

import pytest
import torch

from supple.kernels import ipr_reference, orthogonality_reference
from supple.regularizers import (
    PENALTIES,
    decov,
    ipr,
    lora_cross_overlap,
    lora_intra_decorrelation,
    lora_penalties,
    penalty_value_and_grad,
    vicreg,
)

from ._runs import hand_cross, hand_intra


@pytest.mark.parametrize("n,d", [(5, 9), (9, 5), (77, 123), (130, 16), (2, 3)])
@pytest.mark.parametrize("normalize", [True, False])
def test_ipr_value_and_hand_derived_gradient_match_autograd(n, d, normalize):
    gen = torch.Generator().manual_seed(n * 1000 + d)
    h = (torch.randn(n, d, generator=gen, dtype=torch.float64) * torch.rand(d, generator=gen, dtype=torch.float64)
         ).requires_grad_(True)
    expected = _ipr64(h, normalize)
    (g_auto,) = torch.autograd.grad(expected, h)
    p, g = ipr_reference(h.detach(), normalize)
    assert p.dtype == torch.float32 and g.dtype == torch.float32
    torch.testing.assert_close(p.double(), expected.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g.double(), g_auto, rtol=1e-4, atol=1e-6)
    # the differentiable wrapper uses the same gradient
    x = h.detach().float().requires_grad_(True)
    ipr(x, normalize).backward()
    torch.testing.assert_close(x.grad.double(), g_auto, rtol=1e-4, atol=1e-6)


def _ipr64(h, normalize):
    z = h / h.norm(dim=1, keepdim=True).clamp_min(1e-6) if normalize else h
    zc = z - z.mean(0)
    return ((zc.T @ zc) ** 2).sum() / ((zc * zc).sum() ** 2)


def test_ipr_bounds_and_collapse():
    gen = torch.Generator().manual_seed(0)
    iso = torch.randn(4000, 8, generator=gen)
    assert abs(float(ipr(iso, normalize=False)) - 1 / 8) < 0.01  # isotropic: 1/d
    rank1 = torch.randn(50, 1, generator=gen) * torch.randn(1, 16, generator=gen)
    assert abs(float(ipr(rank1, normalize=False)) - 1.0) < 1e-5  # collapse: 1
    few = torch.randn(3, 64, generator=gen)
    assert float(ipr(few)) >= 1 / 2 - 1e-6  # n=3 tokens: at least 1/(n-1)


def test_ipr_normalization_ignores_massive_activation():
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(100, 32, generator=gen)
    h[0] *= 1000.0  # an attention-sink token
    assert float(ipr(h, normalize=False)) > 0.9
    assert float(ipr(h, normalize=True)) < 0.1


def test_ipr_single_token_is_nan_not_crash():
    p, g = ipr_reference(torch.randn(1, 8))
    assert torch.isnan(p)


def test_ipr_is_fp32_for_bf16_input():
    h = torch.randn(20, 12).bfloat16()
    p, g = ipr_reference(h)
    assert p.dtype == torch.float32
    torch.testing.assert_close(p, ipr_reference(h.float())[0])


def _unit_rows(h: torch.Tensor) -> torch.Tensor:
    return h / h.norm(dim=1, keepdim=True)


def _decov64(h: torch.Tensor) -> torch.Tensor:
    """DeCov on correlations: Σ_{i≠j} R_ij² / (d(d−1)), R the feature correlation matrix."""
    r = torch.corrcoef(h.T)
    d = h.shape[1]
    return ((r**2).sum() - (torch.diagonal(r) ** 2).sum()) / (d * (d - 1))


def _vicreg64(h: torch.Tensor) -> torch.Tensor:
    """mean_j relu(1 − √(C_jj + 1e-4)) + ‖offdiag C‖²_F / d, C the unbiased feature covariance."""
    c = torch.cov(h.T)
    var = torch.relu(1 - torch.sqrt(torch.diagonal(c) + 1e-4)).mean()
    return var + ((c**2).sum() - (torch.diagonal(c) ** 2).sum()) / h.shape[1]


# each penalty on row-normalized tokens, written from its formula (README.md, "The penalties")
_NORMALIZED_FORMULAS = {
    "ipr": lambda h: _ipr64(h, True),
    "decov": lambda h: _decov64(_unit_rows(h)),
    "vicreg": lambda h: _vicreg64(_unit_rows(h)),
}


def test_decov_matches_formula():
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(40, 6, generator=gen, dtype=torch.float64) @ torch.randn(6, 6, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(decov(h).double(), _decov64(h), rtol=1e-5, atol=1e-7)


def test_vicreg_matches_formula():
    gen = torch.Generator().manual_seed(2)
    h = torch.randn(30, 5, generator=gen, dtype=torch.float64) * 0.3
    torch.testing.assert_close(vicreg(h).double(), _vicreg64(h), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", PENALTIES)
def test_penalty_value_and_grad_match_the_formula_and_its_float64_gradient(name):
    h = torch.randn(25, 7, generator=torch.Generator().manual_seed(3), dtype=torch.float64).requires_grad_(True)
    expected = _NORMALIZED_FORMULAS[name](h)
    (g_expected,) = torch.autograd.grad(expected, h)
    p, g = penalty_value_and_grad(name, h.detach().float(), True)
    assert p.dtype == torch.float32 and g.dtype == torch.float32
    torch.testing.assert_close(p.double(), expected.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g.double(), g_expected, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="unknown diversity penalty"):
        penalty_value_and_grad("pca", h.detach(), True)


def test_lora_penalties_match_per_module_formulas_and_gradients():
    gen = torch.Generator().manual_seed(4)
    a = torch.randn(5, 4, 12, generator=gen, dtype=torch.float64, requires_grad=True)
    u = torch.linalg.qr(torch.randn(5, 12, 3, generator=gen, dtype=torch.float64))[0]
    intra, cross = lora_penalties(a, u)
    for m in range(5):
        torch.testing.assert_close(intra[m].double(), hand_intra(a[m]).detach(), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(cross[m].double(), hand_cross(a[m], u[m]).detach(), rtol=1e-5, atol=1e-7)
    loss = intra.sum() + 2 * cross.sum()
    (g,) = torch.autograd.grad(loss, a)
    loss_hand = sum(hand_intra(a[m]) + 2 * hand_cross(a[m], u[m]) for m in range(5))
    (g_hand,) = torch.autograd.grad(loss_hand, a)
    torch.testing.assert_close(g.double(), g_hand, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(lora_intra_decorrelation(a), intra)
    torch.testing.assert_close(lora_cross_overlap(a, u), cross)


def test_lora_penalty_extremes():
    eye = torch.eye(6)[:4].unsqueeze(0)  # orthogonal rows
    intra, cross = orthogonality_reference(eye, torch.eye(6)[:, :4].unsqueeze(0))
    assert float(intra[0]) == 0.0 and abs(float(cross[0]) - 1.0) < 1e-6  # rows inside the subspace
    same = torch.ones(1, 3, 6)
    intra, cross = orthogonality_reference(same, torch.eye(6)[:, 4:].unsqueeze(0) * 0 + torch.eye(6)[:, 4:])
    assert abs(float(intra[0]) - 1.0) < 1e-6
    r1 = orthogonality_reference(torch.randn(2, 1, 6))[0]
    assert torch.all(r1 == 0)
    with pytest.raises(ValueError, match="modules, r, d_in"):
        orthogonality_reference(torch.randn(3, 4))


def _clamped_formula(a: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """intra.sum() + 3·cross.sum() written with autograd ops (README.md, "The penalties"), row norms
    clamped at 1e-6 as supple.kernels.orthogonality clamps them."""
    ah = a / a.norm(dim=2, keepdim=True).clamp_min(1e-6)
    g = ah @ ah.transpose(1, 2)
    r = a.shape[1]
    intra = ((g * g).sum(dim=(1, 2)) - (torch.diagonal(g, dim1=1, dim2=2) ** 2).sum(dim=1)) / (r * (r - 1))
    cross = ((ah @ u) ** 2).sum(dim=(1, 2)) / r
    return intra.sum() + 3 * cross.sum()


def test_orthogonality_hand_backward_matches_autograd_incl_zero_rows_and_bases():
    gen = torch.Generator().manual_seed(11)
    a = torch.randn(3, 5, 9, generator=gen, dtype=torch.float64)
    a[1, 2] = 0.0  # a clamped row: no gradient through its norm
    a.requires_grad_(True)
    u = torch.linalg.qr(torch.randn(3, 9, 4, generator=gen, dtype=torch.float64))[0].requires_grad_(True)
    intra, cross = orthogonality_reference(a, u)
    ga, gu = torch.autograd.grad(intra.sum() + 3 * cross.sum(), (a, u))
    ea, eu = torch.autograd.grad(_clamped_formula(a, u), (a, u))
    torch.testing.assert_close(ga.double(), ea, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gu.double(), eu, rtol=1e-4, atol=1e-6)
    # only one of the two outputs used: the other's gradient path must not leak in
    (g_only,) = torch.autograd.grad(orthogonality_reference(a, u)[1].sum(), a)
    ah = a / a.norm(dim=2, keepdim=True).clamp_min(1e-6)
    (e_only,) = torch.autograd.grad((((ah @ u) ** 2).sum(dim=(1, 2)) / 5).sum(), a)
    torch.testing.assert_close(g_only.double(), e_only, rtol=1e-4, atol=1e-6)


def test_orthogonality_low_precision_input_accumulates_in_fp32():
    gen = torch.Generator().manual_seed(12)
    a = torch.randn(4, 8, 64, generator=gen).bfloat16().requires_grad_(True)
    intra, _ = orthogonality_reference(a)
    assert intra.dtype == torch.float32
    (g,) = torch.autograd.grad(intra.sum(), a)
    assert g.dtype == torch.bfloat16
    a32 = a.detach().float().requires_grad_(True)
    (g32,) = torch.autograd.grad(orthogonality_reference(a32)[0].sum(), a32)
    torch.testing.assert_close(g.float(), g32, rtol=2e-2, atol=1e-4)
