"""The measurement suite: is a (post-trained) causal LM collapsing?

Hidden-state geometry per decoder block (effective rank, participation ratio, anisotropy, top-PC
share, norm statistics; over all tokens and without the attention-sink position, on raw and
unit-normalized vectors), next-token prediction (entropy, top-1 probability, ECE, Brier), token
trajectories (cosine between consecutive blocks, logit-lens agreement, trajectory length), LoRA
update spectra and subspace overlap, checkpoint comparison (linear CKA per layer and metric deltas),
and the plasticity probe. Results are tidy records (plain dicts) that export to CSV / JSON.

The metric math lives in :mod:`supple.regularizers.geometry` (pure torch) and
:mod:`supple.measure.calibration`; nothing here imports transformers at module level. Saved models and
adapters are read by :mod:`supple.measure.adapters` only: local files, safetensors only, never a pickle.
"""

from ..modeling import find_decoder_blocks, unwrap_model
from .adapters import PickleRefusedError, load_peft_adapter, read_adapter, refuse_pickles
from .calibration import brier_score, expected_calibration_error, next_token_stats
from .compare import cka_records, compare_checkpoints, compare_records
from .core import MeasureRun, collect, measure_model, run_records
from .corpus import load_builtin_corpus, load_texts
from .lora import LoraFactors, adapter_overlap, lora_factors, lora_update_spectra
from .models import find_final_norm, find_lm_head, load_model
from .probe import PROBE_TASKS, load_probe_task, plasticity_probe, register_probe_task
from .records import RECORD_FIELDS
from .report import plot_records, read_records_json, write_records_csv, write_records_json, write_summary

__all__ = [
    "PROBE_TASKS",
    "RECORD_FIELDS",
    "LoraFactors",
    "MeasureRun",
    "PickleRefusedError",
    "adapter_overlap",
    "brier_score",
    "cka_records",
    "collect",
    "compare_checkpoints",
    "compare_records",
    "expected_calibration_error",
    "find_decoder_blocks",
    "find_final_norm",
    "find_lm_head",
    "load_builtin_corpus",
    "load_model",
    "load_peft_adapter",
    "load_probe_task",
    "load_texts",
    "lora_factors",
    "lora_update_spectra",
    "measure_model",
    "next_token_stats",
    "plasticity_probe",
    "plot_records",
    "read_adapter",
    "read_records_json",
    "refuse_pickles",
    "register_probe_task",
    "run_records",
    "unwrap_model",
    "write_records_csv",
    "write_records_json",
    "write_summary",
]
