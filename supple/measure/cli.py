"""`supple measure` and `supple probe`: registered by :mod:`supple.cli` through :func:`add_parsers`."""

from __future__ import annotations

import argparse
import sys

__all__ = ["add_parsers", "at_least", "cmd_measure", "cmd_probe", "positive_float"]

_MODEL_HELP = (
    "a local Hugging Face model directory, a PEFT adapter directory, or 'embedded' (SmolLM2-135M-Instruct); "
    "local files and safetensors weights only"
)


def at_least(low: int):
    """An argparse ``type``: an integer >= ``low`` (a bad value is argparse's one-line error, exit 2)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def positive_float(text: str) -> float:
    """An argparse ``type``: a finite float > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16", "float16"),
        help="weights dtype for the forward passes (default float32)",
    )
    p.add_argument("--batch-size", type=at_least(1), default=8)
    p.add_argument("--max-length", type=at_least(2), default=256, help="tokens per text at most (truncation)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")


def add_parsers(subparsers) -> None:
    """Add the ``measure`` and ``probe`` sub-commands (each sets ``func``)."""
    m = subparsers.add_parser(
        "measure",
        help="measure hidden-state geometry, logits, trajectories and LoRA updates of one or more models",
        description="Measure representation collapse: writes measure.json, measure.csv, PNG plots (metric vs "
        "layer, one line per model) and summary.md to --out. With several models, each is also compared with "
        "the first (linear CKA per layer and the change of every metric).",
    )
    m.add_argument("models", nargs="+", metavar="MODEL", help=_MODEL_HELP)
    m.add_argument(
        "--data",
        default="builtin:pydoc",
        help="a text file (paragraphs separated by blank lines, else one text per line), a .jsonl with "
        "a 'text' field, or builtin:pydoc (default)",
    )
    m.add_argument("--out", required=True, help="output directory")
    m.add_argument("--max-texts", type=at_least(1), default=None, help="use at most this many texts")
    m.add_argument(
        "--max-tokens",
        type=at_least(0),
        default=4096,
        help="non-padding tokens measured per model (0 = all; default 4096)",
    )
    m.add_argument(
        "--layers",
        type=int,
        nargs="+",
        default=None,
        help="decoder blocks for the geometry (negative from the end; default all)",
    )
    m.add_argument("--lens-tokens", type=at_least(0), default=512, help="tokens run through the logit lens (0 = off)")
    m.add_argument("--no-plots", action="store_true", help="write JSON, CSV and the summary only")
    _common(m)
    m.set_defaults(func=cmd_measure)

    p = subparsers.add_parser(
        "probe",
        help="plasticity probe: train a fresh LoRA for K steps on a held-out task, report its loss curve",
        description="Train a fresh LoRA on a held-out task and report the held-out loss before, during and "
        "after (start loss, final loss, improvement, area under the curve). Deterministic given the seed.",
    )
    p.add_argument("models", nargs="+", metavar="MODEL", help=_MODEL_HELP)
    p.add_argument(
        "--task",
        default="builtin:reverse",
        help="builtin:reverse (default; reverse short letter strings, loss on the answers), builtin:codes "
        "(memorize --n-eval arbitrary two-word codes, scored on those same items: how fast the model still fits new "
        "targets; try --steps 100 --lr 1e-3), a .jsonl with prompt/completion (or text) fields, or a text file of "
        "training texts (of a file, the last 10%% are held out)",
    )
    p.add_argument(
        "--out", default=None, help="output directory for probe.json, probe.csv, probe.png, probe.md"
    )
    p.add_argument("--steps", type=at_least(1), default=50)
    p.add_argument("--lr", type=positive_float, default=1e-3)
    p.add_argument("--rank", type=at_least(1), default=8)
    p.add_argument("--alpha", type=positive_float, default=16.0)
    p.add_argument("--target-modules", nargs="+", default=["all-linear"])
    p.add_argument("--seed", type=int, nargs="+", default=[0], help="training seed(s): one probe per seed")
    p.add_argument("--data-seed", type=int, default=0, help="seed of a built-in task's texts")
    p.add_argument("--n-train", type=at_least(1), default=256, help="training texts of a built-in task")
    p.add_argument("--n-eval", type=at_least(1), default=64, help="held-out texts of a built-in task")
    p.add_argument(
        "--eval-every", type=at_least(1), default=None, help="held-out evaluation interval (default steps/10)"
    )
    p.add_argument("--warmup", type=at_least(0), default=0, help="linear learning-rate warm-up steps (default 0)")
    p.add_argument("--cooldown", type=at_least(0), default=0,
                   help="decay the learning rate linearly to zero over the last N steps (default 0 = constant)")
    p.add_argument("--max-grad-norm", type=positive_float, default=None,
                   help="clip the LoRA gradient norm to this before each step (default: no clipping)")
    _common(p)
    p.set_defaults(func=cmd_probe, max_length=128)


