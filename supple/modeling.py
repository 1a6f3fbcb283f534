"""Model introspection shared by callbacks/, measure/ and testbed/: decoder blocks, unwrapping, LoRA modules."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

_BLOCK_LIST_NAMES = ("layers", "h", "blocks", "layer", "decoder_layers")
_BLOCK_PATHS = (  # where the common architectures keep their decoder blocks
    "model.layers",  # Llama, Qwen2, Mistral, Gemma
    "model.language_model.layers",
    "model.decoder.layers",  # OPT
    "transformer.h",  # GPT-2, GPT-J, Falcon
    "transformer.layers",
    "transformer.blocks",
    "gpt_neox.layers",
    "backbone.layers",
)


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP/`module` wrappers and PEFT wrappers, returning the underlying transformers model."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "module") and isinstance(model.module, nn.Module) and type(model).__name__ in (
            "DistributedDataParallel",
            "DataParallel",
        ):
            model = model.module
            continue
        get_base = getattr(model, "get_base_model", None)
        if callable(get_base):
            base = get_base()
            if base is not model:
                model = base
                continue
    return model


def num_hidden_layers(model: nn.Module) -> int | None:
    cfg = getattr(unwrap_model(model), "config", None)
    if cfg is None:
        return None
    if hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        v = getattr(cfg, name, None)
        if isinstance(v, int):
            return v
    return None


def find_decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ``nn.ModuleList`` of decoder blocks of a causal LM (Llama, Qwen2, Mistral, GPT-2, NeoX, ...).

    Returns ``(qualified_name, module_list)`` on the unwrapped model. Raises ``ValueError`` when no
    block list is found.
    """
    base = unwrap_model(model)
    for path in _BLOCK_PATHS:
        try:
            mod = base.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            return path, mod
    want = num_hidden_layers(base)
    candidates: list[tuple[int, str, nn.ModuleList]] = []
    for name, mod in base.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        last = name.rsplit(".", 1)[-1]
        score = 0
        if want is not None and len(mod) == want:
            score += 2
        if last in _BLOCK_LIST_NAMES:
            score += 1
        if score:
            candidates.append((score, name, mod))
    if not candidates:
        raise ValueError(
            f"could not find the decoder blocks of {type(base).__name__}: expected an nn.ModuleList such as "
            "`model.layers` (Llama/Qwen2/Mistral) or `transformer.h` (GPT-2)."
        )
    candidates.sort(key=lambda c: (-c[0], c[1].count(".")))
    _, name, blocks = candidates[0]
    return name, blocks


def resolve_layer_indices(indices: list[int], n_layers: int, field: str = "diversity_layers") -> list[int]:
    """Map possibly negative block indices to ``0..n_layers-1``; ValueError naming the field otherwise."""
    out = []
    for i in indices:
        j = i + n_layers if i < 0 else i
        if not 0 <= j < n_layers:
            raise ValueError(
                f"SuppleConfig.{field}={list(indices)!r}: index {i} is out of range for a model with "
                f"{n_layers} decoder blocks; use 0..{n_layers - 1} or -1..-{n_layers}."
            )
        out.append(j)
    if len(set(out)) != len(out):
        raise ValueError(f"SuppleConfig.{field}={list(indices)!r} names the same block twice.")
    return out


@dataclass
class LoraModuleRef:
    """One LoRA-adapted linear layer: its normalized name and the active adapter's A/B parameters."""

    name: str
    lora_a: nn.Parameter
    lora_b: nn.Parameter
    scaling: float
    module: nn.Module


def normalize_module_name(name: str) -> str:
    """Name of a (LoRA-wrapped) module independent of PEFT wrapping: 'model.layers.0.self_attn.q_proj'."""
    for prefix in ("base_model.model.", "module."):
        while name.startswith(prefix):
            name = name[len(prefix):]
    for suffix in (".base_layer",):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name


def find_lora_modules(model: nn.Module) -> list[LoraModuleRef]:
    """LoRA linear layers of a PEFT model (active adapter only); empty for a model without LoRA."""
    try:
        from peft.tuners.lora import LoraLayer
    except Exception:  # peft missing: no LoRA modules
        return []
    refs = []
    root = model.module if type(model).__name__ == "DistributedDataParallel" else model
    for name, mod in root.named_modules():
        if not isinstance(mod, LoraLayer):
            continue
        for adapter in getattr(mod, "active_adapters", []) or []:
            if adapter not in getattr(mod, "lora_A", {}):
                continue
            a = mod.lora_A[adapter].weight
            b = mod.lora_B[adapter].weight
            if a.dim() != 2 or b.dim() != 2:  # conv LoRA: not supported
                continue
            scaling = mod.scaling.get(adapter, 1.0) if isinstance(getattr(mod, "scaling", None), dict) else 1.0
            refs.append(LoraModuleRef(normalize_module_name(name), a, b, float(scaling), mod))
    return refs


def attention_token_mask(attention_mask: torch.Tensor | None, shape: tuple[int, int]) -> torch.Tensor | None:
    """A boolean (B, T) mask of real tokens matching hidden states of ``shape`` (None = all tokens)."""
    if attention_mask is None or attention_mask.dim() != 2:
        return None
    if tuple(attention_mask.shape) == tuple(shape):
        return attention_mask.bool()
    b, t = shape
    if attention_mask.shape[0] == b and attention_mask.shape[1] < t:  # virtual tokens prepended
        pad = attention_mask.new_ones(b, t - attention_mask.shape[1])
        return torch.cat([pad, attention_mask], dim=1).bool()
    return None
