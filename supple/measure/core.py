"""Run a causal LM over texts and measure its hidden states, logits and token trajectories.

Which states (README.md, "Measure your model", defines the metrics):

- hidden-state geometry uses the **output of each decoder block**, captured by forward hooks on the
  blocks, before the final norm (``hidden_states[-1]`` of a transformers model is after the final
  norm, so it is not used). Layer k is block k (0-based). Only non-padding tokens enter.
- every geometry metric is computed four times: over all tokens and without the first position of
  each sequence (``tokens="no_sink"``: attention sinks carry norms hundreds of times the rest), and
  on raw and on unit-normalized token vectors (``space="raw"|"unit"``).
- logits metrics use the model's own output logits at every non-padding position whose next token
  is known (teacher-forced next-token prediction).
- trajectories follow each token through the blocks: layer k's ``cos_prev`` / ``step_length``
  compare block k's output with its input (block k−1's output; the embeddings for k = 0); the
  logit lens applies the model's final norm and lm_head to block k's output and reports how often
  its top-1 token agrees with the final logits' top-1 (1 at the last block by construction).

Records are plain dicts (one row per model × layer × metric × tokens × space), see
:mod:`supple.measure.records`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..data import pad_token_batch
from ..modeling import find_decoder_blocks, resolve_layer_indices, unwrap_model
from ..regularizers.geometry import geometry_summary, norm_stats
from .calibration import expected_calibration_error, next_token_stats
from .lora import lora_update_spectra
from .models import find_final_norm, find_lm_head
from .records import record

__all__ = ["MeasureRun", "collect", "geometry_records", "logits_records", "measure_model", "run_records",
           "trajectory_records"]

GEOMETRY_METRICS = (
    "erank",
    "erank_ratio",
    "rankme",
    "participation_ratio",
    "pr_ratio",
    "top_pc_share",
    "anisotropy",
    "anisotropy_centered",
)
TOKEN_SETS = ("all", "no_sink")
SPACES = ("raw", "unit")


@dataclass
class MeasureRun:
    """What one pass of a model over the texts collected (token states kept for the chosen layers)."""

    name: str
    num_blocks: int
    layers: list[int]
    states: dict[int, torch.Tensor]  # layer -> (n, d) fp32 on CPU: block outputs of the kept tokens
    first: torch.Tensor  # (n,) bool: token is the first position of its sequence
    token_ids: torch.Tensor  # (n,) the kept tokens, to check that two runs saw the same tokens
    logits: dict[str, torch.Tensor]  # per predicted position: entropy, confidence, correct, nll, brier
    traj: dict[str, torch.Tensor]  # per-layer sums over tokens (see trajectory_records)
    lens: dict[str, torch.Tensor] = field(default_factory=dict)  # per-layer agreement counts
    texts_used: int = 0


def _tokenize(tokenizer, texts: Sequence[str], max_length: int) -> list[list[int]]:
    seqs = []
    for t in texts:
        ids = tokenizer(t, truncation=True, max_length=max_length, add_special_tokens=True)["input_ids"]
        if len(ids) >= 2:
            seqs.append(list(ids))
    return seqs


def _first_tensor(x):
    return x[0] if isinstance(x, (tuple, list)) else x


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)


@torch.inference_mode()
def collect(
    model,
    tokenizer,
    texts: Sequence[str],
    *,
    name: str = "model",
    batch_size: int = 8,
    max_length: int = 256,
    max_tokens: int | None = 4096,
    layers: Sequence[int] | None = None,
    logit_lens: bool = True,
    lens_max_tokens: int = 512,
    progress: bool = True,
) -> MeasureRun:
    """Run ``model`` over ``texts`` (in order, right-padded batches) and collect what the metrics need.

    Texts are tokenized one by one (special tokens added, truncated at ``max_length``; texts of fewer
    than two tokens are skipped). Tokens are taken in reading order until ``max_tokens`` non-padding
    tokens are kept (``None``: all), so two models with the same tokenizer see exactly the same tokens.
    """
    from tqdm.auto import tqdm

    _, blocks = find_decoder_blocks(model)
    num_blocks = len(blocks)
    keep_layers = (
        list(range(num_blocks)) if layers is None
        else resolve_layer_indices(list(layers), num_blocks, label="layer", dedupe=True)
    )
    norm = find_final_norm(model)
    head = find_lm_head(model)
    base = unwrap_model(model)
    device = next(model.parameters()).device

    seqs = _tokenize(tokenizer, texts, max_length)
    if not seqs:
        raise ValueError("no text yields at least two tokens")
    budget = max_tokens if max_tokens else sum(len(s) for s in seqs)

    captured: dict[int, torch.Tensor] = {}

    def pre_hook(_mod, args, kwargs):
        captured[-1] = args[0] if args else kwargs["hidden_states"]

    def make_hook(k):
        def hook(_mod, _args, output):
            captured[k] = _first_tensor(output)

        return hook

    handles = [blocks[0].register_forward_pre_hook(pre_hook, with_kwargs=True)]
    handles += [b.register_forward_hook(make_hook(k)) for k, b in enumerate(blocks)]

    states: dict[int, list[torch.Tensor]] = {k: [] for k in keep_layers}
    firsts, ids_kept = [], []
    logit_parts: dict[str, list[torch.Tensor]] = {}
    z = torch.zeros(num_blocks, dtype=torch.float64)
    traj = {f"{m}_{t}": z.clone() for m in ("cos", "step_raw", "step_unit") for t in TOKEN_SETS}
    traj.update(
        count_all=torch.zeros((), dtype=torch.float64), count_no_sink=torch.zeros((), dtype=torch.float64)
    )
    lens = {
        "agree_all": z.clone(),
        "agree_no_sink": z.clone(),
        "count_all": z.clone(),
        "count_no_sink": z.clone(),
    }
    lens_left = lens_max_tokens if logit_lens and norm is not None else 0

    was_training = model.training
    model.eval()
    kept_total, texts_used = 0, 0
    bar = tqdm(total=budget, desc=f"measure {name}", unit="tok", disable=not progress, leave=False)
    try:
        for start in range(0, len(seqs), batch_size):
            if kept_total >= budget:
                break
            batch = pad_token_batch(seqs[start : start + batch_size], pad_id=0)
            ids, mask = batch["input_ids"], batch["attention_mask"]
            width = ids.shape[1]
            # keep tokens in reading order until the budget is met
            valid = mask.bool()
            order = valid.reshape(-1).nonzero().squeeze(1)
            take = order[: budget - kept_total]
            sel = torch.zeros_like(valid.reshape(-1))
            sel[take] = True
            sel = sel.reshape(valid.shape)
            texts_used += int(sel.any(dim=1).sum())
            captured.clear()
            out = base(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
            logits = out.logits
            sel_d = sel.to(device)
            pos = torch.arange(width).expand_as(sel)
            first = (pos == 0)[sel]
            n_kept = int(sel.sum())
            kept_total += n_kept
            bar.update(n_kept)
            firsts.append(first)
            ids_kept.append(ids[sel])

            # logits: positions whose next token exists
            has_next = sel.clone()
            has_next[:, :-1] &= valid[:, 1:]
            has_next[:, -1] = False
            targets = ids[:, 1:][has_next[:, :-1]]
            st = next_token_stats(logits[has_next.to(logits.device)], targets.to(logits.device))
            for k, v in st.items():
                logit_parts.setdefault(k, []).append(v.cpu())

            # hidden states and trajectories
            ns = (~first).to(device)
            prev = captured[-1].to(device)[sel_d].float()
            final_top = logits.to(device)[sel_d].argmax(dim=-1)
            traj["count_all"] += n_kept
            traj["count_no_sink"] += float(ns.sum())
            lens_n = min(lens_left, n_kept)
            for k in range(num_blocks):
                h = captured[k]
                if h.device != device:  # a model split over devices: measure on the input device
                    h = h.to(device)
                cur = h[sel_d].float()
                if k in states:
                    states[k].append(cur.cpu())
                cos = torch.nn.functional.cosine_similarity(cur, prev, dim=-1, eps=1e-6).double()
                step = (cur - prev).norm(dim=-1).double()
                ustep = (_unit(cur) - _unit(prev)).norm(dim=-1).double()
                for key, v in (("cos", cos), ("step_raw", step), ("step_unit", ustep)):
                    traj[f"{key}_all"][k] += v.sum().cpu()
                    traj[f"{key}_no_sink"][k] += v[ns].sum().cpu()
                prev = cur
                if lens_n > 0:
                    hl = h[sel_d][:lens_n]
                    hd = next(head.parameters()).device
                    top = torch.cat([head(norm(c.to(hd))).argmax(dim=-1).to(device) for c in hl.split(256)])
                    agree = (top == final_top[:lens_n]).double()
                    nsl = ns[:lens_n]
                    lens["agree_all"][k] += agree.sum().cpu()
                    lens["agree_no_sink"][k] += agree[nsl].sum().cpu()
                    lens["count_all"][k] += lens_n
                    lens["count_no_sink"][k] += float(nsl.sum())
            lens_left -= lens_n
            captured.clear()
    finally:
        for hd in handles:
            hd.remove()
        bar.close()
        model.train(was_training)

    return MeasureRun(
        name=name,
        num_blocks=num_blocks,
        layers=keep_layers,
        states={k: torch.cat(v) for k, v in states.items()},
        first=torch.cat(firsts),
        token_ids=torch.cat(ids_kept),
        logits={k: torch.cat(v) for k, v in logit_parts.items()},
        traj=traj,
        lens=lens if logit_lens and norm is not None else {},
        texts_used=texts_used,
    )


def geometry_records(run: MeasureRun, dtype: torch.dtype = torch.float64) -> list[dict]:
    """Hidden-state geometry per kept layer × tokens (all / no_sink) × space (raw / unit)."""
    rows = []
    for k in run.layers:
        h = run.states[k]
        for tokens in TOKEN_SETS:
            x = h if tokens == "all" else h[~run.first]
            n = int(x.shape[0])
            for space in SPACES:
                summ = geometry_summary(x, normalize_tokens=space == "unit", dtype=dtype)
                for metric in GEOMETRY_METRICS:
                    rows.append(
                        record(
                            run.name,
                            "geometry",
                            "block_output",
                            metric,
                            summ[metric],
                            layer=k,
                            tokens=tokens,
                            space=space,
                            n=n,
                        )
                    )
            for metric, v in norm_stats(x, dtype=dtype).items():
                rows.append(
                    record(
                        run.name,
                        "geometry",
                        "block_output",
                        metric,
                        v,
                        layer=k,
                        tokens=tokens,
                        space="raw",
                        n=n,
                    )
                )
    return rows


def logits_records(run: MeasureRun, n_bins: int = 15) -> list[dict]:
    """Next-token metrics of the final logits: nll, perplexity, entropy, top1_prob, accuracy, ece, brier."""
    lg = run.logits
    n = int(lg["nll"].numel())
    nll = lg["nll"].double().mean()
    vals = {
        "nll": nll,
        "perplexity": nll.exp(),
        "entropy": lg["entropy"].double().mean(),
        "top1_prob": lg["confidence"].double().mean(),
        "accuracy": lg["correct"].double().mean(),
        "ece": expected_calibration_error(lg["confidence"], lg["correct"], n_bins=n_bins),
        "brier": lg["brier"].double().mean(),
    }
    return [record(run.name, "logits", "logits", m, v, tokens="all", n=n) for m, v in vals.items()]


def trajectory_records(run: MeasureRun) -> list[dict]:
    """Per-layer cos_prev, step_length (raw and unit), logit-lens agreement; whole-model trajectory_length."""
    rows = []
    t = run.traj
    for tokens in TOKEN_SETS:
        cnt = t[f"count_{tokens}"]
        n = int(cnt)
        mean = {key: t[f"{key}_{tokens}"] / cnt.clamp_min(1) for key in ("cos", "step_raw", "step_unit")}
        per_block = (("cos_prev", "cos", None), ("step_length", "step_raw", "raw"), ("step_length", "step_unit", "unit"))
        for k in range(run.num_blocks):
            for metric, key, space in per_block:
                rows.append(
                    record(run.name, "trajectory", "block_output", metric, mean[key][k], layer=k, tokens=tokens,
                           space=space, n=n)
                )
            if run.lens:
                c = run.lens[f"count_{tokens}"][k]
                v = run.lens[f"agree_{tokens}"][k] / c if c > 0 else float("nan")
                rows.append(
                    record(
                        run.name,
                        "trajectory",
                        "logit_lens",
                        "lens_agreement",
                        v,
                        layer=k,
                        tokens=tokens,
                        n=int(c),
                    )
                )
        for space, key in (("raw", "step_raw"), ("unit", "step_unit")):
            rows.append(
                record(
                    run.name,
                    "trajectory",
                    "block_output",
                    "trajectory_length",
                    mean[key].sum(),
                    tokens=tokens,
                    space=space,
                    n=n,
                )
            )
    return rows


def run_records(run: MeasureRun, dtype: torch.dtype = torch.float64) -> list[dict]:
    """All records of one run: geometry, logits and trajectories."""
    return geometry_records(run, dtype) + logits_records(run) + trajectory_records(run)


def measure_model(
    model,
    tokenizer,
    texts: Sequence[str],
    *,
    name: str = "model",
    batch_size: int = 8,
    max_length: int = 256,
    max_tokens: int | None = 4096,
    layers: Sequence[int] | None = None,
    logit_lens: bool = True,
    lens_max_tokens: int = 512,
    lora: bool = True,
    progress: bool = True,
    dtype: torch.dtype = torch.float64,
) -> list[dict]:
    """Measure a causal LM (plain or PEFT) on ``texts``; returns tidy records (see module doc).

    ``layers``: decoder-block indices for the geometry (negative from the end; None = all; the
    trajectory metrics always cover every block). ``max_tokens``: non-padding tokens kept (the
    geometry's n). ``lens_max_tokens``: tokens run through the logit lens (it costs one lm_head
    product per block). ``lora``: also the spectra of the model's LoRA updates, if it has any.
    ``dtype``: precision of the geometry (float64 default; fp32 at least).
    """
    run = collect(
        model,
        tokenizer,
        texts,
        name=name,
        batch_size=batch_size,
        max_length=max_length,
        max_tokens=max_tokens,
        layers=layers,
        logit_lens=logit_lens,
        lens_max_tokens=lens_max_tokens,
        progress=progress,
    )
    rows = run_records(run, dtype)
    if lora:
        rows += lora_update_spectra(model, name=name)
    return rows