def _quiet_loading(args: argparse.Namespace) -> None:
    """With ``--no-progress``, also no progress bars from transformers while it loads weights."""
    if getattr(args, "no_progress", False):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def _unique(name: str, taken: set[str]) -> str:
    out, i = name, 2
    while out in taken:
        out, i = f"{name}-{i}", i + 1
    taken.add(out)
    return out


def cmd_measure(args: argparse.Namespace) -> int:
    import gc
    from pathlib import Path

    from .compare import cka_records, compare_records
    from .core import collect, run_records
    from .corpus import load_texts
    from .lora import adapter_overlap, lora_update_spectra
    from .models import load_model
    from .report import plot_records, write_records_csv, write_records_json, write_summary

    _quiet_loading(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    texts = load_texts(args.data, limit=args.max_texts)
    meta = {
        "models": list(args.models),
        "data": args.data,
        "texts": len(texts),
        "max_tokens": args.max_tokens,
        "max_length": args.max_length,
        "layers": args.layers if args.layers is not None else "all",
        "hidden_states": "decoder block outputs (forward hooks), before the final norm; non-padding tokens",
    }
    records: list[dict] = []
    names: list[str] = []
    taken: set[str] = set()
    ref_run = ref_records = ref_adapter = None
    texts_used: dict[str, int] = {}
    for spec in args.models:
        model, tok, name = load_model(spec, args.device, args.dtype)
        name = _unique(name, taken)
        names.append(name)
        run = collect(
            model,
            tok,
            texts,
            name=name,
            batch_size=args.batch_size,
            max_length=args.max_length,
            max_tokens=args.max_tokens or None,
            layers=args.layers,
            logit_lens=args.lens_tokens > 0,
            lens_max_tokens=args.lens_tokens,
            progress=not args.no_progress,
        )
        texts_used[name] = run.texts_used
        rows = run_records(run)
        rows += lora_update_spectra(model, name=name)
        records += rows
        if ref_run is None:
            ref_run, ref_records = run, rows
        else:
            try:
                records += cka_records(ref_run, run)
            except ValueError as exc:
                print(f"supple measure: no CKA for {name}: {exc}", file=sys.stderr)
            records += compare_records(ref_records, rows)
        if (Path(spec) / "adapter_config.json").exists():
            if ref_adapter is None:
                ref_adapter = (spec, name)
            else:
                records += adapter_overlap(ref_adapter[0], spec, names=(ref_adapter[1], name))
        del model, run
        gc.collect()
    meta["names"] = names
    meta["texts_used"] = texts_used
    paths = [
        write_records_json(records, out / "measure.json", meta),
        write_records_csv(records, out / "measure.csv"),
    ]
    plots = [] if args.no_plots else plot_records(records, out)
    paths += plots
    paths.append(write_summary(records, out / "summary.md", meta, plots))
    for p in paths:
        print(p)
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    import gc
    import json
    from pathlib import Path

    from .models import load_model
    from .probe import load_probe_task, plasticity_probe

    if args.cooldown and args.cooldown > args.steps - args.warmup:
        raise ValueError(f"--cooldown {args.cooldown} must be at most --steps minus --warmup "
                         f"({args.steps - args.warmup})")
    _quiet_loading(args)
    train, held = load_probe_task(
        args.task, n_train=args.n_train, n_eval=args.n_eval, data_seed=args.data_seed
    )
    target = args.target_modules[0] if args.target_modules == ["all-linear"] else args.target_modules
    results = []
    taken: set[str] = set()
    for spec in args.models:
        model, tok, name = load_model(spec, args.device, args.dtype)
        name = _unique(name, taken)
        from peft import PeftModel

        if isinstance(model, PeftModel):
            model = model.merge_and_unload()
        for seed in args.seed:
            res = plasticity_probe(
                model,
                tok,
                train,
                held,
                steps=args.steps,
                lr=args.lr,
                rank=args.rank,
                alpha=args.alpha,
                batch_size=args.batch_size,
                max_length=args.max_length,
                seed=seed,
                target_modules=target,
                eval_every=args.eval_every,
                name=name,
                progress=not args.no_progress,
                warmup_steps=args.warmup,
                max_grad_norm=args.max_grad_norm,
                cooldown_steps=args.cooldown,
            )
            res["task"] = args.task
            results.append(res)
            print(
                f"{name} seed {seed}: start {res['start_loss']:.4f}  final {res['final_loss']:.4f}  "
                f"improvement {res['improvement']:.4f}  area {res['area']:.4f}"
            )
        del model
        gc.collect()
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        meta = {
            k: getattr(args, k)
            for k in (
                "task",
                "steps",
                "lr",
                "rank",
                "alpha",
                "seed",
                "data_seed",
                "n_train",
                "n_eval",
                "batch_size",
                "max_length",
            )
        }
        meta["models"] = list(args.models)
        (out / "probe.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
        _write_probe_csv(results, out / "probe.csv")
        _plot_probe(results, out / "probe.png")
        _write_probe_md(results, meta, out / "probe.md")
        for f in ("probe.json", "probe.csv", "probe.png", "probe.md"):
            print(out / f)
    return 0


def _write_probe_csv(results, path) -> None:
    import csv

    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["model", "seed", "split", "step", "loss"])
        for r in results:
            for i, v in enumerate(r["train_loss"], start=1):
                w.writerow([r["model"], r["seed"], "train", i, v])
            for s, v in zip(r["eval_steps"], r["eval_loss"]):
                w.writerow([r["model"], r["seed"], "eval", s, v])


def _plot_probe(results, path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    models = list(dict.fromkeys(r["model"] for r in results))
    colors = {m: f"C{i % 10}" for i, m in enumerate(models)}
    labelled: set[str] = set()
    for r in results:
        lab = r["model"] if r["model"] not in labelled else None
        labelled.add(r["model"])
        axes[0].plot(
            r["eval_steps"], r["eval_loss"], marker="o", markersize=3, color=colors[r["model"]], label=lab
        )
        axes[1].plot(range(1, len(r["train_loss"]) + 1), r["train_loss"], color=colors[r["model"]], alpha=0.7)
    axes[0].set_title("probe: held-out loss", fontsize=9)
    axes[1].set_title("probe: training loss", fontsize=9)
    for ax in axes:
        ax.set_xlabel("LoRA step", fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _write_probe_md(results, meta, path) -> None:
    lines = ["# supple probe", ""]
    lines += [f"- {k}: `{v}`" for k, v in meta.items()]
    lines += [
        "",
        "Held-out loss of the probe task before (start) and after (final) training a fresh LoRA; "
        "area = mean held-out loss over training (lower = learns faster).",
        "",
        "| model | seed | start | final | improvement | relative | area |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['model']} | {r['seed']} | {r['start_loss']:.4f} | {r['final_loss']:.4f} | "
            f"{r['improvement']:.4f} | {r['relative_improvement']:.3f} | {r['area']:.4f} |"
        )
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
