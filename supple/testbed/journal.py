"""The demo's journal of finished jobs (``out/jobs.jsonl``), which ``supple demo --resume`` reads back."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, replace
from typing import TYPE_CHECKING

from . import tasks as T
from .settings import SUPPLE_ARM_DEFAULTS, Budget
from .stages import Stage

if TYPE_CHECKING:
    from .pipeline import DemoConfig

__all__ = ["Journal"]

_LEGACY_PROBES = ("reverse_words", "number_words")  # the probe families before word_codes
# Budget fields only training reads, and the budget's name (a label): the base model's job (geometry, held-out
# tasks, probes of the untrained model) is the same whatever they are, so its signature leaves them out
_TRAINING_ONLY = ("name", "steps", "seeds", "batch_size", "grad_accum", "lora_r", "lora_alpha", "lr_lora", "lr_full",
                  "dpo_beta")


class Journal:
    """Finished jobs, one JSON line each, in ``out/jobs.jsonl``: an interrupted demo loses nothing finished, and
    ``--resume`` reruns only what is missing. A line counts only for the same model, budget, stages, regime and
    supple overrides (its ``signature``). The base-model job is signed with the probe seeds it runs
    (``Budget.for_base_model``) and the (seed, arm) jobs without ``probe_seeds_base``, so changing
    ``--base-probe-seeds`` under ``--resume`` reruns the base model only. The base-model job's signature leaves
    out what only training reads (stage steps and learning rates, the regime, the training budget fields), so a
    pilot of other steps or learning rates into a journal holding that job reuses it; a base-model line written
    before (signed with everything) still counts for the same settings. The supple arm's overrides
    (``--supple``) sign the supple arm's jobs only, the one arm they change: trying another supple setting under
    ``--resume`` reuses the baseline's and the other arms' jobs."""

    def __init__(self, cfg: DemoConfig, stages: list[Stage]) -> None:
        self.path = os.path.join(cfg.out, "jobs.jsonl") if cfg.out else None
        rest = {"model": cfg.model, "stages": [asdict(s) for s in stages], "lora": cfg.lora,
                "defaults": SUPPLE_ARM_DEFAULTS, "probes": list(T.PROBE_FAMILIES)}

        def dump(payload: dict) -> str:
            return json.dumps(payload, sort_keys=True, default=str)

        def sign(budget: Budget, overrides: dict) -> str:
            return dump({**rest, "supple": overrides, "budget": asdict(replace(budget, probe_seeds_base=0))})

        base = cfg.budget.for_base_model()
        self.base_signature = dump(
            {"model": cfg.model, "probes": rest["probes"],
             "stages": [{"name": s.name, "kind": s.kind, "family": s.family} for s in stages],
             "budget": {k: v for k, v in asdict(base).items() if k not in _TRAINING_ONLY + ("probe_seeds_base",)}})
        self._legacy_base_signature = sign(base, {})  # how base-model lines were signed before
        self.signature, self.supple_signature = sign(cfg.budget, {}), sign(cfg.budget, cfg.supple_overrides)
        if self.path and not cfg.resume and os.path.exists(self.path):
            os.remove(self.path)

    def _signature_for(self, seed: int | None, arm: str | None) -> str:
        if seed is None:
            return self.base_signature
        return self.supple_signature if arm == "supple" else self.signature

    def _accepted(self, seed: int | None, arm: str | None) -> tuple[str, ...]:
        """The signatures a stored line of this job may carry: its own, and for the base model the older one."""
        ours = self._signature_for(seed, arm)
        return (ours, self._legacy_base_signature) if seed is None else (ours,)

    def load(self) -> dict[tuple, dict]:
        out: dict[tuple, dict] = {}
        if not self.path or not os.path.exists(self.path):
            return out
        with open(self.path, encoding="utf-8") as fh:
            for line in fh:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut by an interruption
                    continue
                stored = row.get("signature")
                if any(stored == sig or self._compatible(stored, sig)
                       for sig in self._accepted(row.get("seed"), row.get("arm"))):
                    out[(row["seed"], row["arm"])] = row["out"]
        return out

    @staticmethod
    def _compatible(stored: str | None, ours: str) -> bool:
        """Same settings, written before a newer version added budget fields: a field missing from the stored
        signature matches when this run uses its default value."""
        if not stored:
            return False
        old, new = json.loads(stored), json.loads(ours)
        defaults = json.loads(json.dumps(asdict(Budget()), default=str))
        ob, nb = old.pop("budget", {}), new.pop("budget", {})
        old.setdefault("probes", list(_LEGACY_PROBES))  # journals written before the probes were signed
        if old != new or any(ob[k] != v for k, v in nb.items() if k in ob):
            return False
        return all(nb[k] == defaults.get(k) for k in nb if k not in ob) and set(ob) <= set(nb)

    def add(self, job, out: dict) -> None:
        if not self.path:
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        line = json.dumps({"signature": self._signature_for(job.seed, job.arm), "seed": job.seed, "arm": job.arm, "out": out},
                          default=lambda o: o.item() if hasattr(o, "item") else str(o))
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")
