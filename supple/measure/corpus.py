"""Built-in text corpora that need no download.

``pydoc``: the prose paragraphs of the Python reference documentation shipped with Python itself
(``pydoc_data.topics``), a general English technical corpus. Paragraphs come in a fixed order
(topics sorted by name, then document order); the texts depend only on the Python version.
"""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["BUILTIN_CORPORA", "load_builtin_corpus", "load_texts"]

BUILTIN_CORPORA = ("pydoc",)
_HEADING = re.compile(r"^[*=\-~^\"']{3,}$")


def _pydoc_paragraphs() -> list[str]:
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
    """Deterministic list of paragraphs of a built-in corpus.

    ``min_chars``: drop shorter paragraphs (headings, fragments). ``max_chars``: cut longer ones at the
    last sentence end (or space) before the limit. ``limit``: at most this many, from the start.
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


def load_texts(spec: str, limit: int | None = None) -> list[str]:
    """Texts from ``builtin:NAME``, a ``.jsonl`` file (``text`` field per line) or a text file
    (paragraphs separated by blank lines; one text per line when it has no blank lines)."""
    if spec.startswith("builtin:"):
        return load_builtin_corpus(spec, limit=limit)
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"no such text file {spec!r} (or use builtin:pydoc)")
    raw = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        import json

        texts = []
        for no, ln in enumerate(raw.splitlines(), start=1):
            if not ln.strip():
                continue
            try:
                row = json.loads(ln)
            except ValueError as exc:
                raise ValueError(f"{spec}, line {no}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise ValueError(f"{spec}, line {no}: expected an object with a string 'text' field")
            texts.append(row["text"])
    elif re.search(r"\n\s*\n", raw.strip()):
        texts = [p.strip() for p in re.split(r"\n\s*\n", raw) if p.strip()]
    else:
        texts = [ln.strip() for ln in raw.splitlines() if ln.strip()]
    return texts[:limit] if limit is not None else texts
