"""Text data: the built-in corpus, replay data (loading, tokenizing, mixing into SFT data), padded batches.

This module imports nothing else of supple: the callbacks, the measurement suite and the testbed all
build on it.

Sources for ``SuppleConfig.replay_data``:
- ``"builtin:pydoc"``: English prose from the Python documentation shipped with Python (no download);
- a local ``.txt`` file (paragraphs separated by blank lines, or one text per line);
- a local ``.jsonl`` file with a ``text`` field or a ``messages`` field (chat) per line;
- a local ``.parquet`` file with a ``text`` or ``messages`` column;
- or a ``datasets.Dataset`` passed as ``SuppleCallback(replay_dataset=...)``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

ReplayItem = Any  # a str, or a list of chat messages ({"role", "content"})

BUILTIN_CORPORA = ("pydoc",)
_HEADING = re.compile(r"^[*=\-~^\"']{3,}$")


def _pydoc_paragraphs() -> list[str]:
    """The prose paragraphs of ``pydoc_data.topics`` (topics sorted by name, then document order)."""
    from pydoc_data.topics import topics

    out = []
    for key in sorted(topics):
        for block in re.split(r"\n\s*\n", topics[key]):
            lines = block.split("\n")
            # skip code, grammar and tables (indented), headings and list-like fragments
            if not lines or any(ln.startswith((" ", "\t")) for ln in lines):
                continue
            if any(_HEADING.match(ln.strip()) for ln in lines):
                continue
            text = re.sub(r"\s+", " ", " ".join(lines)).strip()
            if ">>>" in text or "::=" in text:
                continue
            out.append(text)
    return out


def load_builtin_corpus(
    name: str = "pydoc", min_chars: int = 200, max_chars: int | None = None, limit: int | None = None
) -> list[str]:
    """Deterministic list of paragraphs of a built-in corpus (no download).

    ``pydoc`` (or ``builtin:pydoc``): the prose paragraphs of the Python reference documentation shipped
    with Python itself (``pydoc_data.topics``), a general English technical corpus; the texts depend only
    on the Python version. ``min_chars``: drop shorter paragraphs (headings, fragments). ``max_chars``:
    cut longer ones at the last sentence end (or space) before the limit. ``limit``: at most this many,
    from the start.
    """
    name = name.removeprefix("builtin:")
    if name != "pydoc":
        raise ValueError(f"unknown built-in corpus {name!r}: available {', '.join(BUILTIN_CORPORA)}")
    texts = []
    for p in _pydoc_paragraphs():
        if len(p) < min_chars:
            continue
        if max_chars and len(p) > max_chars:
            cut = p[:max_chars]
            end = max(cut.rfind(". "), cut.rfind(" "))
            p = cut[: end + 1].strip() if end > 0 else cut
        texts.append(p)
        if limit is not None and len(texts) >= limit:
            break
    return texts


def read_jsonl(path: str | Path, where: str | None = None) -> list[tuple[int, Any]]:
    """``(line number, parsed value)`` of every non-blank line of a JSON-lines file, numbered from 1.

    A line that is not valid JSON raises ``ValueError("WHERE, line N: not valid JSON (...)")``; ``where``
    defaults to the path.
    """
    where = str(path) if where is None else where
    out = []
    for no, ln in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not ln.strip():
            continue
        try:
            out.append((no, json.loads(ln)))
        except ValueError as exc:
            raise ValueError(f"{where}, line {no}: not valid JSON ({exc.msg})") from None
    return out


def read_text_file(path: str | Path) -> list[str]:
    """The texts of a plain text file: paragraphs separated by blank lines, or one text per line when it
    has no blank line; each stripped, empty ones dropped."""
    raw = Path(path).read_text(encoding="utf-8").strip()
    if re.search(r"\n\s*\n", raw):
        return [p.strip() for p in re.split(r"\n\s*\n", raw) if p.strip()]
    return [ln.strip() for ln in raw.splitlines() if ln.strip()]


def _items_from_rows(rows: Sequence[dict], where: str) -> list[ReplayItem]:
    if not rows:
        raise ValueError(f"replay data {where} is empty: give at least one text.")
    cols = set(rows[0])
    if "text" in cols:
        items = [r["text"] for r in rows]
    elif "messages" in cols:
        items = [r["messages"] for r in rows]
    else:
        raise ValueError(
            f"replay data {where} has no 'text' or 'messages' column (found: {', '.join(sorted(cols)) or 'none'}); "
            "rename the column holding the text to 'text'."
        )
    items = [it for it in items if it]
    if not items:
        raise ValueError(f"replay data {where} holds only empty texts.")
    return items


def load_replay_items(spec: str | None = None, dataset: Any | None = None) -> list[ReplayItem]:
    """Replay texts (or chat message lists) from a spec string or a ``datasets.Dataset``."""
    if dataset is not None:
        if not hasattr(dataset, "column_names"):
            raise TypeError(f"replay_dataset must be a datasets.Dataset, got {type(dataset).__name__}.")
        return _items_from_rows([dataset[i] for i in range(len(dataset))], "replay_dataset")
    if spec is None:
        raise ValueError("no replay data: set SuppleConfig.replay_data or pass SuppleCallback(replay_dataset=...).")
    if spec.startswith("builtin:"):
        return load_builtin_corpus(spec)
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(
            f"SuppleConfig.replay_data={spec!r}: no such file. Use a .txt/.jsonl/.parquet file or 'builtin:pydoc'."
        )
    where = f"{spec!r}"
    if path.suffix == ".jsonl":
        return _items_from_rows([row for _, row in read_jsonl(path, spec)], where)
    if path.suffix == ".parquet":
        from datasets import Dataset

        ds = Dataset.from_parquet(str(path))
        return _items_from_rows([ds[i] for i in range(len(ds))], where)
    texts = read_text_file(path)
    if not texts:
        raise ValueError(f"replay data {where} is empty: give at least one text.")
    return texts


def tokenize_replay_item(item: ReplayItem, tokenizer: Any, max_length: int) -> list[int]:
    """Token ids of one replay item: chat messages through the tokenizer's chat template, text as is."""
    if isinstance(item, str):
        ids = tokenizer(item, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
    elif isinstance(item, (list, tuple)) and all(isinstance(m, dict) for m in item):
        ids = tokenizer.apply_chat_template(list(item), tokenize=True, add_generation_prompt=False)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        ids = list(ids)[:max_length]
    else:
        raise ValueError(f"cannot tokenize replay item of type {type(item).__name__}: expected text or messages.")
    if len(ids) < 2:
        raise ValueError("replay item is shorter than two tokens.")
    return list(ids)


def pad_token_batch(
    seqs: Sequence[Sequence[int]],
    pad_id: int,
    device: Any = None,
    label_starts: Sequence[int] | None = None,
) -> dict[str, torch.Tensor]:
    """The one padded-batch builder: right-padded ``input_ids``, ``attention_mask`` and ``labels``.

    Each sequence is a list of token ids; the batch is as long as the longest one. ``labels`` equal
    ``input_ids`` on real tokens and -100 on padding, and also before ``label_starts[i]`` in row i when
    given (a prompt whose tokens are not scored). Tensors are ``torch.long`` on ``device``.
    """
    if not seqs:
        raise ValueError("pad_token_batch: no sequences to batch.")
    if label_starts is not None and len(label_starts) != len(seqs):
        raise ValueError(f"pad_token_batch: {len(label_starts)} label starts for {len(seqs)} sequences.")
    t = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), t), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(seqs), t), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        mask[r, : len(s)] = 1
    scored = mask.bool()
    if label_starts is not None:
        starts = torch.as_tensor(list(label_starts), dtype=torch.long)
        scored &= torch.arange(t).unsqueeze(0) >= starts.unsqueeze(1)
    labels = ids.masked_fill(~scored, -100)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def mix_replay(train_dataset: Any, replay_dataset: Any, ratio: float, seed: int = 0) -> Any:
    """Mix replay rows into an SFT dataset at the data level.

    Returns a shuffled ``datasets.Dataset`` in which a fraction ``ratio`` (0 ≤ ratio < 1) of the rows comes
    from ``replay_dataset`` (sampled without replacement while possible, then with), the rest being every
    row of ``train_dataset``. Replay rows keep only the columns the train dataset has (``text`` or
    ``messages``), so both must share that column.
    """
    from datasets import Dataset, concatenate_datasets

    if not 0 <= ratio < 1:
        raise ValueError(f"mix_replay: ratio={ratio} must be in [0, 1) (the fraction of replay rows).")
    n_train = len(train_dataset)
    n_replay = round(ratio / (1 - ratio) * n_train)
    col = "text" if "text" in train_dataset.column_names else "messages"
    if col not in train_dataset.column_names:
        raise ValueError("mix_replay: the train dataset needs a 'text' or 'messages' column.")
    if col not in replay_dataset.column_names:
        raise ValueError(f"mix_replay: the replay dataset has no {col!r} column like the train dataset.")
    if len(replay_dataset) == 0 and n_replay:
        raise ValueError("mix_replay: the replay dataset is empty.")
    import random

    rng = random.Random(seed)
    order = list(range(len(replay_dataset)))
    picks: list[int] = []
    while len(picks) < n_replay:
        rng.shuffle(order)
        picks.extend(order[: n_replay - len(picks)])
    replay_rows = Dataset.from_dict({col: [replay_dataset[i][col] for i in picks]}) if picks else None
    base = train_dataset.select_columns([col])
    mixed = concatenate_datasets([base, replay_rows]) if replay_rows is not None else base
    return mixed.shuffle(seed=seed)
