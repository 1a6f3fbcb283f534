"""Geometry of token representations and of LoRA updates: pure torch measurement functions.

No transformers here. Every function takes plain tensors, accumulates in fp32 at least (spectra always
in float64, see below; ``dtype=torch.float64`` makes the rest float64 too, as :mod:`supple.measure`
does) and returns 0-d tensors (no host sync), so the callback's live monitoring can call them every N
steps.

Token matrices: H is (n tokens, d features). With ``normalize_tokens=True`` each row is first scaled
to unit length, Z = H / max(‖h_i‖, 1e-6) (the cosine geometry the ipr penalty acts on, blind to
"massive activations"); otherwise Z = H. Zc = Z − column mean. The covariance spectrum is
λ_1 ≥ … ≥ λ_m ≥ 0 (m = min(n, d)), the squared singular values σ_i² of Zc, computed from the Gram
matrix on the smaller side (ZcZcᵀ, n×n, when n < d; ZcᵀZc, d×d, otherwise): the two share their
non-zero eigenvalues.

Spectra are always computed in float64, whatever ``dtype`` (which sets the precision of the other
metrics and of the returned values): the normalization, centering, Gram matrix and eigendecomposition
run on a float64 copy of H. A float32 Gram resolves eigenvalues only down to about max(n, d)·eps₃₂·λ_1
≈ 7·10⁻⁵·λ_1 at n, d ≈ 576, and one attention-sink token makes λ_1 hundreds of times the typical
eigenvalue, so in float32 most of a real spectrum falls under that floor (an earlier float32 version
read 2.2 instead of 46 for a power-law spectrum, n = 512, d = 576, with one token at 300× the median
norm; ``tests/test_definitions.py`` checks these cases against float64). In float64 eigenvalues
below the Gram's rounding floor max(n, d)·eps₆₄·λ_1 are set to 0, so exactly rank-deficient data
reads as such (float32 rounding of the data adds singular values near 10⁻⁷·σ_1, which move the
effective rank by less than 10⁻⁴ relative).

- ``effective_rank`` (the definition supple reports as ``erank``): the Roy & Vetterli (2007)
  effective rank of the *centered* matrix, exp(−Σ_i p_i log p_i) with p_i = σ_i / Σ_j σ_j over the
  singular values σ_i of Zc (not their squares; terms with p_i = 0 count 0). In [1, min(n−1, d)]:
  1 for rank-1 data, ≈ d for isotropic data with n ≫ d. Centering makes it a property of the
  spread of the tokens, blind to a common offset.
- ``rankme``: RankMe of Garrido et al. (2023) exactly as published, on the *uncentered* matrix Z:
  exp(−Σ_k p_k log p_k) with p_k = σ_k(Z) / Σ_j σ_j(Z) + ε (ε = 1e-7), over all min(n, d) singular
  values. A common offset is one more (dominant) direction here, so on offset data the two differ
  widely: compare numbers only under the same definition.
- ``effective_rank_ratio``: ``effective_rank / min(n − 1, d)``, in (0, 1]. Centering removes one
  dimension, and with n ≤ d tokens the rank is at most n − 1: compare layers or models only through
  this ratio (or at equal n), a known pitfall of the unnormalized effective rank.
- ``participation_ratio``: (Σλ)² / Σλ² = 1 / ipr (see :func:`supple.regularizers.ipr`), in
  [1, min(n−1, d)]; needs no eigendecomposition: Σλ = ‖Zc‖²_F and Σλ² = ‖Gram‖²_F.
- ``top_pc_share``: λ_1 / Σλ, the share of variance in the top principal component.
- ``anisotropy``: mean cosine between distinct tokens (Ethayarajh 2019). Exact over all n(n−1)
  ordered pairs by default, in O(nd): with unit rows u_i, Σ_{i≠j} u_i·u_j = ‖Σu_i‖² − Σ‖u_i‖²;
  or over ``num_pairs`` random distinct pairs. ``center=True`` subtracts the column mean first.
- ``norm_stats``: mean / median / std / min / max of the token norms ‖h_i‖ and max / median
  (an attention sink shows as a ratio in the hundreds).
- ``linear_cka``: linear centered kernel alignment (Kornblith et al. 2019) between two token
  matrices of the same n tokens: ‖YcᵀXc‖²_F / (‖XcᵀXc‖_F ‖YcᵀYc‖_F), on the Gram side when n < d.

LoRA updates: ΔW = s·B·A with A (r×d_in), B (d_out×r) and s = α/r (or α/√r for rsLoRA). Its SVD is
found through two thin QRs and an r×r SVD (never forming the d_out×d_in matrix): B = Q_B R_B,
Aᵀ = Q_A R_A, ΔW = Q_B (s R_B R_Aᵀ) Q_Aᵀ.

- ``stable_rank`` = ‖ΔW‖²_F / σ_1² = Σσ² / σ_1², in [1, rank].
- ``singular_value_stats``: stable rank, effective rank (Roy–Vetterli on the given σ) and ``top_share`` =
  σ_1 / Σσ (share of the nuclear norm; σ_1² / Σσ² would just be 1 / stable rank).
- ``subspace_overlap``: mean squared cosine of the principal angles between two column spans,
  ‖Q_UᵀQ_V‖²_F / min(k_U, k_V), in [0, 1] (1: one span contains the other; 0: orthogonal).
"""

