"""The heart of supple: a callback-injected term equals adding it to the loss by hand.

Each case trains a tiny random Llama for 2 SGD steps with SuppleCallback and, separately, with a
Trainer subclass whose compute_loss adds the same term by hand (tests/_runs.py), and compares the
final parameters (fp32, rtol 1e-5). The runs also differ from a run without the term, so the check
has teeth. The diversity cases run once as λ·P and once anchored to the pre-stage reference,
λ·relu(P − T) (measured at train begin or over the first step; fixed or automatic λ).
"""

from __future__ import annotations

import itertools

import pytest
from trl import DPOTrainer, SFTTrainer

from supple import SuppleCallback, SuppleConfig

from ._runs import AnchorSpec, assert_params_close, max_abs_diff, reference_class, run, trainable_state

TRAINERS = {"sft": SFTTrainer, "dpo": DPOTrainer}

DIVERSITY_CASES = [
    (kind, lora, ga, ckpt, layers)
    for kind, lora, ga, ckpt, layers in itertools.product(
        ("sft", "dpo"), (True, False), (1, 2), (False, True), ((-1,), (0, -1))
    )
    # every axis is covered in both trainers; trim the full product to keep CI fast
    if (ga, ckpt, layers) in {(1, False, (-1,)), (2, True, (0, -1)), (2, False, (-1,)), (1, True, (0, -1))}
]
# the same cases anchored to the pre-stage reference: the train-begin sample with a fixed λ at GA 1, the first
# step's own micro-batches with the automatic λ at GA 2 (each with checkpointing on and off)
TRAIN_BEGIN, FIRST_STEP_AUTO = AnchorSpec(batches=4), AnchorSpec(batches=0, rate=0.5)
ANCHORED_CASES = [(*case, TRAIN_BEGIN if case[2] == 1 else FIRST_STEP_AUTO) for case in DIVERSITY_CASES]


def anchor_fields(spec: AnchorSpec | None) -> dict:
    """The SuppleConfig fields of an AnchorSpec (none for the plain λ·P term)."""
    if spec is None:
        return {}
    auto = {"diversity_weight_schedule": "auto", "diversity_weight_rate": spec.rate,
            "diversity_weight_min": spec.low, "diversity_weight_max": spec.high} if spec.rate is not None else {}
    return {"diversity_reference": "pre_stage", "diversity_tolerance": spec.tolerance,
            "diversity_reference_batches": spec.batches, **auto}


@pytest.mark.parametrize("kind,lora,ga,ckpt,layers,anchor",
                         [(*case, None) for case in DIVERSITY_CASES] + ANCHORED_CASES)
def test_diversity_matches_hand_written_loss(tmp_path, kind, lora, ga, ckpt, layers, anchor):
    weight = 1.0
    cfg = SuppleConfig(diversity_weight=weight, diversity_layers=list(layers), diversity_max_tokens=0,
                       **anchor_fields(anchor))
    steps = 2 if anchor is None else 3  # anchored: the first-step reference leaves step 0 without a term
    with_cb = run(kind, callbacks=[SuppleCallback(cfg)], lora=lora, ga=ga, ckpt=ckpt, steps=steps, out=tmp_path / "cb")
    # the reference never uses gradient checkpointing: checkpointing must not change the result
    ref = run(kind, trainer_cls=reference_class(TRAINERS[kind], weight, layers=layers, anchor=anchor), lora=lora,
              ga=ga, steps=steps, out=tmp_path / "ref")
    plain = run(kind, lora=lora, ga=ga, steps=steps, out=tmp_path / "plain")
    a, b, c = trainable_state(with_cb), trainable_state(ref), trainable_state(plain)
    assert_params_close(a, b, rtol=1e-5, atol=1e-6)
    assert max_abs_diff(a, c) > 1e-4, "the diversity term had no visible effect: the test would not catch a no-op"
    logs = [h for h in with_cb.state.log_history if "supple/diversity" in h]
    assert len(logs) == steps and all(0 < h["supple/diversity"] <= 1 for h in logs)
    if anchor is not None:
        assert sum(h["supple/diversity_active"] for h in logs) > 0, "no term was above its threshold"
        assert all(0 < h["supple/diversity_reference"] <= 1 for h in logs)
    if anchor is not None and anchor.rate is not None:  # λ logged after step s is the one the reference used at s+1
        weights = [h["supple/diversity_weight"] for h in logs[:-1]]
        assert weights == pytest.approx(ref.weights[1:], rel=1e-5)


def test_anchor_threshold_is_crossed_by_some_terms_only(tmp_path):
    """Tolerance 0 on two blocks, 3 steps of 2 micro-batches: some terms above the pre-stage reference, some
    below; the parameters still equal the hand-written relu(P − T) loss, and differ from λ·P."""
    spec = AnchorSpec(batches=4, rate=0.5)
    cfg = SuppleConfig(diversity_weight=1.0, diversity_layers=[0, -1], diversity_max_tokens=0, **anchor_fields(spec))
    with_cb = run("sft", callbacks=[SuppleCallback(cfg)], ga=2, steps=3, out=tmp_path / "cb")
    ref = run("sft", trainer_cls=reference_class(SFTTrainer, 1.0, layers=(0, -1), anchor=spec), ga=2, steps=3,
              out=tmp_path / "ref")
    unanchored = run("sft", callbacks=[SuppleCallback(SuppleConfig(diversity_weight=1.0, diversity_layers=[0, -1],
                                                                   diversity_max_tokens=0))],
                     ga=2, steps=3, out=tmp_path / "unanchored")
    a = trainable_state(with_cb)
    assert_params_close(a, trainable_state(ref), rtol=1e-5, atol=1e-6)
    assert max_abs_diff(a, trainable_state(unanchored)) > 1e-4
    active = [h["supple/diversity_active"] for h in with_cb.state.log_history if "supple/diversity_active" in h]
    assert len(active) == 3 and 0 < sum(active) < 3 and any(0 < v < 1 for v in active), active
    weights = [h["supple/diversity_weight"] for h in with_cb.state.log_history if "supple/diversity_weight" in h]
    assert len(weights) == 3 and weights[:-1] == pytest.approx(ref.weights[1:], rel=1e-5)


