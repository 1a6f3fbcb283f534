"""Shared fixtures."""

from __future__ import annotations

import pytest

import supple.callbacks.diversity as diversity_mod


@pytest.fixture
def count_penalties(monkeypatch):
    """Token counts of every diversity-penalty evaluation the callback makes (spies on the real function)."""
    calls = []
    real = diversity_mod.penalty_value_and_grad

    def spy(name, h, normalize):
        calls.append(h.shape[0])
        return real(name, h, normalize)

    monkeypatch.setattr(diversity_mod, "penalty_value_and_grad", spy)
    return calls
