"""Reference-anchored diversity: the threshold, the hinge relu(P − T) and the automatic-weight step.

Pure tensor functions, one implementation each; every decision is a tensor op (no host sync). The callback
wiring is :mod:`supple.callbacks.reference`; the design is docs/design.md, "Reference-anchored diversity".

- threshold ``T_l = P_ref,l + tol·|P_ref,l|`` per tapped block: with ``|·|`` the threshold lies at or above the
  reference for any sign of the penalty (the built-in ones are >= 0, a log-determinant-style penalty is not);
- hinge ``relu(P − T)``: value ``max(P − T, 0)``, gradient ``∂P/∂H`` where ``P > T`` and 0 elsewhere;
- weight step ``λ ← clamp(λ·exp(rate·err), λ_min, λ_max)``, ``err`` the mean over blocks with data of
  ``clamp((P̄_l − T_l)/|P_ref,l|, −1, 1)``.
"""

from __future__ import annotations

import torch

_REF_EPS = 1e-12  # |P_ref| below this is taken as this (the relative error of a zero reference)


def anchor_threshold(p_ref: torch.Tensor, tolerance: float) -> torch.Tensor:
    """``T = P_ref + tolerance·|P_ref|`` (elementwise; a NaN reference gives a NaN threshold, never exceeded)."""
    return p_ref + float(tolerance) * p_ref.abs()


def hinge_value_and_grad(
    p: torch.Tensor, g: torch.Tensor, threshold: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The hinge ``relu(P − T)`` of a penalty value ``p`` (0-d) whose gradient is ``g``.

    Returns ``(value, grad, active)``: ``max(p − T, 0)``, ``g`` where ``p > T`` else zeros (the subgradient 0
    at ``p = T``, as ``torch.relu``), and the 0-d boolean ``p > T``. Decided on device.
    """
    active = p > threshold
    return torch.relu(p - threshold), torch.where(active, g, torch.zeros_like(g)), active


def auto_weight_step(
    weight: torch.Tensor,
    p_mean: torch.Tensor,
    threshold: torch.Tensor,
    p_ref: torch.Tensor,
    valid: torch.Tensor,
    rate: float,
    low: float,
    high: float,
) -> torch.Tensor:
    """One step of the automatic weight: ``clamp(weight·exp(rate·err), low, high)``.

    Args:
        weight: the current λ (0-d).
        p_mean: per block, the step's mean penalty P̄_l (any value where ``valid`` is False).
        threshold: per block, T_l.
        p_ref: per block, P_ref,l.
        valid: per block, whether the step had a finite penalty there and T_l is finite; the others are left
            out of the mean (no valid block: err = 0, λ only clamped).
        rate, low, high: the step size and the bounds.
    """
    err = ((p_mean - threshold) / p_ref.abs().clamp_min(_REF_EPS)).clamp(-1.0, 1.0)
    ok = valid & torch.isfinite(err)
    mean_err = torch.where(ok, err, torch.zeros_like(err)).sum() / ok.sum().clamp_min(1)
    return (weight * torch.exp(float(rate) * mean_err)).clamp(float(low), float(high))
