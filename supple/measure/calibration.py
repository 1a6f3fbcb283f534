"""Next-token prediction metrics from logits: entropy, confidence, calibration (ECE, Brier). Pure torch.

torchmetrics is not a dependency, so the 15-bin ECE is implemented here with torchmetrics' binning
(``MulticlassCalibrationError(n_bins=B, norm="l1")``, which bins with ``torch.bucketize(..., right=True)``):

    ECE = Σ_b (n_b / N) · |accuracy_b − mean confidence_b|

with confidence the top-1 probability and B + 1 bins: a position is in bin b (0 ≤ b < B) when
b/B ≤ confidence < (b+1)/B, and a confidence of exactly 1.0 is in a bin of its own (bin B). Empty
bins count 0. Confidences are compared in float64 with the edges b/B computed in float64 (correctly
rounded); torchmetrics takes its edges from ``torch.linspace(0, 1, B + 1)`` in the confidences' dtype,
which can differ from b/B in the last bit, so only a confidence within one rounding step of an edge can
land in the neighbouring bin there. The Brier score is the multi-class one, Σ_k (p_k − y_k)² averaged
over positions, in [0, 2].
"""

from __future__ import annotations

import torch

__all__ = ["brier_score", "expected_calibration_error", "next_token_stats"]


def expected_calibration_error(
    confidence: torch.Tensor, correct: torch.Tensor, n_bins: int = 15
) -> torch.Tensor:
    """ECE of top-1 predictions with torchmetrics' bins (module docstring): ``confidence`` (N,) in [0, 1],
    ``correct`` (N,) bool/0-1; 0-d fp64 (NaN for no predictions)."""
    conf = confidence.detach().reshape(-1).double()
    acc = correct.detach().reshape(-1).double()
    if conf.numel() != acc.numel():
        raise ValueError(f"confidence and correct differ in length: {conf.numel()} vs {acc.numel()}")
    if conf.numel() == 0:
        return torch.full((), float("nan"), dtype=torch.float64)
    if n_bins < 1:
        raise ValueError(f"n_bins={n_bins} must be >= 1")
    conf = conf.clamp(0, 1)
    edges = torch.arange(n_bins + 1, dtype=torch.float64, device=conf.device) / n_bins
    bins = torch.bucketize(conf, edges, right=True) - 1  # edges[b] <= c < edges[b+1]; c = 1.0 -> bin B
    count = torch.zeros(n_bins + 1, dtype=torch.float64, device=conf.device).index_add_(
        0, bins, torch.ones_like(conf)
    )
    sum_conf = torch.zeros_like(count).index_add_(0, bins, conf)
    sum_acc = torch.zeros_like(count).index_add_(0, bins, acc)
    return (sum_acc - sum_conf).abs().sum() / conf.numel()


def brier_score(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Multi-class Brier score mean_i Σ_k (p_ik − [k = y_i])² for probabilities (N, K), targets (N,)."""
    p = probs.detach().double()
    py = p.gather(1, target.reshape(-1, 1).long()).squeeze(1)
    return ((p * p).sum(dim=1) - 2 * py + 1).mean()


def next_token_stats(
    logits: torch.Tensor, targets: torch.Tensor, chunk: int = 256
) -> dict[str, torch.Tensor]:
    """Per-position statistics of next-token predictions, computed in fp32 in chunks of rows.

    ``logits`` (N, V) at positions whose next token is ``targets`` (N,). Returns (N,) fp32 tensors
    ``entropy`` (nats), ``confidence`` (top-1 probability), ``correct`` (top-1 == target, 0/1),
    ``nll`` (−log p_target), ``brier`` (Σ_k (p_k − y_k)²) and the int ``top1`` (N,).
    """
    out: dict[str, list[torch.Tensor]] = {
        k: [] for k in ("entropy", "confidence", "correct", "nll", "brier", "top1")
    }
    for start in range(0, logits.shape[0], chunk):
        lg = logits[start : start + chunk].detach().float()
        tg = targets[start : start + chunk].reshape(-1, 1).long().to(lg.device)
        logp = torch.log_softmax(lg, dim=-1)
        p = logp.exp()
        conf, top1 = p.max(dim=-1)
        p_t = p.gather(1, tg).squeeze(1)
        out["entropy"].append(-(p * logp).sum(dim=-1))
        out["confidence"].append(conf)
        out["correct"].append((top1 == tg.squeeze(1)).float())
        out["nll"].append(-logp.gather(1, tg).squeeze(1))
        out["brier"].append((p * p).sum(dim=-1) - 2 * p_t + 1)
        out["top1"].append(top1)
    return {
        k: (torch.cat(v) if v else torch.zeros(0, dtype=torch.long if k == "top1" else torch.float32))
        for k, v in out.items()
    }
