"""benchmarks/ood_failures.py: the split of the OOD family's wrong answers into echoes of the question and others."""

from __future__ import annotations

import pytest

from .benchmark_module import load_benchmark


def _module():
    return load_benchmark("ood_failures")


def test_subject_of_every_knowledge_question_is_a_word_of_it():
    mod = _module()
    from supple.testbed import tasks as T

    assert mod.question_subject("What is the capital of Buenos Aires land?") == "Buenos Aires land"
    assert mod.question_subject("What is the opposite of 'hot'?") == "hot"
    assert mod.question_subject("Which month comes after June?") == "June"
    for ex in T.get_family("knowledge").pool:
        subject = mod.question_subject(ex.question)
        assert subject and subject in ex.question and subject.lower() != ex.answer.lower()
    with pytest.raises(ValueError, match="no subject"):
        mod.question_subject("Name a colour.")


def test_echo_is_a_whole_word_repeat():
    mod = _module()
    assert mod.echoes("Which month comes after June?", "june")
    assert mod.echoes("What is the capital of Poland?", " Poland")
    assert not mod.echoes("What is the plural of 'man'?", "women")  # 'man' inside 'woman' is no echo
    assert not mod.echoes("What is the capital of Peru?", "Perú")


def test_tally_splits_wrong_answers():
    mod = _module()
    rows = [
        {"q": "What is the capital of Poland?", "out": "Poland", "correct": False},
        {"q": "What is the capital of Spain?", "out": "Madrid", "correct": True},
        {"q": "Which day comes after Sunday?", "out": "Friday", "correct": False},
        {"q": "What is the plural of 'box'?", "out": "box", "correct": False},
    ]
    t = mod.tally(rows)
    assert t["n"] == 4 and t["acc"] == pytest.approx(0.25)
    assert t["echo"] == pytest.approx(0.5) and t["other"] == pytest.approx(0.25)


def test_task_metrics_keeps_the_asked_number_of_examples():
    from supple.testbed.evaluation import task_metrics
    from supple.testbed.tiny import make_tiny_model

    model, tok = make_tiny_model()
    res = task_metrics(model, tok, "knowledge", 8, keep_examples=8)
    assert len(res["examples"]) == 8
    assert sum(e["correct"] for e in res["examples"]) == pytest.approx(res["acc"] * 8)
    assert len(task_metrics(model, tok, "knowledge", 8)["examples"]) == 3
