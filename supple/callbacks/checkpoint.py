"""What a checkpoint keeps of :class:`~supple.SuppleCallback` (docs/design.md, "Reference-anchored diversity").

The callback is a ``transformers.ExportableState``: its ``state()`` is written into ``trainer_state.json`` at every
checkpoint (``stateful_callbacks["SuppleCallback"]``), and a resumed run finds it again in the ``TrainerState``
the Trainer loads before ``on_train_begin``. supple reads it there itself, so nothing depends on
``restore_callback_states_from_checkpoint`` (off by default), which would re-create the callback.
"""

from __future__ import annotations

from typing import Any


def saved_state(state: Any, cb: Any) -> dict | None:
    """This callback's part of a resumed checkpoint's ``state.stateful_callbacks`` (None if there is none).

    Also makes sure the entry exists: transformers updates ``stateful_callbacks[name]`` in place when it saves,
    and a state resumed from a checkpoint written without this callback lacks it (a KeyError at the next save).
    """
    stored = getattr(state, "stateful_callbacks", None)
    if not isinstance(stored, dict):
        return None
    name = type(cb).__name__
    entry = stored.get(name)
    if entry is None:
        stored[name] = cb.state()
        return None
    if isinstance(entry, list):
        entry = entry[0] if entry else None
    return entry.get("supple") if isinstance(entry, dict) else None


def check_not_recreated(cb: Any) -> None:
    """transformers' ``restore_callback_states_from_checkpoint=True`` replaces the callback by
    ``SuppleCallback()``; that copy lacks the original's explicit config and objects, which would silently change
    the run. A copy of a callback that had neither (settings from the trainer's args) is the same callback."""
    lacks = cb.__dict__.get("_recreated_without")
    if not lacks or not (lacks.get("config") or lacks.get("objects")):
        return
    what = " and ".join(x for x, on in (("its SuppleConfig", lacks.get("config")),
                                        (f"its objects {lacks.get('objects')}", lacks.get("objects"))) if on)
    raise ValueError(
        "restore_callback_states_from_checkpoint=True made transformers re-create SuppleCallback from the "
        f"checkpoint without {what}. Set restore_callback_states_from_checkpoint=False: supple restores its own "
        "state (the diversity reference and weight) from the checkpoint either way."
    )
