"""The one loader of a ``benchmarks/NAME.py`` script as a module, for the tests of those scripts."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]


def load_benchmark(name: str, alias: str | None = None) -> ModuleType:
    """A fresh module of ``benchmarks/<name>.py`` (imported under ``alias``, default ``_test_<name>``)."""
    spec = importlib.util.spec_from_file_location(alias or f"_test_{name}", REPO / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
