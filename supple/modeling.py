"""Model introspection shared by callbacks/, measure/ and testbed/: decoder blocks, unwrapping, LoRA modules.

One implementation each: :func:`find_decoder_blocks`, :func:`resolve_layer_indices`, :func:`scan_lora_modules`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

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


def resolve_layer_indices(
    indices: list[int], n_layers: int, field: str = "diversity_layers", *, label: str | None = None,
    dedupe: bool = False,
) -> list[int]:
    """Map possibly negative block indices to ``0..n_layers-1``; ValueError naming what is resolved otherwise.

    By default the error names ``SuppleConfig.{field}``; ``label`` names something else instead (a CLI
    option, a function argument: ``label="--layer"`` gives "--layer 5 is out of range ..."). A block named
    twice is an error, unless ``dedupe``: then the result is the sorted distinct blocks.
    """
    out = []
    for i in indices:
        j = i + n_layers if i < 0 else i
        if not 0 <= j < n_layers:
            where = f"{label} {i}" if label is not None else f"SuppleConfig.{field}={list(indices)!r}: index {i}"
            raise ValueError(
                f"{where} is out of range for a model with "
                f"{n_layers} decoder blocks; use 0..{n_layers - 1} or -1..-{n_layers}."
            )
        out.append(j)
    if dedupe:
        return sorted(set(out))
    if len(set(out)) != len(out):
        where = f"{label} {list(indices)!r}" if label is not None else f"SuppleConfig.{field}={list(indices)!r}"
        raise ValueError(f"{where} names the same block twice.")
    return out


@dataclass
class LoraModuleRef:
    """One LoRA-adapted linear layer: its normalized name and the active adapter's A/B parameters.

    ``magnitude`` is DoRA's magnitude vector (one entry per output feature) when the adapter uses DoRA,
    else None.
    """

    name: str
    lora_a: nn.Parameter
    lora_b: nn.Parameter
    scaling: float
    module: nn.Module
    magnitude: nn.Parameter | None = None


@dataclass
class LoraScan:
    """What :func:`scan_lora_modules` found: the supported linear LoRA layers, and everything else.

    ``unsupported`` maps module names to what they are ("AdaLoRA", "LoRA on an embedding", ...), so that
    callers can refuse or report them instead of skipping them silently.
    """

    linear: list[LoraModuleRef] = field(default_factory=list)
    unsupported: dict[str, str] = field(default_factory=dict)

    def describe_unsupported(self, limit: int = 4) -> str:
        """``'name (kind), ...'`` of the first ``limit`` unsupported modules."""
        items = [f"{n} ({k})" for n, k in sorted(self.unsupported.items())]
        more = f" and {len(items) - limit} more" if len(items) > limit else ""
        return ", ".join(items[:limit]) + more


def normalize_module_name(name: str) -> str:
    """Name of a (LoRA-wrapped) module independent of PEFT wrapping: 'model.layers.0.self_attn.q_proj'."""
    for prefix in ("base_model.model.", "module."):
        while name.startswith(prefix):
            name = name[len(prefix):]
    for suffix in (".base_layer",):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name


def _adapter_kind(mod: nn.Module, adapter: str) -> str | None:
    """Why an adapter of a PEFT LoRA layer is not a plain (or DoRA) linear LoRA; None when it is one."""
    la = getattr(mod, "lora_A", None)
    if isinstance(la, nn.ParameterDict):
        return "AdaLoRA (lora_A is a ParameterDict)"
    emb = getattr(mod, "lora_embedding_A", None)
    if emb is not None and adapter in emb:
        return "LoRA on an embedding"
    if la is None or adapter not in la:
        return None
    weight = getattr(la[adapter], "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return "LoRA on a convolution"
    return ""


def scan_lora_modules(model: nn.Module) -> LoraScan:
    """The one LoRA-module walker: every PEFT LoRA layer of ``model`` (active adapters only).

    Plain and DoRA linear adapters land in ``linear``; AdaLoRA, embedding and convolution adapters in
    ``unsupported``. A model without LoRA (or without peft installed) gives an empty scan.
    """
    try:
        from peft.tuners.lora import LoraLayer
    except Exception:  # peft missing: no LoRA modules
        return LoraScan()
    scan = LoraScan()
    root = model.module if type(model).__name__ == "DistributedDataParallel" else model
    for name, mod in root.named_modules():
        if not isinstance(mod, LoraLayer):
            continue
        for adapter in getattr(mod, "active_adapters", []) or []:
            kind = _adapter_kind(mod, adapter)
            if kind is None:
                continue
            key = normalize_module_name(name)
            if kind:
                scan.unsupported[key] = kind
                continue
            a = mod.lora_A[adapter].weight
            b = mod.lora_B[adapter].weight
            scaling = mod.scaling.get(adapter, 1.0) if isinstance(getattr(mod, "scaling", None), dict) else 1.0
            magnitude = None
            if (getattr(mod, "use_dora", None) or {}).get(adapter, False):
                magnitude = mod.lora_magnitude_vector[adapter].weight
            scan.linear.append(LoraModuleRef(key, a, b, float(scaling), mod, magnitude))
    return scan


def find_lora_modules(model: nn.Module) -> list[LoraModuleRef]:
    """Linear (plain or DoRA) LoRA layers of a PEFT model, active adapter only; see :func:`scan_lora_modules`."""
    return scan_lora_modules(model).linear


def module_path(root: nn.Module, target: nn.Module) -> list[nn.Module]:
    """The modules from ``root`` down to ``target``'s parent (``root`` first); empty if ``target`` is not inside."""
    names = {id(m): n for n, m in root.named_modules()}
    name = names.get(id(target))
    if name is None:
        return []
    path, mod = [root], root
    parts = name.split(".") if name else []
    for part in parts[:-1]:
        mod = getattr(mod, part)
        path.append(mod)
    return path


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


def forward_input_names(model: nn.Module) -> frozenset[str]:
    """Keyword arguments the underlying transformers model's ``forward`` accepts: its named parameters and,
    where it takes ``**kwargs: Unpack[TransformersKwargs]``, the keys of ``TransformersKwargs`` (packed-sequence
    and attention kwargs such as ``cu_seq_lens_q``)."""
    base = unwrap_model(model)
    params = inspect.signature(base.forward).parameters.values()
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    if any(p.kind is p.VAR_KEYWORD for p in params):
        try:
            from transformers.utils import TransformersKwargs

            names |= set(getattr(TransformersKwargs, "__annotations__", {}))
        except Exception:  # pragma: no cover - older transformers
            pass
    return frozenset(names)
