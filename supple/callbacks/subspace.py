"""Input subspaces of earlier post-training stages, for the cross-stage LoRA decorrelation term.

Two sources, both read with safetensors only (never pickle); PEFT adapter directories go through the one
adapter reader, :func:`supple.measure.adapters.read_adapter`:
- a saved PEFT LoRA adapter directory (``adapter_model.safetensors``): per module, the right singular
  vectors of ΔW = B·A with non-negligible singular values;
- a subspace file written by :func:`capture_update_subspace` after a merged (or full fine-tuning) stage:
  per module, the top-k right singular vectors of ΔW = W_after − W_before.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..modeling import normalize_module_name
from ..regularizers.geometry import lora_delta_svd

SUBSPACE_FORMAT = "supple-subspace-v1"
_REL_TOL = 1e-6


def _right_basis(delta: torch.Tensor, k: int) -> torch.Tensor:
    """Orthonormal basis (d_in × k') of the top right singular vectors of ``delta`` (out × in)."""
    _, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    if s.numel() == 0 or float(s[0]) == 0.0:
        return delta.new_zeros(delta.shape[1], 0, dtype=torch.float32)
    keep = int((s > _REL_TOL * s[0]).sum())
    if k > 0:
        keep = min(keep, k)
    return vh[:keep].T.contiguous().float()


@torch.no_grad()
def capture_update_subspace(
    model_before: nn.Module, model_after: nn.Module, k: int = 16, path: str | os.PathLike | None = None
) -> dict[str, torch.Tensor]:
    """Top-``k`` right singular vectors of ΔW = W_after − W_before for every 2-D linear weight that changed.

    Use it after a stage whose update was merged into the weights (or after full fine-tuning), and pass
    the saved file to the next stage through ``SuppleConfig.previous_adapters``. Returns
    ``{module_name: U (d_in × k')}``; with ``path`` also writes it as safetensors.
    """
    if k < 1:
        raise ValueError(f"capture_update_subspace: k={k} must be >= 1")
    before = {normalize_module_name(n): m for n, m in model_before.named_modules() if isinstance(m, nn.Linear)}
    bases: dict[str, torch.Tensor] = {}
    for name, mod in model_after.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        key = normalize_module_name(name)
        other = before.get(key)
        if other is None or other.weight.shape != mod.weight.shape:
            continue
        delta = mod.weight.detach().float().cpu() - other.weight.detach().float().cpu()
        if not torch.any(delta != 0):
            continue
        u = _right_basis(delta, k)
        if u.shape[1]:
            bases[key] = u
    if not bases:
        raise ValueError("capture_update_subspace: no linear weight differs between the two models.")
    if path is not None:
        save_subspace(bases, path)
    return bases


def save_subspace(bases: dict[str, torch.Tensor], path: str | os.PathLike) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        path.mkdir(parents=True, exist_ok=True)
        path = path / "supple_subspace.safetensors"
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in bases.items()}, str(path), metadata={"format": SUBSPACE_FORMAT})
    return path


def _load_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    tensors = {}
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        for key in f.keys():
            tensors[key] = f.get_tensor(key)
    return tensors, meta


def _adapter_bases(tensors: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    a_keys = {k[: -len(".lora_A.weight")]: k for k in tensors if k.endswith(".lora_A.weight")}
    bases = {}
    for prefix, a_key in a_keys.items():
        b_key = prefix + ".lora_B.weight"
        if b_key not in tensors:
            continue
        _, sv, vh = lora_delta_svd(tensors[a_key], tensors[b_key], scaling, dtype=torch.float64)
        if sv.numel() == 0 or float(sv.max()) == 0.0:
            continue
        keep = sv > _REL_TOL * sv.max()  # thin SVD via QR of the factors: never forms ΔW (d_out × d_in)
        bases[normalize_module_name(prefix)] = vh[keep].T.contiguous().float()
    return bases


def _read_adapter_bases(p: Path, raw: str) -> dict[str, torch.Tensor]:
    """Bases of a saved PEFT adapter directory, read by the one adapter reader (supple.measure.adapters)."""
    from ..measure.adapters import read_adapter

    files = read_adapter(p, what=f"SuppleConfig.previous_adapters: {raw!r}:")
    cfg = files.config
    r, alpha = cfg.get("r") or 1, cfg.get("lora_alpha") or 1
    scaling = alpha / (r**0.5) if cfg.get("use_rslora") else alpha / r  # the basis does not depend on it
    bases = _adapter_bases(files.tensors, scaling)
    if not bases:
        raise ValueError(f"SuppleConfig.previous_adapters: {raw!r} holds no LoRA A/B pairs with a non-zero update.")
    return bases


def _subspace_file(p: Path, raw: str) -> Path:
    """The safetensors file of a subspace directory or path; pickles are refused before anything is read."""
    from ..measure.adapters import refuse_pickles

    what = "SuppleConfig.previous_adapters:"
    refuse_pickles(p, what=f"{what} {raw!r}:")
    if p.is_dir():
        for name in ("supple_subspace.safetensors", "adapter_model.safetensors"):
            if (p / name).exists():
                return p / name
        raise FileNotFoundError(f"{what} {raw!r} has no adapter_model.safetensors or supple_subspace.safetensors.")
    if p.suffix != ".safetensors":
        raise ValueError(f"{what} {raw!r} is not a .safetensors file; supple never unpickles user files.")
    return p


def load_previous_subspaces(paths: list[str], max_rank: int = 0) -> dict[str, torch.Tensor]:
    """Union of the earlier stages' input subspaces per module, orthonormalized: ``{name: U (d_in × k)}``.

    Each path is a PEFT adapter directory (``adapter_model.safetensors``), a subspace directory or a
    ``.safetensors`` file. Pickled checkpoints (``adapter_model.bin``) are refused.
    """
    merged: dict[str, list[torch.Tensor]] = {}
    what = "SuppleConfig.previous_adapters:"
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise FileNotFoundError(f"{what} {raw!r} does not exist.")
        bases = _read_adapter_bases(p, raw) if p.is_dir() and (p / "adapter_config.json").is_file() else None
        if bases is None:
            f = _subspace_file(p, raw)
            try:
                tensors, meta = _load_safetensors(f)
            except Exception as exc:
                raise ValueError(f"{what} could not read {str(f)!r} as safetensors: {exc}") from exc
            if meta.get("format") == SUBSPACE_FORMAT:
                bases = {normalize_module_name(k): v.float() for k, v in tensors.items()}
            else:
                bases = _adapter_bases(tensors, 1.0)
            if not bases:
                raise ValueError(f"{what} {str(f)!r} holds no LoRA A/B pairs with a non-zero update.")
        for name, u in bases.items():
            merged.setdefault(name, []).append(u)
    out = {}
    for name, us in merged.items():
        d_in = {u.shape[0] for u in us}
        if len(d_in) != 1:
            raise ValueError(f"SuppleConfig.previous_adapters: module {name!r} has inconsistent input sizes {d_in}.")
        cat = torch.cat(us, dim=1)
        u = _right_basis(cat.T, max_rank)  # orthonormal basis of the union of column spaces
        out[name] = u
    return out
