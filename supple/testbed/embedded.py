"""The embedded model (SmolLM2-135M-Instruct): re-exported from :mod:`supple.measure.embedded`, its one home.

Kept so that ``supple.testbed.embedded`` still works; the objects here are those of the measure module
(there is exactly one :class:`EmbeddedModelMissing`).
"""

from __future__ import annotations

from ..measure.embedded import (
    CHECKPOINT_NAME,
    GGUF_FILE,
    GGUF_PACKAGE,
    INSTALL_HINT,
    EmbeddedModelMissing,
    cache_dir,
    embedded_checkpoint_dir,
    embedded_gguf_path,
    load_embedded_model,
)

__all__ = [
    "CHECKPOINT_NAME",
    "GGUF_FILE",
    "GGUF_PACKAGE",
    "INSTALL_HINT",
    "EmbeddedModelMissing",
    "cache_dir",
    "embedded_checkpoint_dir",
    "embedded_gguf_path",
    "load_embedded_model",
]
