"""The one reader of saved models and adapters: safetensors only, local files only.

supple never unpickles a user file and never opens a network connection. Everything that reads a saved
PEFT adapter or a model directory goes through this module:

- :func:`refuse_pickles` raises :class:`PickleRefusedError` *before anything is loaded* when a directory
  holds only pickled weights (``adapter_model.bin``, ``pytorch_model.bin``, ``*.pt``, ...), with the
  fix: save with safetensors, ``save_pretrained(..., safe_serialization=True)``.
- :func:`read_adapter` reads ``adapter_config.json`` (JSON) and ``adapter_model.safetensors``
  (safetensors): a PEFT adapter's configuration and tensors, without a base model.
- :func:`load_peft_adapter` attaches a saved adapter to a base model from those tensors
  (``peft.set_peft_model_state_dict``; PEFT's own weight loader, which would fall back to
  ``torch.load`` of a ``.bin``, is never called).
- :func:`local_model_dir` checks that a base model named by an adapter is a local directory with
  safetensors weights, and :func:`load_local_model` loads one with ``local_files_only=True`` and
  ``use_safetensors=True``.

``supple.callbacks.subspace`` can read ``previous_adapters`` with :func:`read_adapter` as well. This module
imports neither transformers nor peft at module level.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "AdapterFiles",
    "PickleRefusedError",
    "is_adapter_dir",
    "load_local_model",
    "load_peft_adapter",
    "local_model_dir",
    "read_adapter",
    "refuse_pickles",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
SAFETENSORS_HINT = "save it with safetensors: `save_pretrained(..., safe_serialization=True)`"


class PickleRefusedError(ValueError):
    """A checkpoint is stored only as a pickle, which supple refuses to load (it could run code)."""


def _pickles(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES)


def refuse_pickles(path: str | os.PathLike, what: str = "adapter") -> None:
    """Raise :class:`PickleRefusedError` when ``path`` is a pickle file, or a directory whose weights
    are only pickles (no ``*.safetensors``). Nothing is opened or loaded; only names are looked at."""
    p = Path(path)
    if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES:
        raise PickleRefusedError(
            f"{what} {str(p)!r} is a pickle; supple never unpickles user files (it could run code): "
            f"{SAFETENSORS_HINT}."
        )
    if not p.is_dir() or any(p.glob("*.safetensors")):
        return
    found = _pickles(p)
    if found:
        raise PickleRefusedError(
            f"{what} {str(p)!r} holds only pickled weights ({', '.join(found)}); supple never unpickles "
            f"user files (it could run code) and reads safetensors only: {SAFETENSORS_HINT}."
        )


@dataclass
class AdapterFiles:
    """A saved PEFT adapter: its ``adapter_config.json`` and the tensors of ``adapter_model.safetensors``
    (keys as PEFT saves them, e.g. ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``)."""

    path: Path
    config: dict
    tensors: dict[str, torch.Tensor]


def is_adapter_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory holding a PEFT ``adapter_config.json``."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def read_adapter(path: str | os.PathLike, what: str = "adapter") -> AdapterFiles:
    """Read a saved PEFT adapter directory with json and safetensors only.

    Raises ``FileNotFoundError`` (no such directory, no ``adapter_config.json``),
    :class:`PickleRefusedError` (weights only as ``adapter_model.bin`` or another pickle) or
    ``ValueError`` (no weights, an unreadable config or safetensors file), each naming the path and the fix.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{what} {str(p)!r} is not a directory")
    if not (p / ADAPTER_CONFIG).is_file():
        raise FileNotFoundError(f"{what} {str(p)!r} is not a PEFT adapter directory (no {ADAPTER_CONFIG})")
    weights = p / ADAPTER_WEIGHTS
    if not weights.is_file():
        refuse_pickles(p, what)
        raise ValueError(f"{what} {str(p)!r} has no {ADAPTER_WEIGHTS}; {SAFETENSORS_HINT}.")
    try:
        config = json.loads((p / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{what} {str(p)!r}: cannot read {ADAPTER_CONFIG} as JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise ValueError(f"{what} {str(p)!r}: {ADAPTER_CONFIG} is not a JSON object")
    try:
        tensors = load_file(str(weights))
    except (OSError, SafetensorError) as exc:
        raise ValueError(f"{what} {str(p)!r}: cannot read {ADAPTER_WEIGHTS} as safetensors: {exc}") from exc
    return AdapterFiles(p, config, tensors)


def local_model_dir(spec: str | os.PathLike, what: str = "model") -> Path:
    """``spec`` as a local Hugging Face model directory with safetensors weights, or a clear error.

    A hub id (``HuggingFaceTB/SmolLM2-135M``) is refused rather than downloaded: supple loads local
    files only.
    """
    p = Path(spec)
    if not p.is_dir():
        raise FileNotFoundError(
            f"{what} {str(spec)!r} is not a local directory; supple loads local files only and never downloads: "
            "download the model first (e.g. `huggingface-cli download NAME --local-dir DIR`) and pass DIR"
        )
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{what} {str(p)!r} has no config.json (not a Hugging Face model directory)")
    refuse_pickles(p, what)
    if not any(p.glob("*.safetensors")):
        raise ValueError(f"{what} {str(p)!r} has no *.safetensors weights; {SAFETENSORS_HINT}.")
    return p


def load_local_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32, what: str = "model"):
    """``AutoModelForCausalLM`` from a local directory: safetensors only, ``local_files_only=True``."""
    from transformers import AutoModelForCausalLM

    p = local_model_dir(path, what)
    return AutoModelForCausalLM.from_pretrained(p, dtype=dtype, local_files_only=True, use_safetensors=True)


def load_peft_adapter(base_model, source: str | os.PathLike | AdapterFiles, adapter_name: str = "default"):
    """A ``PeftModel`` of ``base_model`` with the adapter saved in ``source`` (a directory, or what
    :func:`read_adapter` read from one) attached, not merged, in eval mode. Raises ``ValueError`` when
    the adapter's tensors do not fit the base model."""
    from peft import PeftConfig, PeftModel, set_peft_model_state_dict

    files = source if isinstance(source, AdapterFiles) else read_adapter(source)
    config = PeftConfig.from_pretrained(str(files.path))  # reads the local adapter_config.json
    config.inference_mode = True
    model = PeftModel(base_model, config, adapter_name=adapter_name)
    try:
        result = set_peft_model_state_dict(model, files.tensors, adapter_name=adapter_name)
    except RuntimeError as exc:  # a shape mismatch: the adapter was trained on another base model
        first = " ".join(str(exc).split())[:300]
        raise ValueError(
            f"adapter {str(files.path)!r} does not fit its base model ({first}); check base_model_name_or_path "
            f"in {ADAPTER_CONFIG}"
        ) from exc
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise ValueError(
            f"adapter {str(files.path)!r} does not fit its base model: {len(unexpected)} tensors match no module "
            f"(first: {unexpected[0]}); check base_model_name_or_path in {ADAPTER_CONFIG}"
        )
    return model.eval()
