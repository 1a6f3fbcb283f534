"""Spectra of LoRA updates ΔW = s·B·A per module, and how much two adapters' subspaces overlap.

A source of LoRA factors is a PEFT model (``PeftModel`` or a model with LoRA layers injected, its
layers found by :func:`supple.modeling.scan_lora_modules`, the one LoRA walker; the first active
adapter, or ``adapter_name``), a saved adapter directory (``adapter_config.json`` +
``adapter_model.safetensors``, read by :func:`supple.measure.adapters.read_adapter`: safetensors only;
no base model needed), or a ready mapping from
:func:`lora_factors`. Module names are the base model's (``model.layers.3.self_attn.q_proj``).
The scaling s is lora_alpha / r (lora_alpha / √r with rsLoRA), honouring rank/alpha patterns. LoRA
layers the walker does not support (AdaLoRA, LoRA on an embedding or a convolution) are left out, with a
warning that names them.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ..modeling import scan_lora_modules
from ..regularizers.geometry import lora_delta_svd, singular_value_stats, subspace_overlap
from .adapters import read_adapter
from .records import record

__all__ = ["LoraFactors", "adapter_overlap", "lora_factors", "lora_update_spectra"]

_LAYER_RE = re.compile(r"\.(\d+)\.")


@dataclass
class LoraFactors:
    """One LoRA module: ``a`` (r×d_in), ``b`` (d_out×r), ΔW = scaling·b·a."""

    a: torch.Tensor
    b: torch.Tensor
    scaling: float


def _split_name(name: str) -> tuple[int | None, str]:
    m = _LAYER_RE.search(name)
    if m is None:
        return None, name
    return int(m.group(1)), name[m.end() :]


def _pattern_value(patterns: Mapping[str, float], name: str, default: float) -> float:
    for pat, v in patterns.items():
        if re.match(rf"(.*\.)?{pat}$", name):
            return v
    return default


def _factors_from_dir(path: Path) -> dict[str, LoraFactors]:
    files = read_adapter(path)  # safetensors only: a pickled adapter_model.bin is refused unread
    cfg, sd = files.config, files.tensors
    alpha_pat = cfg.get("alpha_pattern") or {}
    rslora = bool(cfg.get("use_rslora", False))
    out = {}
    for key, a in sd.items():
        if not key.endswith(".lora_A.weight"):
            continue
        stem = key[: -len(".lora_A.weight")]
        b = sd.get(stem + ".lora_B.weight")
        if b is None or a.dim() != 2:
            continue
        name = stem.removeprefix("base_model.model.")
        r = a.shape[0]
        alpha = _pattern_value(alpha_pat, name, cfg.get("lora_alpha", r))
        out[name] = LoraFactors(a.float(), b.float(), alpha / (math.sqrt(r) if rslora else r))
    return out


def _factors_from_model(model: torch.nn.Module, adapter_name: str | None) -> dict[str, LoraFactors]:
    """Factors of the linear LoRA layers :func:`~supple.modeling.scan_lora_modules` finds, by module name.

    Without ``adapter_name``: the first active adapter of each layer (the walker lists the active ones in
    order). With it: that adapter's factors, read from each layer the walker found.
    """
    scan = scan_lora_modules(model)
    if scan.unsupported:
        warnings.warn(
            f"LoRA spectra leave out {len(scan.unsupported)} unsupported LoRA layer(s): "
            f"{scan.describe_unsupported()}.",
            stacklevel=3,
        )
    out: dict[str, LoraFactors] = {}
    for ref in scan.linear:
        if ref.name in out:
            continue
        a, b, scaling = ref.lora_a, ref.lora_b, ref.scaling
        if adapter_name is not None:
            mod = ref.module
            if adapter_name not in mod.lora_A or adapter_name not in mod.lora_B:
                continue
            a, b = mod.lora_A[adapter_name].weight, mod.lora_B[adapter_name].weight
            scaling = float(mod.scaling[adapter_name])
        out[ref.name] = LoraFactors(a.detach().float().cpu(), b.detach().float().cpu(), float(scaling))
    return out


def lora_factors(
    source: torch.nn.Module | str | Path | Mapping[str, LoraFactors], adapter_name: str | None = None
) -> dict[str, LoraFactors]:
    """``{module name: LoraFactors}`` of a PEFT model, a saved adapter directory, or such a mapping."""
    if isinstance(source, Mapping):
        return dict(source)
    if isinstance(source, (str, Path)):
        path = Path(source)
        return _factors_from_dir(path)
    return _factors_from_model(source, adapter_name)


def lora_update_spectra(
    source: torch.nn.Module | str | Path | Mapping[str, LoraFactors],
    adapter_name: str | None = None,
    name: str = "model",
) -> list[dict]:
    """Per LoRA module: ``stable_rank``, ``effective_rank``, ``top_share`` (σ_1/Σσ) and ``frobenius``
    of ΔW (group "lora", source "lora_delta", layer = block index parsed from the module name, n = r).
    Empty when the source has no LoRA modules."""
    rows = []
    for mod_name, f in lora_factors(source, adapter_name).items():
        _, s, _ = lora_delta_svd(f.a, f.b, f.scaling, dtype=torch.float64)
        layer, short = _split_name(mod_name)
        for metric, v in singular_value_stats(s).items():
            rows.append(
                record(name, "lora", "lora_delta", metric, v, layer=layer, module=short, n=int(f.a.shape[0]))
            )
    return rows


def _subspaces(
    factors: dict[str, LoraFactors], k: int | None
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    out = {}
    for name, f in factors.items():
        u, s, vh = lora_delta_svd(f.a, f.b, f.scaling, dtype=torch.float64)
        keep = int((s > s.max() * 1e-10).sum()) if s.numel() else 0
        if k:
            keep = min(keep, k)
        out[name] = (vh[:keep].T, u[:, :keep])  # input (d_in×k), output (d_out×k)
    return out


def adapter_overlap(
    source_a,
    source_b,
    k: int | None = None,
    names: tuple[str, str] = ("a", "b"),
) -> list[dict]:
    """Principal-angle overlap (mean squared cosine, in [0, 1]) between two LoRA updates per module.

    For each module in both sources: ``input_overlap`` between the top-``k`` right singular spaces
    of the two ΔW (the input directions they read) and ``output_overlap`` between the left singular
    spaces (the directions they write); ``k=None`` uses every non-zero singular direction.
    ``source_b`` may also be a mapping ``{module name: U}`` of input subspaces (d_in×k, any basis),
    as ``previous_adapters`` subspaces are stored; then only ``input_overlap`` is reported.
    Records: group "lora", source "overlap", model = names[1], reference = names[0].
    """
    sub_a = _subspaces(lora_factors(source_a), k)
    raw_b = source_b if isinstance(source_b, Mapping) else None
    if raw_b is not None and raw_b and all(isinstance(v, torch.Tensor) for v in raw_b.values()):
        sub_b = {n: (u.double(), None) for n, u in raw_b.items()}
    else:
        sub_b = _subspaces(lora_factors(source_b), k)
    rows = []
    for mod_name in sorted(set(sub_a) & set(sub_b)):
        layer, short = _split_name(mod_name)
        (ia, oa), (ib, ob) = sub_a[mod_name], sub_b[mod_name]
        pairs = [("input_overlap", ia, ib)]
        if ob is not None:
            pairs.append(("output_overlap", oa, ob))
        for metric, x, y in pairs:
            if x.shape[1] == 0 or y.shape[1] == 0:
                v = float("nan")
            else:
                v = subspace_overlap(x, y, dtype=torch.float64)
            rows.append(
                record(
                    names[1],
                    "lora",
                    "overlap",
                    metric,
                    v,
                    layer=layer,
                    module=short,
                    n=int(min(x.shape[1], y.shape[1])),
                    reference=names[0],
                )
            )
    return rows
