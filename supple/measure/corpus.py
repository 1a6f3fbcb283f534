"""The texts a measurement runs on: ``builtin:NAME`` or a local text / ``.jsonl`` file.

The built-in corpora (``builtin:pydoc``, no download) live in :mod:`supple.data`, with the replay data;
they are named here too for the measurement suite's callers.
"""

from __future__ import annotations

from pathlib import Path

from ..data import BUILTIN_CORPORA, load_builtin_corpus, read_jsonl, read_text_file

__all__ = ["BUILTIN_CORPORA", "load_builtin_corpus", "load_texts"]


def load_texts(spec: str, limit: int | None = None) -> list[str]:
    """Texts from ``builtin:NAME``, a ``.jsonl`` file (``text`` field per line) or a text file
    (paragraphs separated by blank lines; one text per line when it has no blank lines)."""
    if spec.startswith("builtin:"):
        return load_builtin_corpus(spec, limit=limit)
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"no such text file {spec!r} (or use builtin:pydoc)")
    if path.suffix == ".jsonl":
        texts = []
        for no, row in read_jsonl(path, spec):
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise ValueError(f"{spec}, line {no}: expected an object with a string 'text' field")
            texts.append(row["text"])
    else:
        texts = read_text_file(path)
    return texts[:limit] if limit is not None else texts
