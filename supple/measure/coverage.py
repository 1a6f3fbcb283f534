"""Semantic coverage of training data: how much of a target distribution's embedding space it reaches.

Our operationalization of the coverage measure η of arXiv 2606.00674 ("The Paradox of Outcome
Optimization"), whose formula is not public in text form. We use the *coverage* of Naeem et al. 2020
("Reliable Fidelity and Diversity Metrics for Generative Models"), with the training set in the role
of the generated samples and the target set in the role of the real ones:

    coverage = (1/M) Σ_j 1[ min_i ‖x_i − y_j‖ < NND_k(y_j) ]

where y_1..y_M are the target embeddings, x_1..x_N the training embeddings, and NND_k(y_j) is the
distance from y_j to its k-th nearest neighbour among the *other* target points (default k = 5, as
recommended by Naeem et al.). It is the fraction of target points whose k-NN ball holds at least one
training point: it depends on which regions the training set reaches, not on how many samples sit in
them — duplicating a training set leaves it unchanged, a set against itself has coverage 1.

Ties follow the authors' public implementation (``prdc``): the inequality is strict, so a training
point lying exactly on the ball's boundary does not cover it. That matters in practice: a text shared by
the training and target sets embeds to a bitwise-identical vector, so a training copy of y_j's k-th
neighbour sits exactly at distance NND_k(y_j). Distances are computed in float64, pair by pair (no
‖x‖² + ‖y‖² − 2x·y shortcut), so identical vectors give identical distances and ties are exact.

Embeddings are mean-pooled (over non-padding tokens) hidden states of one decoder block of a causal LM
(the embedded SmolLM2-135M-Instruct by default), unit-normalized. We also report the effective rank of
the training embeddings relative to the target's (a spread measure that, unlike coverage, grows with
diversity even outside the target).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

from ..data import pad_token_batch
from ..modeling import find_decoder_blocks, resolve_layer_indices
from ..regularizers.geometry import effective_rank

DEFAULT_K = 5


def coverage_from_embeddings(train: torch.Tensor, target: torch.Tensor, k: int = DEFAULT_K) -> float:
    """Naeem et al. coverage of ``target`` (M × d) by ``train`` (N × d), with k-NN radii from the target set:
    the fraction of target points with a training point strictly inside their k-NN ball (ties: not covered)."""
    if train.dim() != 2 or target.dim() != 2 or train.shape[1] != target.shape[1]:
        raise ValueError(f"expected (N, d) and (M, d) embeddings, got {tuple(train.shape)} and {tuple(target.shape)}")
    m = target.shape[0]
    if m <= k:
        raise ValueError(f"coverage needs more than k={k} target points, got {m}; lower k or add target texts.")
    if train.shape[0] == 0:
        return 0.0
    y = target.double()
    x = train.double()
    exact = "donot_use_mm_for_euclid_dist"  # pairwise differences: equal vectors give equal distances
    d_yy = torch.cdist(y, y, compute_mode=exact)
    d_yy.fill_diagonal_(float("inf"))  # the k-th neighbour among the *other* target points
    radius = d_yy.kthvalue(k, dim=1).values
    d_xy = torch.cdist(y, x, compute_mode=exact).min(dim=1).values
    return float((d_xy < radius).double().mean())  # strict, as prdc: a point on the boundary is outside


@torch.no_grad()
def embed_texts(
    texts: Sequence[str], model, tokenizer, layer: int = -1, batch_size: int = 16, max_length: int = 128,
    progress: bool = False,
) -> torch.Tensor:
    """Unit-normalized mean-pooled outputs of decoder block ``layer`` for each text: (len(texts), d) fp32."""
    from tqdm.auto import tqdm

    _, blocks = find_decoder_blocks(model)
    (idx,) = resolve_layer_indices([layer], len(blocks), label="layer")
    captured = {}

    def hook(mod, args, out):
        captured["h"] = out[0] if isinstance(out, tuple) else out

    handle = blocks[idx].register_forward_hook(hook)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    try:
        for start in tqdm(range(0, len(texts), batch_size), disable=not progress, desc="embedding"):
            chunk = list(texts[start: start + batch_size])
            ids = [tokenizer(t, truncation=True, max_length=max_length)["input_ids"] for t in chunk]
            batch = pad_token_batch(ids, pad, device)
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            h = captured["h"].float()
            m = batch["attention_mask"].to(h.device).unsqueeze(-1).float()
            pooled = (h * m).sum(1) / m.sum(1).clamp_min(1.0)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).cpu())
    finally:
        handle.remove()
        model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, 0)


def semantic_coverage(
    train_texts: Sequence[str], target_texts: Sequence[str], model=None, tokenizer=None, layer: int = -1,
    k: int = DEFAULT_K, batch_size: int = 16, max_length: int = 128, progress: bool = True,
) -> dict[str, float]:
    """Coverage of ``target_texts`` by ``train_texts`` in a model's embedding space (see module docstring).

    Returns ``coverage`` (in [0, 1]), ``k``, ``n_train``, ``n_target``, ``erank_train``, ``erank_target``
    and ``erank_ratio`` (train / target). Without ``model``, the embedded SmolLM2-135M-Instruct is used.
    """
    if not train_texts or not target_texts:
        raise ValueError("semantic_coverage needs non-empty train_texts and target_texts.")
    if model is None:
        from .embedded import load_embedded_model

        model, tokenizer = load_embedded_model()
    if tokenizer is None:
        raise ValueError("semantic_coverage: pass the tokenizer of the model.")
    # embed each distinct text once: duplicates change neither coverage nor the geometry of the set
    unique_train = list(dict.fromkeys(train_texts))
    unique_target = list(dict.fromkeys(target_texts))
    emb_train = embed_texts(unique_train, model, tokenizer, layer, batch_size, max_length, progress)
    emb_target = embed_texts(unique_target, model, tokenizer, layer, batch_size, max_length, progress)
    er_train = float(effective_rank(emb_train)) if len(unique_train) > 1 else 1.0
    er_target = float(effective_rank(emb_target))
    return {
        "coverage": coverage_from_embeddings(emb_train, emb_target, k),
        "k": float(k),
        "n_train": float(len(train_texts)),
        "n_target": float(len(target_texts)),
        "erank_train": er_train,
        "erank_target": er_target,
        "erank_ratio": er_train / er_target if er_target > 0 else float("nan"),
    }


def add_parsers(subparsers) -> None:
    """Add the ``coverage`` sub-command (sets ``func``)."""
    from .cli import at_least

    p = subparsers.add_parser(
        "coverage", help="semantic coverage of a target text set by a training text set",
        description="Fraction of TARGET texts whose k-nearest-neighbour ball (radius from the target set) holds "
        "at least one TRAIN text, in the space of mean-pooled hidden states of a model (Naeem et al. 2020 "
        "coverage; our operationalization of the coverage measure of arXiv 2606.00674).",
    )
    p.add_argument("train", help="training texts: a text file, a .jsonl with 'text', or builtin:pydoc")
    p.add_argument("target", help="target texts, same formats")
    p.add_argument("--model", default="embedded", help="'embedded' (default) or a local HF model directory")
    p.add_argument("--layer", type=int, default=-1, help="decoder block to pool (default -1, the last)")
    p.add_argument("--k", type=at_least(1), default=DEFAULT_K, help=f"nearest neighbours for the radius (default {DEFAULT_K})")
    p.add_argument("--max-texts", type=at_least(1), default=None, help="use at most this many texts from each file")
    p.add_argument("--json", dest="json_out", default=None, help="also write the result to this JSON file")
    p.set_defaults(func=cmd_coverage)


def cmd_coverage(args: argparse.Namespace) -> int:
    import json

    from .corpus import load_texts

    train = load_texts(args.train, limit=args.max_texts)
    target = load_texts(args.target, limit=args.max_texts)
    from .models import load_model

    model, tokenizer, _ = load_model(args.model)
    n_blocks = len(find_decoder_blocks(model)[1])
    resolve_layer_indices([args.layer], n_blocks, label="--layer")  # name the option, not embed_texts' argument
    res = semantic_coverage(train, target, model, tokenizer, layer=args.layer, k=args.k)
    for key, val in res.items():
        print(f"{key:>13}: {val:.4g}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(res, f, indent=2)
    return 0
