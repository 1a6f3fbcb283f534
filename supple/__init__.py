"""supple: keep fine-tuned language models adaptable.

Public API: :class:`SuppleConfig`, :class:`SuppleCallback`.
"""

from .config import SuppleConfig

__version__ = "0.1.0"

__all__ = ["SuppleConfig", "__version__"]
