"""benchmarks/self_replay_corpus.py: the self-generated chat replay corpus names nothing the OOD family asks about."""

from __future__ import annotations

import json
import re

from .benchmark_module import REPO, load_benchmark


def _module():
    return load_benchmark("self_replay_corpus")


def test_prompts_drop_paragraphs_naming_knowledge_items_and_cut_long_ones():
    mod = _module()
    paras = ["A function returns a value to its caller.", "Lists are kept until Monday.",
             "A module named Paris is imported.", "word " * 200]
    prompts = mod.replay_prompts(paras, max_chars=50)
    assert len(prompts) == 2  # the weekday and the capital are dropped
    for msgs in prompts:
        assert [m["role"] for m in msgs] == ["system", "user"]
        assert msgs[0]["content"] == "Answer with the answer only."
    assert "A function returns a value to its caller." in prompts[0][1]["content"]
    passage = prompts[1][1]["content"].split("\n\n", 1)[1]
    assert len(passage) <= 50 and passage.startswith("word word")


def test_committed_corpus_is_chat_and_leaks_no_knowledge_question():
    mod = _module()
    from supple.testbed import tasks as T

    questions = {ex.question for ex in T.get_family("knowledge").pool}
    banned = mod.knowledge_words()
    assert {"monday", "paris", "france", "december"} <= banned
    rows = [json.loads(x)["messages"] for x in (REPO / "docs/demo/self_replay/smollm2_135m.jsonl").open()]
    assert len(rows) >= 200
    for msgs in rows:
        assert [m["role"] for m in msgs] == ["system", "user", "assistant"] and msgs[2]["content"]
        assert msgs[1]["content"] not in questions
        assert not banned & {w.lower() for w in re.findall(r"[A-Za-z]+", msgs[1]["content"])}


def test_general_questions_ask_in_none_of_the_knowledge_forms():
    mod = _module()
    from supple.testbed import tasks as T

    prompts = mod.question_prompts()
    assert len(prompts) >= 150
    asked = [m[1]["content"] for m in prompts]
    assert len(set(asked)) == len(asked)
    stems = {" ".join(ex.question.split()[:3]) for ex in T.get_family("knowledge").pool}
    assert {"What is the", "Which day comes"} <= stems  # the forms below are the family's own
    for q in asked:
        assert not any(w in q.lower() for w in ("capital", "opposite", "plural", "comes after")), q


def test_question_filter_drops_knowledge_items_and_forms(monkeypatch):
    mod = _module()
    monkeypatch.setattr(mod, "_QUESTIONS", (("What color is {}?", ("grass", "Paris")),
                                            ("Which season comes after {}?", ("winter",)),
                                            ("Who was born on a {}?", ("Monday", "farm"))))
    assert [m[1]["content"] for m in mod.question_prompts()] == ["What color is grass?", "Who was born on a farm?"]


def test_committed_question_corpus_leaks_no_knowledge_item():
    mod = _module()
    banned = mod.knowledge_words()
    path = REPO / "docs/demo/self_replay/smollm2_135m_questions.jsonl"
    rows = [json.loads(x)["messages"] for x in path.open()]
    assert len(rows) >= 150
    for msgs in rows:
        assert [m["role"] for m in msgs] == ["system", "user", "assistant"] and msgs[2]["content"]
        text = msgs[1]["content"] + " " + msgs[2]["content"]
        assert not banned & {w.lower() for w in re.findall(r"[A-Za-z]+", text)}
        assert not mod.EVAL_TEMPLATE.search(msgs[1]["content"])