from __future__ import annotations

import torch

NORM_EPS = 1e-6

__all__ = [
    "anisotropy",
    "covariance_spectrum",
    "effective_rank",
    "effective_rank_ratio",
    "geometry_summary",
    "linear_cka",
    "lora_delta_svd",
    "norm_stats",
    "participation_ratio",
    "principal_cosines",
    "rankme",
    "singular_value_stats",
    "stable_rank",
    "subspace_overlap",
    "top_pc_share",
]


# --------------------------------------------------------------------------------------------- helpers
def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")


def _as_matrix(h: torch.Tensor, normalize_tokens: bool, dtype: torch.dtype) -> torch.Tensor:
    if h.dim() != 2:
        raise ValueError(f"expected a 2-D (tokens × features) tensor, got shape {tuple(h.shape)}")
    _check_dtype(dtype)
    x = h.detach().to(dtype)
    if normalize_tokens:
        x = x / x.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)
    return x


def _centered(h: torch.Tensor, normalize_tokens: bool, dtype: torch.dtype) -> torch.Tensor:
    x = _as_matrix(h, normalize_tokens, dtype)
    return x - x.mean(dim=0, keepdim=True)


def _gram(xc: torch.Tensor) -> torch.Tensor:
    """The smaller of XcXcᵀ (n×n) and XcᵀXc (d×d): same non-zero eigenvalues."""
    n, d = xc.shape
    return xc @ xc.T if n < d else xc.T @ xc


def _nan(like: torch.Tensor) -> torch.Tensor:
    return torch.full((), float("nan"), dtype=like.dtype, device=like.device)


def _float64(h: torch.Tensor, normalize_tokens: bool) -> torch.Tensor:
    """A float64 copy of the token matrix (MPS has no float64: computed on the CPU there)."""
    if h.device.type == "mps":
        h = h.cpu()
    return _as_matrix(h, normalize_tokens, torch.float64)


def _gram_spectrum(x: torch.Tensor) -> torch.Tensor:
    """Eigenvalues (descending, ≥ 0, length min(n, d)) of xᵀx for a float64 x, from the Gram matrix on
    the smaller side; values under its rounding floor max(n, d)·eps₆₄·λ_1 are set to 0."""
    n, d = x.shape
    lam = torch.linalg.eigvalsh(_gram(x)).flip(0).clamp_min(0)
    if lam.numel() == 0:
        return lam
    floor = max(n, d) * torch.finfo(torch.float64).eps * lam[0]
    return torch.where(lam > floor, lam, torch.zeros_like(lam))


def _entropy_rank(weights: torch.Tensor) -> torch.Tensor:
    """exp(entropy of weights / Σweights) for non-negative weights; NaN when they sum to 0."""
    total = weights.sum()
    p = weights / total
    ent = -(p * torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))).sum()
    out = torch.exp(ent)
    return torch.where(total > 0, out, _nan(out))


