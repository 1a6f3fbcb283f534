"""Representation-diversity penalties of token representations: pure tensor functions.

Each takes H of shape (n tokens, d features) and returns a 0-d fp32 tensor, differentiable in H.
With ``normalize=True`` each row is first scaled to unit length, Z = H / max(‖h_i‖, 1e-6), which
makes the penalty blind to "massive activations" (attention-sink tokens with norms 100× the rest).
The callback passes ``SuppleConfig.diversity_normalize_tokens`` to every penalty.

- ``ipr``    P = ‖ZcᵀZc‖²_F / ‖Zc‖⁴_F  (inverse participation ratio of the covariance spectrum, in
  [1/min(n−1, d), 1]; 1 = collapse). Zc = Z − column mean. Hand-derived gradient, Gram trick
  (n×n when n < d); implemented in :mod:`supple.kernels.covariance`.
- ``decov``  mean over i≠j of R_ij², R the correlation matrix of the features (DeCov, on correlations).
- ``vicreg`` mean_j relu(1 − √(C_jj + 1e-4)) + ‖offdiag C‖²_F / d, with C = HcᵀHc / (n − 1).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..kernels.covariance import NORM_EPS, ipr_value_and_grad
from ..kernels.covariance import ipr as _ipr


def _prep(h: torch.Tensor, normalize: bool) -> torch.Tensor:
    if h.dim() != 2:
        raise ValueError(f"expected a 2-D (tokens × features) tensor, got shape {tuple(h.shape)}")
    x = h.float()
    if normalize:
        x = x / x.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)
    return x


def ipr(h: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Inverse participation ratio P = ‖ZcᵀZc‖²_F / ‖Zc‖⁴_F of the token covariance (see module doc)."""
    if h.dim() != 2:
        raise ValueError(f"expected a 2-D (tokens × features) tensor, got shape {tuple(h.shape)}")
    return _ipr(h, normalize)


def decov(h: torch.Tensor, normalize: bool = False, eps: float = 1e-6) -> torch.Tensor:
    """Mean squared off-diagonal entry of the d×d feature correlation matrix: Σ_{i≠j} R_ij² / (d(d−1))."""
    x = _prep(h, normalize)
    n, d = x.shape
    if d < 2:
        return x.new_zeros(())
    xc = x - x.mean(dim=0, keepdim=True)
    cov = xc.T @ xc / max(n - 1, 1)
    std = torch.diagonal(cov).clamp_min(0).sqrt().clamp_min(eps)
    corr = cov / (std[:, None] * std[None, :])
    off = (corr * corr).sum() - (torch.diagonal(corr) ** 2).sum()
    out = off / (d * (d - 1))
    if n < 2:
        out = out * float("nan")
    return out


def vicreg(h: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """VICReg variance hinge mean_j relu(1 − √(C_jj + 1e-4)) plus covariance term ‖offdiag C‖²_F / d."""
    x = _prep(h, normalize)
    n, d = x.shape
    xc = x - x.mean(dim=0, keepdim=True)
    cov = xc.T @ xc / (n - 1) if n > 1 else xc.T @ xc * float("nan")
    var_term = torch.relu(1.0 - torch.sqrt(torch.diagonal(cov) + 1e-4)).mean()
    off = (cov * cov).sum() - (torch.diagonal(cov) ** 2).sum()
    return var_term + off / d


_PENALTY_FUNCTIONS: dict[str, Callable[..., torch.Tensor]] = {"ipr": ipr, "decov": decov, "vicreg": vicreg}
PENALTIES = tuple(_PENALTY_FUNCTIONS)  # the one list of penalty names (SuppleConfig validates against it)


def get_penalty(name: str) -> Callable[..., torch.Tensor]:
    """The differentiable penalty function called ``name`` (one of :data:`PENALTIES`)."""
    try:
        return _PENALTY_FUNCTIONS[name]
    except KeyError:
        raise ValueError(f"unknown diversity penalty {name!r}: use one of {', '.join(PENALTIES)}") from None


def penalty_value_and_grad(name: str, h: torch.Tensor, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Value (0-d fp32) and gradient (fp32, shape of ``h``) of the named penalty at ``h``, no graph kept.

    ``ipr`` uses its hand-derived gradient (:func:`supple.kernels.covariance.ipr_value_and_grad`); the
    others are differentiated by autograd.
    """
    fn = get_penalty(name)
    if name == "ipr":
        return ipr_value_and_grad(h, normalize)
    with torch.enable_grad():
        x = h.detach().float().requires_grad_(True)
        p = fn(x, normalize=normalize)
        (g,) = torch.autograd.grad(p, x)
    return p.detach(), g
