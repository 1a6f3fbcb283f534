"""SuppleConfig: defaults, validation with helpful errors, parsing, mixing into TRL configs."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from transformers import HfArgumentParser
from trl import DPOConfig, SFTConfig

from supple import SuppleCallback, SuppleConfig
from supple.config import extract_supple_config

CONTRACT_FIELDS = {
    "diversity_weight", "diversity_penalty", "diversity_layers", "diversity_max_tokens",
    "diversity_normalize_tokens", "decorrelation_weight", "decorrelation_cross_weight", "previous_adapters",
    "replay_data", "replay_weight", "replay_every", "replay_batch_size", "refresh_method", "refresh_every",
    "metrics_every",
}


def test_contract_fields_and_defaults():
    cfg = SuppleConfig()
    assert CONTRACT_FIELDS <= set(vars(cfg))
    assert cfg.diversity_weight == 0 and cfg.diversity_penalty == "ipr" and cfg.diversity_layers == [-1]
    assert cfg.diversity_normalize_tokens is True and cfg.refresh_method is None and cfg.replay_data is None


@pytest.mark.parametrize(
    "kwargs,field,hint",
    [
        ({"diversity_weight": -0.1}, "diversity_weight", ">= 0"),
        ({"diversity_weight": float("nan")}, "diversity_weight", "finite"),
        ({"decorrelation_weight": -1}, "decorrelation_weight", ">= 0"),
        ({"decorrelation_cross_weight": -1}, "decorrelation_cross_weight", ">= 0"),
        ({"replay_weight": -1}, "replay_weight", ">= 0"),
        ({"diversity_weight": "0.1"}, "diversity_weight", "number"),
        ({"diversity_penalty": "pca"}, "diversity_penalty", "ipr, decov, vicreg"),
        ({"diversity_max_tokens": -1}, "diversity_max_tokens", ">= 0"),
        ({"diversity_max_tokens": 1}, "diversity_max_tokens", "at least 2"),
        ({"diversity_max_tokens": 2.5}, "diversity_max_tokens", "integer"),
        ({"diversity_layers": []}, "diversity_layers", "non-empty"),
        ({"diversity_layers": [1.5]}, "diversity_layers", "decoder-block indices"),
        ({"diversity_layers": [1, 1]}, "diversity_layers", "distinct"),
        ({"diversity_normalize_tokens": "yes"}, "diversity_normalize_tokens", "True or False"),
        ({"previous_adapters": [3]}, "previous_adapters", "paths"),
        ({"replay_every": 0}, "replay_every", ">= 1"),
        ({"replay_batch_size": 0}, "replay_batch_size", ">= 1"),
        ({"replay_max_length": -1}, "replay_max_length", ">= 0"),
        ({"replay_max_length": 1}, "replay_max_length", "two tokens"),
        ({"refresh_method": "reset"}, "refresh_method", "shrink_perturb, relora, redo"),
        ({"refresh_every": 0}, "refresh_every", ">= 1"),
        ({"metrics_every": -5}, "metrics_every", ">= 0"),
        ({"diversity_reference": "start"}, "diversity_reference", "'none', 'pre_stage'"),
        ({"diversity_tolerance": -0.1}, "diversity_tolerance", ">= 0"),
        ({"diversity_tolerance": float("inf")}, "diversity_tolerance", "finite"),
        ({"diversity_reference_batches": -1}, "diversity_reference_batches", ">= 0"),
        ({"diversity_weight_schedule": "adaptive"}, "diversity_weight_schedule", "'fixed', 'auto'"),
        ({"diversity_weight_schedule": "auto", "diversity_weight": 0.1}, "diversity_weight_schedule",
         "diversity_reference='pre_stage'"),
        ({"diversity_weight_max": 0}, "diversity_weight_max", "> 0"),
        ({"diversity_weight_min": 0.0}, "diversity_weight_min", "> 0"),
        ({"diversity_weight_rate": -1}, "diversity_weight_rate", "> 0"),
        ({"diversity_reference": "pre_stage", "diversity_weight_schedule": "auto", "diversity_weight": 0.0},
         "diversity_weight", "starting λ"),
        ({"diversity_reference": "pre_stage", "diversity_weight_schedule": "auto", "diversity_weight": 20.0},
         "diversity_weight", "diversity_weight_max (= 10.0)"),
        ({"diversity_reference": "pre_stage", "diversity_weight_schedule": "auto", "diversity_weight": 1.0,
          "diversity_weight_min": 2.0, "diversity_weight_max": 1.5}, "diversity_weight_min", "<= diversity_weight_max"),
    ],
)
def test_invalid_values_name_the_field_and_allowed_values(kwargs, field, hint):
    with pytest.raises(ValueError) as exc:
        SuppleConfig(**kwargs)
    assert f"SuppleConfig.{field}" in str(exc.value) and hint in str(exc.value)


def test_anchor_fields_defaults_and_parsing():
    cfg = SuppleConfig()
    assert cfg.diversity_reference == "none" and cfg.diversity_tolerance == 0 and cfg.diversity_reference_batches == 4
    assert cfg.diversity_weight_schedule == "fixed"
    assert 0 < cfg.diversity_weight_min <= cfg.diversity_weight_max and cfg.diversity_weight_rate > 0
    (parsed,) = HfArgumentParser(SuppleConfig).parse_args_into_dataclasses(
        ["--diversity_weight", "0.5", "--diversity_reference", "pre_stage", "--diversity_tolerance", "0.05",
         "--diversity_reference_batches", "0", "--diversity_weight_schedule", "auto", "--diversity_weight_max", "2"]
    )
    assert parsed.diversity_reference == "pre_stage" and parsed.diversity_tolerance == 0.05
    assert parsed.diversity_reference_batches == 0 and parsed.diversity_weight_schedule == "auto"
    assert parsed.diversity_weight_max == 2.0


def test_typo_in_field_name_is_an_error():
    with pytest.raises(TypeError, match="diversty_weight"):
        SuppleConfig(diversty_weight=0.1)  # type: ignore[call-arg]


def test_single_int_layer_and_single_path_are_accepted():
    cfg = SuppleConfig(diversity_layers=-2, previous_adapters="some/dir")
    assert cfg.diversity_layers == [-2] and cfg.previous_adapters == ["some/dir"]


def test_hf_argument_parser_parses_every_field():
    (cfg,) = HfArgumentParser(SuppleConfig).parse_args_into_dataclasses(
        ["--diversity_weight", "0.05", "--diversity_layers", "15", "-1", "--diversity_penalty", "decov",
         "--diversity_normalize_tokens", "false", "--decorrelation_weight", "0.1", "--metrics_every", "50",
         "--diversity_max_tokens", "512"]
    )
    assert cfg.diversity_weight == 0.05 and cfg.diversity_layers == [15, -1] and cfg.diversity_penalty == "decov"
    assert cfg.diversity_normalize_tokens is False and cfg.metrics_every == 50 and cfg.diversity_max_tokens == 512


def test_hf_argument_parser_rejects_unknown_flag():
    with pytest.raises(ValueError, match="diversty"):
        HfArgumentParser(SuppleConfig).parse_args_into_dataclasses(["--diversty_weight", "1"])


@dataclass
class MySFTConfig(SuppleConfig, SFTConfig):
    pass


@dataclass
class MyDPOConfig(SuppleConfig, DPOConfig):
    pass


def test_mixed_into_trl_configs(tmp_path):
    args = MySFTConfig(output_dir=str(tmp_path), diversity_weight=0.3, diversity_layers=[0], report_to=[], use_cpu=True)
    assert args.learning_rate > 0 and args.diversity_weight == 0.3  # both parents initialized
    cfg = extract_supple_config(args)
    assert isinstance(cfg, SuppleConfig) and cfg.diversity_layers == [0] and cfg.diversity_weight == 0.3
    with pytest.raises(ValueError, match="diversity_weight"):
        MyDPOConfig(output_dir=str(tmp_path), diversity_weight=-1, report_to=[], use_cpu=True)
    (parsed,) = HfArgumentParser(MySFTConfig).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--diversity_weight", "0.2", "--report_to", "none", "--use_cpu", "true"]
    )
    assert parsed.diversity_weight == 0.2


def test_callback_reads_plain_trl_config_with_clear_error(tmp_path):
    with pytest.raises(ValueError, match="mix the fields into your config"):
        extract_supple_config(SFTConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True))


def test_callback_rejects_wrong_arguments():
    with pytest.raises(TypeError, match="SuppleConfig"):
        SuppleCallback({"diversity_weight": 0.1})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="unexpected keyword"):
        SuppleCallback(diversity_weight=0.1)
