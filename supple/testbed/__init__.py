"""The testbed: the embedded model, generated verifiable tasks, and the sequential post-training pipeline
behind ``supple demo`` (baseline vs supple, several seeds)."""

from .embedded import EmbeddedModelMissing, embedded_checkpoint_dir, load_embedded_model
from .pipeline import (
    ARMS,
    PRESETS,
    STAGE_KINDS,
    SUPPLE_ARM_DEFAULTS,
    Budget,
    DemoConfig,
    Stage,
    StageContext,
    StageOutcome,
    parse_stages,
    register_stage_kind,
    run_demo,
    supple_arm_config,
)
from .settings import SUPPLE_LAST_STAGE
from .tasks import FAMILIES, ROLES, get_family
from .tiny import make_tiny_model, make_tiny_tokenizer

__all__ = [
    "ARMS",
    "FAMILIES",
    "PRESETS",
    "ROLES",
    "STAGE_KINDS",
    "SUPPLE_ARM_DEFAULTS",
    "SUPPLE_LAST_STAGE",
    "Budget",
    "DemoConfig",
    "EmbeddedModelMissing",
    "Stage",
    "StageContext",
    "StageOutcome",
    "embedded_checkpoint_dir",
    "get_family",
    "load_embedded_model",
    "make_tiny_model",
    "make_tiny_tokenizer",
    "parse_stages",
    "register_stage_kind",
    "run_demo",
    "supple_arm_config",
]
