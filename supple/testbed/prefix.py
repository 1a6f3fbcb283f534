"""Shared stage prefixes: an arm whose first stages train exactly as the baseline's (same seed, same data order, no
callback that changes training) starts from the baseline's checkpoint after them instead of training them again.

The baseline job of a training seed keeps its model after stage ``k`` (under ``--save-models DIR`` where it keeps
every checkpoint anyway, else in the run's work directory); the arm's job loads it into a copy of the base model,
takes the baseline's records of stages ``1..k`` as its own (they are the same computation) and trains from stage
``k + 1``. Every stage re-seeds from ``1000 * seed + stage`` (:func:`supple.testbed.runner.run_job`), so the stages
after the branch see what they would have seen without it; ``tests/test_demo_prefix.py`` checks the records equal.
"""

from __future__ import annotations

import copy
import glob
import os

from .settings import ARM_TABLE
from .stages import arm_stage_config, wants_cross

__all__ = ["branch_records", "load_weights", "prefix_path", "shared_stages"]

# SuppleConfig fields that change training when set (a weight above 0, a method, a replay corpus or a metric pass)
_ACTIVE = ("diversity_weight", "decorrelation_weight", "decorrelation_cross_weight", "replay_data", "refresh_method",
           "metrics_every")


def _plain_stage(setup, arm_name: str, i: int) -> bool:
    """Whether ``arm_name`` trains stage ``i`` (1-based) exactly as the baseline does."""
    arm = ARM_TABLE[arm_name]
    if arm.anchor_weight or (arm.boundary_refresh and i > 1):
        return False
    scfg, _ = arm_stage_config(setup, arm_name, i, i > 1)  # i > 1: as if earlier LoRA subspaces were there,
    # so a cross-stage term counts as active
    if scfg is None:
        return True
    return not any(getattr(scfg, f) for f in _ACTIVE)


def shared_stages(setup, arm_name: str) -> int:
    """How many leading stages ``arm_name`` shares with the baseline (0 for the baseline itself, and at most all but
    the last stage: an arm equal to the baseline everywhere is still trained, as an A/A control)."""
    if arm_name == "baseline" or (setup.cfg.lora and wants_cross(setup, arm_name)):
        return 0  # a cross-stage term needs the update subspaces of the arm's own earlier LoRA stages
    k = 0
    while k < len(setup.stages) - 1 and _plain_stage(setup, arm_name, k + 1):
        k += 1
    return k


def prefix_path(setup, seed: int, k: int) -> str:
    """Where the baseline's model after stage ``k`` of training seed ``seed`` is kept."""
    name = setup.stages[k - 1].name
    if setup.cfg.save_models:
        return os.path.join(setup.cfg.save_models, f"seed{seed}", "baseline", name)
    return os.path.join(setup.workdir, "prefix", f"seed{seed}", name)


def load_weights(model, path: str) -> None:
    """Copy the safetensors weights saved in ``path`` (``save_pretrained``) into ``model``, exactly. A parameter the
    files leave out must be tied to one they hold (``save_pretrained`` drops tied copies, e.g. ``lm_head``)."""
    from safetensors.torch import load_file

    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {path}: the baseline's checkpoint to branch from is missing")
    state = {}
    for f in files:
        state.update(load_file(f))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise ValueError(f"{path} holds weights the model does not have: {', '.join(unexpected[:3])}")
    params = model.state_dict(keep_vars=True)
    loaded = {params[k].data_ptr() for k in state if k in params}
    untied = [k for k in missing if params[k].data_ptr() not in loaded]
    if untied:
        raise ValueError(f"{path} lacks weights of the model: {', '.join(untied[:3])}")


def branch_records(prefix_out: dict, arm_name: str, k: int) -> dict:
    """The baseline job's results of stages ``1..k``, relabelled as ``arm_name``'s (train info marked shared)."""
    out = {"records": [], "measure_rows": [], "supple_configs": {}, "notes": list(prefix_out.get("notes", []))}
    names = set()
    for rec in prefix_out["records"]:
        if rec["stage_index"] <= k:
            rec = copy.deepcopy(rec)
            rec["arm"] = arm_name
            rec["train"] = {**(rec.get("train") or {}), "shared_with": "baseline"}
            out["records"].append(rec)
            names.add(rec["stage"])
    for row in prefix_out["measure_rows"]:
        if row.get("stage") in names:
            row = dict(row, arm=arm_name)
            if isinstance(row.get("model"), str) and row["model"].startswith("baseline/"):
                row["model"] = f"{arm_name}/{row['model'].split('/', 1)[1]}"
            out["measure_rows"].append(row)
    return out