# ----------------------------------------------------------------------------------- token geometry
def covariance_spectrum(
    h: torch.Tensor, normalize_tokens: bool = False, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Eigenvalues λ (descending, ≥ 0, length min(n, d)) of ZcᵀZc, i.e. the squared singular values
    of the centered token matrix, computed in float64 (values under the float64 Gram rounding floor
    set to 0) and returned in ``dtype``."""
    _check_dtype(dtype)
    x = _float64(h, normalize_tokens)
    return _gram_spectrum(x - x.mean(dim=0, keepdim=True)).to(dtype).to(h.device)


def effective_rank(
    h: torch.Tensor, normalize_tokens: bool = False, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Roy–Vetterli effective rank of the centered token matrix: exp(−Σ p_i log p_i), p_i = σ_i / Σσ_j
    over the singular values of Zc; in [1, min(n−1, d)]. Spectrum in float64, result in ``dtype``.

    NaN with fewer than two distinct tokens. Compare across n or d only via
    :func:`effective_rank_ratio`. For the uncentered RankMe of Garrido et al. use :func:`rankme`.
    """
    _check_dtype(dtype)
    x = _float64(h, normalize_tokens)
    lam = _gram_spectrum(x - x.mean(dim=0, keepdim=True))
    return _entropy_rank(lam.sqrt()).to(dtype).to(h.device)


def rankme(
    h: torch.Tensor, normalize_tokens: bool = False, dtype: torch.dtype = torch.float32, eps: float = 1e-7
) -> torch.Tensor:
    """RankMe (Garrido et al. 2023) of the *uncentered* token matrix Z, as published:
    exp(−Σ_k p_k log p_k) with p_k = σ_k(Z) / Σ_j σ_j(Z) + ``eps`` over all min(n, d) singular values.

    Spectrum in float64 (singular values under the float64 Gram rounding floor count as 0), result in
    ``dtype``; NaN for an all-zero matrix.
    """
    _check_dtype(dtype)
    if eps < 0:
        raise ValueError(f"rankme: eps={eps} must be >= 0 (RankMe uses 1e-7)")
    sigma = _gram_spectrum(_float64(h, normalize_tokens)).sqrt()
    total = sigma.sum()
    p = sigma / total + eps
    out = torch.exp(-(p * torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))).sum())
    return torch.where(total > 0, out, _nan(out)).to(dtype).to(h.device)


