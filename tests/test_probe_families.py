"""The memorization probe family (``word_codes``): arbitrary but fixed answers, scored on the items it trains on."""

from __future__ import annotations

import re

import pytest

from supple.testbed import tasks as T
from supple.testbed.evaluation import probe_texts


def test_word_codes_are_a_fixed_arbitrary_function_of_the_key():
    fam = T.get_family("word_codes")
    assert fam.memorize and not T.get_family("reverse_words").memorize
    a = fam.solve("What is the code for key 4821?")
    assert a.answer == fam.solve("What is the code for key 4821?").answer  # fixed
    words = a.answer.split()
    assert len(words) == 2 and len(set(words)) == 2 and set(words) <= set(T._PROBE_WORDS)
    codes = {fam.solve(f"What is the code for key {k}?").answer for k in range(1000, 1100)}
    assert len(codes) > 90  # arbitrary: hardly any two keys share a code
    assert fam.check_answer(a, f"The code is {a.answer}.")
    assert not fam.check_answer(a, " ".join(words[::-1]))
    assert fam.wrong_answer(a, None) != a.answer


def test_memorize_probe_trains_and_scores_on_the_same_distinct_items():
    fam = T.get_family("word_codes")
    train, held = probe_texts("word_codes", 100, 32, seed=0)
    assert train == held and len(held) == 32
    assert len({p for p, _ in held}) == 32  # distinct keys
    for prompt, completion in held:
        key = int(re.search(r"key (\d{4})\?", prompt).group(1))
        assert prompt.endswith("\nAnswer:") and completion == " " + fam.code(key)
    other, _ = probe_texts("word_codes", 100, 32, seed=1)
    assert {p for p, _ in other} != {p for p, _ in held}  # the probe seed draws the pool
    assert probe_texts("word_codes", 100, 32, seed=0) == (train, held)  # deterministic


def test_transfer_probe_keeps_a_held_out_set_disjoint_from_training():
    train, held = probe_texts("reverse_words", 100, 32, seed=0)
    assert len(train) == 100 and len(held) == 32
    assert not {p for p, _ in train} & {p for p, _ in held}
    assert probe_texts("reverse_words", 100, 32, seed=1)[1] == held  # the held-out set is the same for every seed


def test_probe_overrides_set_steps_and_lr_per_family():
    from dataclasses import replace

    from supple.testbed.settings import PRESETS

    b = PRESETS["default"]
    assert b.probe_settings("reverse_words") == (b.probe_steps, b.probe_lr, b.probe_eval_every)
    steps, lr, every = b.probe_settings("word_codes")
    assert (steps, lr) != (b.probe_steps, b.probe_lr)  # the memorization probe runs its own, faster settings
    c = b.with_probe("reverse_words", 50, 1e-3)
    assert c.probe_settings("reverse_words") == (50, 1e-3, 10)
    assert c.probe_settings("word_codes") == (steps, lr, every) and b.probe_settings("reverse_words")[0] == 25
    assert c.probe_units(["reverse_words", "word_codes"]) == (50 + steps) * b.probe_seeds
    assert "reverse_words 50 steps @ lr 0.001" in c.describe_probes(["reverse_words"])
    with pytest.raises(ValueError, match="unknown setting.*'step'.*use steps"):
        replace(b, probe_overrides={"word_codes": {"step": 50}}).probe_settings("word_codes")


def test_probe_summary_runs_each_family_with_its_own_settings():
    from dataclasses import replace

    from supple.testbed.evaluation import probe_summary
    from supple.testbed.settings import PRESETS
    from supple.testbed.tiny import make_tiny_model

    model, tok = make_tiny_model()
    b = replace(PRESETS["smoke"], probe_eval=4, probe_seeds=2).with_probe("word_codes", 3, 1e-2, 1)
    codes = probe_summary(model, tok, "word_codes", b, "tiny")
    assert codes["eval_steps"] == [0, 1, 2, 3] and len(codes["train_loss"]) == 3
    assert codes["final_loss"] < codes["start_loss"]  # fitting the items it is scored on
    rev = probe_summary(model, tok, "reverse_words", b, "tiny")
    assert rev["eval_steps"] == list(range(b.probe_steps + 1))



