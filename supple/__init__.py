"""supple: keep fine-tuned language models adaptable.

Public API: :class:`SuppleConfig`, :class:`SuppleCallback`, :func:`capture_update_subspace`.
"""

from .callbacks import SuppleCallback, capture_update_subspace
from .config import SuppleConfig

__version__ = "0.1.0"

__all__ = ["SuppleCallback", "SuppleConfig", "__version__", "capture_update_subspace"]
