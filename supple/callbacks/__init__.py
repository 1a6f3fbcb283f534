"""TrainerCallback wiring: SuppleCallback and its parts (docs/design.md).

Parts: :mod:`.diversity` (hidden-state taps), :mod:`.decorrelation` (LoRA terms), :mod:`.replay`,
:mod:`.refresh`, :mod:`.metrics`; they share one :class:`~.context.TrainingContext`.
"""

from .context import TrainerRequiredError, TrainingContext
from .subspace import capture_update_subspace, load_previous_subspaces, save_subspace
from .supple_callback import SuppleCallback
from .tokens import select_tokens, token_generator

__all__ = [
    "SuppleCallback",
    "TrainerRequiredError",
    "TrainingContext",
    "capture_update_subspace",
    "load_previous_subspaces",
    "save_subspace",
    "select_tokens",
    "token_generator",
]