def test_builtin_codes_probe_task_is_scored_on_its_training_items():
    from supple.measure.probe import CODE_WORDS, PROBE_TASKS, load_probe_task, register_probe_task

    train, held = load_probe_task("builtin:codes", n_train=999, n_eval=16, data_seed=3)
    assert train == held and len(held) == 16 and len({p for p, _ in held}) == 16
    assert load_probe_task("builtin:codes", n_eval=16, data_seed=3) == (train, held)
    assert load_probe_task("builtin:codes", n_eval=16, data_seed=4)[1] != held
    fam = T.get_family("word_codes")
    for prompt, completion in held:  # the product's task and the demo's family give every key the same code
        key = int(re.search(r"key (\d{4})\?", prompt).group(1))
        assert completion == " " + fam.solve(f"What is the code for key {key}?").answer
        assert set(completion.split()) <= set(CODE_WORDS)
    # a task registered without memorize keeps a held-out split; re-registering drops the flag
    register_probe_task("codes_heldout", PROBE_TASKS["codes"])
    try:
        tr, he = load_probe_task("builtin:codes_heldout", n_train=40, n_eval=8)
        assert not {p for p, _ in tr} & {p for p, _ in he}
    finally:
        PROBE_TASKS.pop("codes_heldout")


def test_summarize_probe_runs_keeps_every_probe_seeds_values_and_curve():
    """Means over probe seeds, per-seed values and held-out curves in the order of ``seeds``, max - min spread."""
    from supple.testbed.evaluation import summarize_probe_runs

    def run(final, curve):
        return dict(start_loss=curve[0], final_loss=final, tail_loss=(curve[1] + final) / 2, improvement=curve[0] - final,
                    relative_improvement=(curve[0] - final) / curve[0], area=2.0, train_area=1.0,
                    eval_steps=[0, 5, 10], eval_loss=curve, train_loss=[1.0] * 10)

    runs = [run(1.0, [4.0, 2.0, 1.0]), run(2.0, [6.0, 3.0, 2.0])]
    out = summarize_probe_runs("word_codes", [7, 3], runs)
    assert out["seeds"] == [7, 3] and out["final_loss"] == 1.5 and out["tail_loss"] == pytest.approx(2.0)
    assert out["per_seed"]["final_loss"] == [1.0, 2.0] and out["per_seed"]["tail_loss"] == [1.5, 2.5]
    assert out["per_seed"]["eval_loss"] == [[4.0, 2.0, 1.0], [6.0, 3.0, 2.0]]
    assert out["eval_loss"] == [5.0, 2.5, 1.5] and out["final_loss_spread"] == 1.0
    with pytest.raises(ValueError, match="one run per probe seed"):
        summarize_probe_runs("word_codes", [0], runs)


def test_merge_probe_records_equals_one_record_of_every_seed():
    """Two records of one model under disjoint probe seeds merge into what one record of all the runs holds: the
    per-seed values sorted by seed, every mean taken over all runs (written out here from the runs themselves),
    the spread over all of them; overlapping seeds, another family or other evaluation steps are refused."""
    from supple.testbed.evaluation import merge_probe_records, summarize_probe_runs

    def run(start, final, area, train_area, train):
        return dict(start_loss=start, final_loss=final, tail_loss=final + 0.5, improvement=start - final,
                    relative_improvement=(start - final) / start, area=area, train_area=train_area,
                    eval_steps=[0, 5], eval_loss=[start, final], train_loss=train)

    runs = {0: run(4.0, 1.0, 2.0, 1.0, [3.0, 1.0]), 1: run(8.0, 2.0, 3.0, 2.0, [5.0, 2.0]),
            2: run(5.0, 4.0, 4.0, 3.0, [4.0, 3.0])}
    a = {**summarize_probe_runs("f", [0, 2], [runs[0], runs[2]]), "seconds": 10.0}
    b = {**summarize_probe_runs("f", [1], [runs[1]]), "seconds": 5.0}
    out = merge_probe_records(a, b)
    assert out["seeds"] == [0, 1, 2]
    assert out["per_seed"]["final_loss"] == [1.0, 2.0, 4.0]
    assert out["per_seed"]["eval_loss"] == [[4.0, 1.0], [8.0, 2.0], [5.0, 4.0]]
    assert out["final_loss"] == pytest.approx(7.0 / 3) and out["start_loss"] == pytest.approx(17.0 / 3)
    assert out["improvement"] == pytest.approx((3.0 + 6.0 + 1.0) / 3)
    assert out["relative_improvement"] == pytest.approx((3 / 4 + 6 / 8 + 1 / 5) / 3)  # a mean of per-run ratios
    assert out["area"] == pytest.approx(3.0) and out["train_area"] == pytest.approx(2.0)
    assert out["train_loss"] == pytest.approx([4.0, 2.0]) and out["eval_loss"] == pytest.approx([17 / 3, 7 / 3])
    assert out["final_loss_spread"] == 3.0 and out["seconds"] == 15.0
    with pytest.raises(ValueError, match="share probe seeds"):
        merge_probe_records(a, a)
    with pytest.raises(ValueError, match="different families"):
        merge_probe_records(a, {**b, "family": "g"})
    with pytest.raises(ValueError, match="different steps"):
        merge_probe_records(a, {**b, "eval_steps": [0, 10]})