def effective_rank_ratio(
    h: torch.Tensor, normalize_tokens: bool = False, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """:func:`effective_rank` divided by its maximum min(n − 1, d); in (0, 1]."""
    n, d = h.shape
    return effective_rank(h, normalize_tokens, dtype) / max(min(n - 1, d), 1)


def participation_ratio(
    h: torch.Tensor, normalize_tokens: bool = False, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """(Σλ)² / Σλ² of the token covariance spectrum = 1 / ipr; in [1, min(n−1, d)], NaN if no variance."""
    xc = _centered(h, normalize_tokens, dtype)
    s = (xc * xc).sum()
    g = _gram(xc)
    q = (g * g).sum()
    return torch.where(q > 0, s * s / q, _nan(s))


def top_pc_share(
    h: torch.Tensor, normalize_tokens: bool = False, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """λ_1 / Σλ: share of the token variance along the top principal component; in [1/min(n−1,d), 1].
    Spectrum in float64, result in ``dtype``."""
    _check_dtype(dtype)
    x = _float64(h, normalize_tokens)
    lam = _gram_spectrum(x - x.mean(dim=0, keepdim=True))
    if lam.numel() == 0:
        return _nan(h.new_zeros((), dtype=dtype))
    total = lam.sum()
    return torch.where(total > 0, lam[0] / total, _nan(total)).to(dtype).to(h.device)


def anisotropy(
    h: torch.Tensor,
    num_pairs: int | None = None,
    generator: torch.Generator | None = None,
    center: bool = False,
    normalize_tokens: bool = False,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Mean cosine similarity between distinct tokens; 1 when all token vectors point the same way.

    ``num_pairs=None`` (default): exact mean over all ordered pairs i ≠ j, O(nd). Otherwise the mean
    over ``num_pairs`` uniformly sampled pairs of distinct tokens (``generator`` for reproducibility).
    ``center=True``: after subtracting the column mean (of the unit rows when ``normalize_tokens``;
    without centering ``normalize_tokens`` changes nothing, cosine being scale-free). Zero vectors
    count as cosine 0. NaN with fewer than two tokens.
    """
    x = _as_matrix(h, normalize_tokens, dtype)
    n = x.shape[0]
    if n < 2:
        return _nan(x.new_zeros(()))
    if center:
        x = x - x.mean(dim=0, keepdim=True)
    u = x / x.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)
    if num_pairs is None:
        total = u.sum(dim=0)
        return ((total * total).sum() - (u * u).sum()) / (n * (n - 1))
    i = torch.randint(0, n, (num_pairs,), generator=generator, device="cpu").to(u.device)
    j = (i + torch.randint(1, n, (num_pairs,), generator=generator, device="cpu").to(u.device)) % n
    return (u[i] * u[j]).sum(dim=1).mean()


def norm_stats(h: torch.Tensor, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Token-norm statistics ``{"norm_mean", "norm_median", "norm_std", "norm_min", "norm_max",
    "norm_max_over_median"}`` (0-d tensors); a massive-activation token shows in the last one."""
    x = _as_matrix(h, False, dtype)
    norms = x.norm(dim=1)
    if norms.numel() == 0:
        nan = _nan(x.new_zeros(()))
        return {
            k: nan
            for k in ("norm_mean", "norm_median", "norm_std", "norm_min", "norm_max", "norm_max_over_median")
        }
    med = norms.median()
    return {
        "norm_mean": norms.mean(),
        "norm_median": med,
        "norm_std": norms.std(unbiased=False),
        "norm_min": norms.min(),
        "norm_max": norms.max(),
        "norm_max_over_median": norms.max() / med.clamp_min(NORM_EPS),
    }


def linear_cka(
    x: torch.Tensor, y: torch.Tensor, normalize_tokens: bool = False, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Linear CKA between two representations (n×d1, n×d2) of the same n tokens; in [0, 1], 1 when
    they agree up to rotation and isotropic scaling. NaN when either has no variance."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"linear_cka needs the same tokens in both: {x.shape[0]} vs {y.shape[0]} rows")
    xc = _centered(x, normalize_tokens, dtype)
    yc = _centered(y, normalize_tokens, dtype)
    n = xc.shape[0]
    if n < max(xc.shape[1], yc.shape[1]):
        kx, ky = xc @ xc.T, yc @ yc.T
        cross = (kx * ky).sum()
        nx, ny = kx.norm(), ky.norm()
    else:
        c = yc.T @ xc
        cross = (c * c).sum()
        nx, ny = (xc.T @ xc).norm(), (yc.T @ yc).norm()
    den = nx * ny
    return torch.where(den > 0, cross / den, _nan(den))


def geometry_summary(
    h: torch.Tensor,
    normalize_tokens: bool = False,
    dtype: torch.dtype = torch.float32,
    num_pairs: int | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """All token-geometry metrics of ``h``, from one float64 copy, its centered Gram matrix and one
    eigendecomposition (plus one of the uncentered Gram for ``rankme``): ``erank``, ``erank_ratio``,
    ``rankme``, ``participation_ratio``, ``pr_ratio`` (PR / min(n−1, d)), ``top_pc_share``,
    ``anisotropy``, ``anisotropy_centered`` (0-d tensors in ``dtype``, same definitions as the single
    functions)."""
    _check_dtype(dtype)
    x = _float64(h, normalize_tokens)
    n, d = x.shape
    cap = max(min(n - 1, d), 1)
    xc = x - x.mean(dim=0, keepdim=True)
    g = _gram(xc)
    s = (xc * xc).sum()
    q = (g * g).sum()
    lam = _gram_spectrum(xc)
    total = lam.sum()
    er = _entropy_rank(lam.sqrt())
    pr = torch.where(q > 0, s * s / q, _nan(s))
    out = {
        "erank": er,
        "erank_ratio": er / cap,
        "rankme": rankme(x, dtype=torch.float64),
        "participation_ratio": pr,
        "pr_ratio": pr / cap,
        "top_pc_share": torch.where(total > 0, lam[0] / total, _nan(total)) if lam.numel() else _nan(s),
        "anisotropy": anisotropy(x, num_pairs, generator, center=False, dtype=torch.float64),
        "anisotropy_centered": anisotropy(x, num_pairs, generator, center=True, dtype=torch.float64),
    }
    return {k: v.to(dtype).to(h.device) for k, v in out.items()}


# ------------------------------------------------------------------------------------ LoRA updates
def lora_delta_svd(
    lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float = 1.0, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``(U (d_out×r), S (r,), Vh (r×d_in))`` of ΔW = scaling·B·A without forming ΔW.

    ``lora_a``: (r, d_in) (PEFT's ``lora_A.weight``), ``lora_b``: (d_out, r) (``lora_B.weight``).
    """
    if lora_a.dim() != 2 or lora_b.dim() != 2 or lora_a.shape[0] != lora_b.shape[1]:
        raise ValueError(
            f"expected A (r×d_in) and B (d_out×r), got {tuple(lora_a.shape)} and {tuple(lora_b.shape)}"
        )
    a = lora_a.detach().to(dtype)
    b = lora_b.detach().to(dtype)
    qb, rb = torch.linalg.qr(b)  # (d_out×k), (k×r)
    qa, ra = torch.linalg.qr(a.T)  # (d_in×k), (k×r)
    um, s, vmh = torch.linalg.svd(scaling * (rb @ ra.T), full_matrices=False)
    return qb @ um, s, vmh @ qa.T


def singular_value_stats(s: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{"stable_rank", "effective_rank", "top_share", "frobenius"}`` of non-negative singular values
    ``s``: Σσ²/σ_1², exp(entropy of σ/Σσ), σ_1/Σσ and √Σσ². NaN (but frobenius 0) when all are 0."""
    s = s.detach().clamp_min(0)
    if s.numel() == 0:
        nan = torch.full((), float("nan"))
        return {"stable_rank": nan, "effective_rank": nan, "top_share": nan, "frobenius": torch.zeros(())}
    smax = s.max()
    sq = (s * s).sum()
    total = s.sum()
    nan = _nan(sq)
    return {
        "stable_rank": torch.where(smax > 0, sq / (smax * smax).clamp_min(torch.finfo(s.dtype).tiny), nan),
        "effective_rank": _entropy_rank(s),
        "top_share": torch.where(total > 0, smax / total.clamp_min(torch.finfo(s.dtype).tiny), nan),
        "frobenius": sq.sqrt(),
    }


def stable_rank(w: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """‖W‖²_F / σ_1(W)² of a matrix; in [1, rank(W)]."""
    return singular_value_stats(torch.linalg.svdvals(w.detach().to(dtype)))["stable_rank"]


def _orthonormal_basis(u: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if u.dim() != 2:
        raise ValueError(f"expected a (dim × k) matrix whose columns span the subspace, got {tuple(u.shape)}")
    uu, s, _ = torch.linalg.svd(u.detach().to(dtype), full_matrices=False)
    keep = s > max(u.shape) * torch.finfo(dtype).eps * (s[0] if s.numel() else 0)
    return uu[:, keep]


def principal_cosines(u: torch.Tensor, v: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Cosines of the principal angles (descending) between the column spans of ``u`` (dim×k1) and
    ``v`` (dim×k2); the columns need not be orthonormal (rank-deficient parts are dropped)."""
    if u.shape[0] != v.shape[0]:
        raise ValueError(f"subspaces live in different spaces: {u.shape[0]} vs {v.shape[0]} rows")
    qu, qv = _orthonormal_basis(u, dtype), _orthonormal_basis(v, dtype)
    return torch.linalg.svdvals(qu.T @ qv).clamp(0, 1)


def subspace_overlap(u: torch.Tensor, v: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Mean squared principal-angle cosine ‖Q_uᵀQ_v‖²_F / min(k_u, k_v) between two column spans."""
    cos = principal_cosines(u, v, dtype)
    k = cos.numel()
    if k == 0:
        return torch.full((), float("nan"), dtype=dtype)
    return (cos * cos).sum() / k
