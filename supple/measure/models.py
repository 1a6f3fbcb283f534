"""The parts of a causal LM the measurements need beyond its decoder blocks, and loading the models
the CLI names.

The decoder blocks come from :func:`supple.modeling.find_decoder_blocks`, the one block finder
(``(qualified name, nn.ModuleList)``, on plain and PEFT-wrapped Hugging Face causal LMs); the final norm
is looked up beside them, the output projection through ``get_output_embeddings()``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..modeling import find_decoder_blocks, unwrap_model

__all__ = ["find_final_norm", "find_lm_head", "load_model"]

_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "norm_f", "final_norm")


def find_final_norm(model: nn.Module) -> nn.Module | None:
    """The norm applied after the last decoder block (``model.norm``, ``transformer.ln_f``, ...), or None:
    looked up on the module that holds the block list."""
    base = unwrap_model(model)
    blocks_name, _ = find_decoder_blocks(base)
    parent = base.get_submodule(blocks_name.rpartition(".")[0]) if "." in blocks_name else base
    for name in _NORM_NAMES:
        mod = getattr(parent, name, None)
        if isinstance(mod, nn.Module):
            return mod
    return None


def find_lm_head(model: nn.Module) -> nn.Module:
    """The output projection to vocabulary logits (``get_output_embeddings()``)."""
    base = unwrap_model(model)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if head is None:
        head = getattr(base, "lm_head", None)
    if head is None:
        raise ValueError(f"{type(base).__name__} has no output embeddings (lm_head)")
    return head


# -------------------------------------------------------------------------------------------- loading
def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto", "float32", "fp32"):
        return torch.float32
    table = {
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}: use float32, bfloat16 or float16")
    return table[dtype]


def _has_tokenizer(path: Path) -> bool:
    return any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def load_tokenizer(path: str | os.PathLike):
    """``AutoTokenizer`` from a local directory (``local_files_only=True``)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def load_model(spec: str, device: str | None = "auto", dtype: str | torch.dtype | None = "float32"):
    """Load ``(model, tokenizer, name)`` for a CLI MODEL argument, in eval mode on ``device``.

    ``spec``: ``embedded`` (SmolLM2-135M-Instruct via :func:`supple.measure.embedded.load_embedded_model`),
    a PEFT adapter directory (has ``adapter_config.json``; the base model is loaded from its
    ``base_model_name_or_path``, which must be a local directory or ``embedded``, and the adapter
    attached, not merged), or a local Hugging Face model directory. Local files only, safetensors only
    (:mod:`supple.measure.adapters`): a hub id is refused, not downloaded, and pickled weights
    (``adapter_model.bin``, ``pytorch_model.bin``) are refused before anything is loaded.
    """
    from .adapters import is_adapter_dir, load_local_model, load_peft_adapter, read_adapter, refuse_pickles

    dev, dt = resolve_device(device), resolve_dtype(dtype)
    if spec == "embedded":
        from .embedded import load_embedded_model

        res = load_embedded_model(dtype=dt)
        model, tok = (res[0], res[1]) if isinstance(res, tuple) else (res, None)
        if tok is None:
            tok = load_tokenizer(model.name_or_path)
        model = model.to(device=dev, dtype=dt).eval()
        return model, tok, "embedded"
    path = Path(spec)
    if not path.is_dir():
        refuse_pickles(path, "MODEL")
        raise FileNotFoundError(
            f"MODEL {spec!r} is neither 'embedded' nor a local model or adapter directory"
        )
    name = path.resolve().name or str(path)
    if is_adapter_dir(path):
        files = read_adapter(path)  # refuses a pickled adapter before any load
        cfg = files.config
        base_path = cfg.get("base_model_name_or_path")
        if not base_path:
            raise ValueError(f"{path}/adapter_config.json names no base_model_name_or_path")
        if base_path == "embedded":
            base, tok, _ = load_model("embedded", device, dt)
        else:
            what = f"base model of adapter {str(path)!r} (base_model_name_or_path in adapter_config.json)"
            base = load_local_model(base_path, dt, what)
            tok = load_tokenizer(path if _has_tokenizer(path) else base_path)
        model = load_peft_adapter(base, files)
        return model.to(dev).eval(), tok, name
    if not (path / "config.json").exists():
        refuse_pickles(path, "MODEL")
        raise FileNotFoundError(
            f"{path} has neither config.json (a model) nor adapter_config.json (an adapter)"
        )
    model = load_local_model(path, dt, "MODEL")
    tok = load_tokenizer(path)
    return model.to(dev).eval(), tok, name
