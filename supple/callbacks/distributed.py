"""Sharded parameters (FSDP2 DTensors) and what each distributed backend supports (docs/design.md, "Distributed").

FSDP2 (``torch.distributed.fsdp.fully_shard``, accelerate's ``fsdp_version: 2``) turns every parameter into a
DTensor sharded on dim 0; its ``.grad`` is a DTensor with the same placements, into which FSDP2's
reduce-scatter accumulates. The helpers below let the parts read whole tensors where the math needs them
(LoRA A matrices, a refreshed weight) and write back only the local shard. Every helper is the identity on
a plain tensor, so one process (and DDP) takes exactly the code path it took before.

:func:`check_backend` is called at train begin and refuses, with a clear error, what cannot work: DeepSpeed
(all parameter terms, replay, refresh, fp16 hidden-state terms, ZeRO-3 metrics) and FSDP1 (flat parameters).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

try:  # torch >= 2.4
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor
except Exception:  # pragma: no cover - torch without DTensor
    DTensor = None  # type: ignore[assignment,misc]


def is_sharded(t: Any) -> bool:
    """Whether ``t`` is a DTensor (a parameter, gradient or optimizer state sharded by FSDP2)."""
    return DTensor is not None and isinstance(t, DTensor)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole value of ``t``: gathered from every rank if it is sharded (a collective), else ``t`` itself."""
    return t.full_tensor() if is_sharded(t) else t


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t`` (it shares storage with ``t``: in-place edits land in ``t``), or ``t``."""
    return t.to_local() if is_sharded(t) else t


def local_shard(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The chunk of the whole tensor ``full`` that this rank holds for ``like`` (no communication).

    ``full`` must be the same on every rank (generated from a shared seed, or computed from gathered values).
    """
    if not is_sharded(like):
        return full
    full = full.to(like.device)
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None).to_local()


@torch.no_grad()
def write_full_(param: torch.Tensor, full: torch.Tensor) -> None:
    """``param ← full``, where ``full`` is the whole value: a sharded ``param`` keeps its own chunk."""
    local(param).copy_(local_shard(full, param).to(param.dtype))


@torch.no_grad()
def edit_(param: torch.Tensor, fn) -> None:
    """Apply the in-place edit ``fn(whole tensor)`` to ``param``. A plain tensor is edited directly; a sharded
    one is gathered, edited, and its local chunk written back (every rank makes the same edit)."""
    if not is_sharded(param):
        fn(param)
        return
    whole = param.full_tensor().clone()
    fn(whole)
    write_full_(param, whole)


