"""Write a chat replay corpus answered by the base model itself (self-generated replay), as ``.jsonl``.

Mixed-domain replay in the demo replays ``builtin:pydoc`` prose as plain text. The OOD drop the demo measures is a
chat model forgetting how to answer general questions in its chat format, which prose replay does not rehearse.
This corpus rehearses it without touching any evaluated item, under the testbed's one system prompt, answered
greedily by the model *before* any post-training stage. Two sources of prompts:

- ``--source pydoc``: instructions about pydoc paragraphs (a title, a one-sentence summary, the feature described,
  the key term); the paragraphs are the replay part of pydoc (the general-text geometry texts, the first ``--skip``
  paragraphs, are left out);
- ``--source questions``: short general questions (colours, animal sounds, what a tool is for, authors, chemical
  symbols, ...) of kinds the ``knowledge`` family does not ask: none asks for a capital, an opposite, a plural or
  what comes after something. After the stages the OOD family fails mostly by echoing a word of its question
  (docs/demo.md); these answers are not words of their questions.

A prompt or an answer naming a weekday, a month or a capital (or its country) of the ``knowledge`` family is
dropped. A line is ``{"messages": [system, user, assistant]}``, the format ``SuppleConfig.replay_data`` reads
(docs/design.md, "Replay").

    python benchmarks/self_replay_corpus.py --model embedded --out docs/demo/self_replay/smollm2_135m.jsonl
    python benchmarks/self_replay_corpus.py --source questions --out docs/demo/self_replay/smollm2_135m_questions.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

# Short general questions of kinds the ``knowledge`` family does not ask (no capital, opposite, plural or "which
# ... comes after"): the answer is not a word of the question, so replaying the model's own answers rehearses
# answering from what it knows rather than copying from the prompt (the OOD family's failure after the stages).
_QUESTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("What color is {}?", ("grass", "snow", "a banana", "a tomato", "coal", "milk", "a carrot", "a lemon", "chocolate",
                           "a strawberry", "an emerald", "a pumpkin", "a flamingo", "a crow", "ripe cherries",
                           "the ocean")),
    ("What sound does a {} make?", ("cow", "duck", "sheep", "pig", "horse", "lion", "owl", "frog", "bee", "rooster",
                                    "donkey", "snake", "goat", "wolf", "crow", "turkey")),
    ("What is a {} used for?", ("hammer", "broom", "spoon", "umbrella", "pen", "ladder", "saw", "needle", "camera",
                                "toothbrush", "map", "pair of scissors", "kettle", "shovel", "thermometer",
                                "microscope")),
    ("How many legs does {} have?", ("a spider", "an ant", "a horse", "a chicken", "a crab", "a beetle", "a kangaroo",
                                     "an octopus", "a cow", "a penguin", "a lobster", "a frog")),
    ("What does a {} eat?", ("rabbit", "panda", "koala", "lion", "shark", "caterpillar", "squirrel", "giraffe",
                             "hummingbird", "anteater", "owl", "horse")),
    ("Where does a {} live?", ("fish", "bee", "penguin", "camel", "polar bear", "monkey", "whale", "bat", "beaver",
                               "rabbit", "eagle", "ant")),
    ("What is the main ingredient of {}?", ("bread", "cheese", "guacamole", "hummus", "popcorn", "butter", "tofu",
                                            "jam", "an omelette", "french fries", "pasta", "chocolate")),
    ("Who wrote {}?", ("Hamlet", "Romeo and Juliet", "Don Quixote", "Pride and Prejudice", "The Odyssey",
                       "War and Peace", "Oliver Twist", "Moby Dick", "The Raven", "Macbeth", "Frankenstein",
                       "The Origin of Species")),
    ("What is the largest {}?", ("planet in the solar system", "ocean on Earth", "animal on Earth", "hot desert",
                                 "continent", "bird alive today", "organ of the human body", "land animal")),
    ("What is the chemical symbol for {}?", ("gold", "iron", "oxygen", "sodium", "silver", "carbon", "hydrogen",
                                             "helium", "copper", "lead")),
    ("What do you call a baby {}?", ("dog", "cat", "cow", "sheep", "horse", "bear", "duck", "kangaroo", "frog",
                                     "swan", "deer", "goat")),
    ("Name a fruit that is {}.", ("yellow", "red", "green", "purple", "orange", "sour", "sweet", "very large")),
    ("What instrument does a {} play?", ("pianist", "violinist", "drummer", "guitarist", "flautist", "cellist",
                                         "trumpeter", "harpist")),
    ("What do {} make?", ("bees", "spiders", "cows", "silkworms", "bakers", "beavers", "birds", "chickens")),
    ("What is the freezing point of {} in degrees Celsius?", ("water",)),
    ("Which gas do plants take in from the {}?", ("air",)),
    ("What is the name of the star at the center of our {}?", ("solar system",)),
)
EVAL_TEMPLATE = re.compile(r"\b(capital|opposite|plural|comes after)\b", re.IGNORECASE)  # the knowledge family's

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


def names_any(text: str, words: set[str]) -> bool:
    """Whether ``text`` holds one of the lower-cased ``words`` as a whole word (case-insensitive)."""
    return bool(words & {w.lower() for w in re.findall(r"[A-Za-z]+", text)})


def replay_prompts(paragraphs: list[str], max_chars: int = 300) -> list[list[dict]]:
    """One chat prompt (system, user) per paragraph that names nothing of the ``knowledge`` family."""
    from supple.testbed import tasks as T

    banned = knowledge_words()
    out = []
    for i, p in enumerate(paragraphs):
        if names_any(p, banned):
            continue
        text = p[:max_chars].rsplit(" ", 1)[0] if len(p) > max_chars else p
        out.append([{"role": "system", "content": T.SYSTEM_PROMPT},
                    {"role": "user", "content": _TEMPLATES[i % len(_TEMPLATES)].format(p=text)}])
    return out


def question_prompts() -> list[list[dict]]:
    """One chat prompt (system, user) per short general question of ``_QUESTIONS`` that names nothing of the
    ``knowledge`` family and asks in none of its forms."""
    from supple.testbed import tasks as T

    banned = knowledge_words()
    out = []
    for form, fills in _QUESTIONS:
        for f in fills:
            q = form.format(f)
            if EVAL_TEMPLATE.search(q) or names_any(q, banned):
                continue
            out.append([{"role": "system", "content": T.SYSTEM_PROMPT}, {"role": "user", "content": q}])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="embedded", help="'embedded' (SmolLM2-135M-Instruct), 'tiny' or a directory")
    ap.add_argument("--out", required=True, help="the .jsonl file to write")
    ap.add_argument("--source", choices=("pydoc", "questions"), default="pydoc",
                    help="'pydoc': instructions about pydoc paragraphs; 'questions': short general questions of "
                         "kinds the OOD family does not ask")
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
    if args.source == "questions":
        prompts = question_prompts()
    else:
        prompts = replay_prompts(load_builtin_corpus("pydoc")[args.skip :], args.max_chars)
    banned = knowledge_words()
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
                if a.strip() and not names_any(a, banned) and len(tokenize_replay_item(conv, tok, 10**6)) <= args.max_tokens:
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
