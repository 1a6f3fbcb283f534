"""Write a chat replay corpus answered by the base model itself (self-generated replay), as ``.jsonl``.

Mixed-domain replay in the demo replays ``builtin:pydoc`` prose as plain text. The OOD drop the demo measures is a
chat model forgetting how to answer general questions in its chat format, which prose replay does not rehearse.
This corpus rehearses it without touching any evaluated item: instructions about pydoc paragraphs (a title, a
one-sentence summary, the feature described, the key term), under the testbed's one system prompt, answered
greedily by the model *before* any post-training stage. A line is ``{"messages": [system, user, assistant]}``, the
format ``SuppleConfig.replay_data`` reads (docs/design.md, "Replay").

No evaluated item can leak in: the paragraphs are the replay part of pydoc (the general-text geometry texts, the
first ``--skip`` paragraphs, are left out), and a paragraph naming a weekday, a month or a capital of the
``knowledge`` family is dropped.

    python benchmarks/self_replay_corpus.py --model embedded --out docs/demo/self_replay_smollm2.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

_TEMPLATES = (
    "Give this passage a short title.\n\n{p}",
    "In one sentence, what is this passage about?\n\n{p}",
    "Which Python feature does this passage describe?\n\n{p}",
    "Name the most important term in this passage.\n\n{p}",
)


def knowledge_words() -> set[str]:
    """Weekday, month and capital names (and their countries) of the ``knowledge`` family, lower-cased."""
    from supple.testbed import tasks as T

    words: set[str] = set()
    for ex in T.get_family("knowledge").pool:
        if ex.question.startswith(("Which day", "Which month", "What is the capital")):
            words.add(ex.answer.lower())
            words.update(w.lower() for w in re.findall(r"[A-Z][a-z]+", ex.question.split(" of ", 1)[-1]))
    return words - {"what", "which"}


def replay_prompts(paragraphs: list[str], max_chars: int = 300) -> list[list[dict]]:
    """One chat prompt (system, user) per paragraph that names nothing of the ``knowledge`` family."""
    from supple.testbed import tasks as T

    banned = knowledge_words()
    out = []
    for i, p in enumerate(paragraphs):
        if banned & {w.lower() for w in re.findall(r"[A-Za-z]+", p)}:
            continue
        text = p[:max_chars].rsplit(" ", 1)[0] if len(p) > max_chars else p
        out.append([{"role": "system", "content": T.SYSTEM_PROMPT},
                    {"role": "user", "content": _TEMPLATES[i % len(_TEMPLATES)].format(p=text)}])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="embedded", help="'embedded' (SmolLM2-135M-Instruct), 'tiny' or a directory")
    ap.add_argument("--out", required=True, help="the .jsonl file to write")
    ap.add_argument("--skip", type=int, default=8, help="leading pydoc paragraphs left out (the geometry texts)")
    ap.add_argument("--max-chars", type=int, default=300, help="passages cut to this many characters")
    ap.add_argument("--max-tokens", type=int, default=128,
                    help="conversations longer than this many tokens are dropped (the demo's trainers and replay cut "
                         "sequences at max_length 128: a longer one would lose its answer)")
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    if not args.out.endswith(".jsonl"):
        print("--out must end in .jsonl (SuppleConfig.replay_data reads chat messages from .jsonl)", file=sys.stderr)
        return 2

    import torch
    from tqdm.auto import tqdm
    from transformers import GenerationConfig

    from supple.data import tokenize_replay_item
    from supple.measure.corpus import load_builtin_corpus
    from supple.testbed.evaluation import load_testbed_model

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tok, name = load_testbed_model(args.model)
    model.eval()
    prompts = replay_prompts(load_builtin_corpus("pydoc")[args.skip :], args.max_chars)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    gen = GenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=pad,
                           eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    tok.padding_side = "left"
    t0, rows = time.perf_counter(), []
    with torch.inference_mode():
        for i in tqdm(range(0, len(prompts), args.batch_size), desc=f"answering with {name}", unit="batch"):
            chunk = prompts[i : i + args.batch_size]
            texts = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in chunk]
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            out = model.generate(**enc, generation_config=gen)
            answers = tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            for m, a in zip(chunk, answers):
                conv = [*m, {"role": "assistant", "content": a.strip()}]
                if a.strip() and len(tokenize_replay_item(conv, tok, 10**6)) <= args.max_tokens:
                    rows.append(conv)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps({"messages": r}, ensure_ascii=False) + "\n")
    print(f"{len(rows)} replay conversations ({len(prompts)} prompts) answered by {name} in "
          f"{time.perf_counter() - t0:.0f} s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