@pytest.mark.parametrize("kind,batches", [("sft", 4), ("dpo", 0)])
def test_anchor_with_huge_tolerance_is_bit_identical_to_no_term(tmp_path, kind, batches):
    cfg = SuppleConfig(diversity_weight=1.0, diversity_max_tokens=0, diversity_reference="pre_stage",
                       diversity_tolerance=1e6, diversity_reference_batches=batches)
    with_cb = run(kind, callbacks=[SuppleCallback(cfg)], ga=2, out=tmp_path / "a")
    a, b = trainable_state(with_cb), trainable_state(run(kind, ga=2, out=tmp_path / "b"))
    for k in a:
        assert torch_equal(a[k], b[k]), k
    active = [h["supple/diversity_active"] for h in with_cb.state.log_history if "supple/diversity_active" in h]
    assert active == [0.0, 0.0]


@pytest.mark.parametrize("kind,ga", [("sft", 1), ("sft", 2), ("dpo", 1), ("dpo", 2)])
def test_decorrelation_matches_hand_written_loss(tmp_path, kind, ga):
    cfg = SuppleConfig(decorrelation_weight=2.0)
    with_cb = run(kind, callbacks=[SuppleCallback(cfg)], ga=ga, out=tmp_path / "cb")
    ref = run(kind, trainer_cls=reference_class(TRAINERS[kind], intra_weight=2.0), ga=ga, out=tmp_path / "ref")
    plain = run(kind, ga=ga, out=tmp_path / "plain")
    a, b, c = trainable_state(with_cb), trainable_state(ref), trainable_state(plain)
    assert_params_close(a, b, rtol=1e-5, atol=1e-6)
    assert max_abs_diff(a, c) > 1e-3
    logged = [h["supple/decorrelation"] for h in with_cb.state.log_history if "supple/decorrelation" in h]
    assert len(logged) == 2 and logged[1] < logged[0]


@pytest.mark.parametrize("kind,ga", [("sft", 2), ("dpo", 1)])
def test_all_terms_together_match_hand_written_loss(tmp_path, kind, ga):
    """Diversity on two blocks + intra + cross-stage decorrelation at once, with a previous subspace."""
    import torch

    from ._runs import lora_a_matrices

    # a previous-stage subspace for every LoRA module: 3 random orthonormal directions
    probe = run(kind, lora=True, steps=1, out=tmp_path / "probe")
    gen = torch.Generator().manual_seed(1)
    bases = {}
    for name, a in lora_a_matrices(probe.model).items():
        q, _ = torch.linalg.qr(torch.randn(a.shape[1], 3, generator=gen))
        bases[name] = q
    cfg = SuppleConfig(diversity_weight=0.5, diversity_layers=[0, 1], diversity_max_tokens=0,
                       decorrelation_weight=1.0, decorrelation_cross_weight=3.0)
    with_cb = run(kind, callbacks=[SuppleCallback(cfg, previous_subspaces=bases)], ga=ga, out=tmp_path / "cb")
    ref_cls = reference_class(TRAINERS[kind], 0.5, layers=(0, 1), intra_weight=1.0, cross_weight=3.0, bases=bases)
    ref = run(kind, trainer_cls=ref_cls, ga=ga, out=tmp_path / "ref")
    assert_params_close(trainable_state(with_cb), trainable_state(ref), rtol=1e-5, atol=1e-6)
    cross = [h["supple/cross_overlap"] for h in with_cb.state.log_history if "supple/cross_overlap" in h]
    assert len(cross) == 2 and all(0 <= v <= 1 for v in cross)


def test_zero_weight_is_bit_identical_to_no_callback(tmp_path):
    cb = SuppleCallback(SuppleConfig(diversity_weight=0.0))
    a = trainable_state(run("sft", callbacks=[cb], ga=2, out=tmp_path / "a"))
    b = trainable_state(run("sft", ga=2, out=tmp_path / "b"))
    for k in a:
        assert torch_equal(a[k], b[k]), k


def torch_equal(x, y) -> bool:
    import torch

    return bool(torch.equal(x, y))


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_token_subsampling_is_reproducible_and_matches_reference(tmp_path, kind):
    cfg = SuppleConfig(diversity_weight=1.0, diversity_max_tokens=16, diversity_layers=[0, -1])
    a = run(kind, callbacks=[SuppleCallback(cfg)], ga=2, out=tmp_path / "a")
    b = run(kind, callbacks=[SuppleCallback(cfg)], ga=2, out=tmp_path / "b")
    ref = run(kind, trainer_cls=reference_class(TRAINERS[kind], 1.0, layers=(0, -1), max_tokens=16), ga=2,
              out=tmp_path / "ref")
    full = run(kind, callbacks=[SuppleCallback(SuppleConfig(diversity_weight=1.0, diversity_layers=[0, -1],
                                                            diversity_max_tokens=0))], ga=2, out=tmp_path / "full")
    sa, sb = trainable_state(a), trainable_state(b)
    for k in sa:
        assert torch_equal(sa[k], sb[k]), k
    assert_params_close(sa, trainable_state(ref), rtol=1e-5, atol=1e-6)
    assert max_abs_diff(sa, trainable_state(full)) > 1e-5  # sampling really subsampled