def gather_stack(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """``torch.stack`` of the whole values of same-shape ``params`` sharded alike, with one all-gather.

    The local chunks are stacked into one DTensor (the stack dimension prepended to the placements), so the
    group costs one collective however many modules it holds.
    """
    first = params[0]
    locals_ = torch.stack([p.detach().to_local() for p in params])
    placements = [Shard(pl.dim + 1) if isinstance(pl, Shard) else pl for pl in first.placements]
    shape = (len(params), *first.shape)
    stride = tuple(int(s) for s in torch.empty(shape, device="meta").stride())
    stacked = DTensor.from_local(locals_, first.device_mesh, placements, run_check=False, shape=shape, stride=stride)
    return stacked.full_tensor()


@torch.no_grad()
def add_to_grad_(param: torch.nn.Parameter, full_grad: torch.Tensor, alpha: float) -> None:
    """``param.grad += alpha · full_grad`` for a sharded ``param``: only the local chunk is added. With no
    ``.grad`` yet, a sharded gradient is created; FSDP2's reduce-scatter later accumulates into it."""
    part = local_shard(full_grad, param) * alpha
    if param.grad is None:
        param.grad = DTensor.from_local(part.to(param.dtype), param.device_mesh, param.placements,
                                        run_check=False, shape=param.shape, stride=param.stride())
    else:
        local(param.grad).add_(part.to(param.grad.dtype))


def world_size() -> int:
    """Processes in the default process group (1 when torch.distributed is not initialized)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def sum_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """``values`` summed over all ranks (a collective: every rank must call it); itself in one process."""
    import torch.distributed as dist

    if world_size() < 2:
        return values
    device = values.device
    if dist.get_backend() == "nccl" and device.type != "cuda":
        values = values.to("cuda")
    values = values.clone()
    dist.all_reduce(values)
    return values.to(device)


def placement_key(t: torch.Tensor) -> tuple | None:
    """What must match for tensors to be gathered together: None for a plain tensor, else mesh and placements."""
    if not is_sharded(t):
        return None
    return id(t.device_mesh), tuple(t.placements)


def is_fsdp2_module(model: Any) -> bool:
    """Whether ``model`` is the root of an FSDP2 ``fully_shard`` (it has ``set_requires_gradient_sync``)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except Exception:  # pragma: no cover
        return False
    return isinstance(model, FSDPModule)


def deepspeed_zero_stage(trainer: Any) -> int | None:
    """ZeRO stage of the trainer's DeepSpeed plugin; None when DeepSpeed is off."""
    if not getattr(trainer, "is_deepspeed_enabled", False):
        return None
    plugin = getattr(getattr(getattr(trainer, "accelerator", None), "state", None), "deepspeed_plugin", None)
    stage = getattr(plugin, "zero_stage", None)
    return int(stage) if stage is not None else -1


def check_backend(cfg: Any, ctx: Any, replay: bool = False) -> None:
    """Refuse, before anything is attached, the terms the trainer's distributed backend cannot carry.

    ``cfg`` is the run's SuppleConfig, ``ctx`` its TrainingContext, ``replay`` whether replay is on (a
    ``replay_dataset`` object counts).

    - DeepSpeed (any ZeRO stage; cannot be run in supple's tests, so only what needs nothing from its engine is
      allowed): the hidden-state term in bf16/fp32 and the live metrics (not under ZeRO-3, whose parameters are
      empty placeholders outside forward). Refused: LoRA decorrelation (ZeRO-2/3 partition and own the
      gradients), replay (its own backward), refresh (the ZeRO optimizer's fp32 master weights would overwrite
      the edit), and the hidden-state term under fp16 (DeepSpeed's own loss scale is not the GradScaler's).
    - FSDP1 (accelerate ``fsdp_version: 1``): flat parameters; the LoRA terms, refresh and the LoRA metrics
      need the individual parameters. Use FSDP2.
    - FSDP2: everything is supported.
    """
    trainer = ctx.trainer
    wants_params = cfg.decorrelation_weight > 0 or cfg.decorrelation_cross_weight > 0
    stage = deepspeed_zero_stage(trainer)
    if stage is not None:
        refused = []
        if wants_params:
            refused.append("LoRA decorrelation (decorrelation_weight / decorrelation_cross_weight: ZeRO "
                           "partitions and owns the gradients)")
        if replay:
            refused.append("replay (replay_data: it runs its own backward, which the DeepSpeed engine does not allow)")
        if cfg.refresh_method:
            refused.append("refresh (refresh_method: the ZeRO optimizer's fp32 master weights would overwrite "
                           "the refreshed parameters)")
        if cfg.diversity_weight > 0 and ctx.fp16:
            refused.append("the hidden-state term in fp16 (diversity_weight with fp16=True: it would need "
                           "DeepSpeed's own loss scale; use bf16)")
        if cfg.metrics_every > 0 and stage == 3:
            refused.append("live metrics under ZeRO-3 (metrics_every: the LoRA parameters are partitioned)")
        if refused:
            raise ValueError(
                "supple under DeepSpeed supports only the hidden-state term (diversity_weight, bf16/fp32) and the "
                "live metrics (ZeRO stage < 3). Not supported here: " + "; ".join(refused) + ". Use FSDP2 "
                "(accelerate `fsdp_version: 2`) or DDP for these, or turn them off."
            )
        return
    accelerator = getattr(trainer, "accelerator", None)
    if getattr(trainer, "is_fsdp_enabled", False) and not getattr(accelerator, "is_fsdp2", True):
        touching = [name for name, on in (("decorrelation_weight/decorrelation_cross_weight", wants_params),
                                          ("refresh_method", bool(cfg.refresh_method)),
                                          ("metrics_every", cfg.metrics_every > 0)) if on]
        if touching:
            raise ValueError(
                f"supple's {', '.join(touching)} need the model's individual parameters, which FSDP1 flattens. "
                "Use FSDP2 (accelerate config `fsdp_version: 2`, or TrainingArguments(fsdp_config={'version': 2})), "
                "or DDP."
            )
