"""The `mergemix-pipeline` command line.

Each command parses its flags, calls into pipeline/ or stages/, and turns user mistakes
(`UserError`) into one readable line and a non-zero exit code instead of a traceback.
"""
from __future__ import annotations

import sys
from functools import wraps

import typer

from stages.errors import UserError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts are plain: "[288]" is a default, not a style tag
    help="Generate MergeMix preference shards for vision-language models, and inspect, check and train on them.",
)


def user_errors(fn):
    """Report UserError as `error: ...` on stderr with exit code 2."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(code=2) from None
        except KeyboardInterrupt:
            typer.echo("interrupted: committed shards are kept; run the same command again to resume", err=True)
            raise typer.Exit(code=130) from None

    return wrapper


# --- commands are registered below, one section per command --------------------------


# --- generate ----------------------------------------------------------------------------


def _default(name: str) -> str:
    """A GenerateConfig default as --help shows it: the defaults live in the dataclass only."""
    from dataclasses import fields

    from pipeline.config import GenerateConfig

    value = next(f.default for f in fields(GenerateConfig) if f.name == name)
    return {True: "on", False: "off"}.get(value, str(value)) if isinstance(value, bool) else str(value)


def _opt(name: str, help: str, *decls: str, default: str | None = None):
    """A generate flag: None unless given (so YAML < flags), its help ending with the default."""
    shown = default if default is not None else _default(name)
    return typer.Option(None, *decls, help=f"{help} [{shown}]" if shown not in ("", "None") else help)


def _choices(values) -> str:
    return " | ".join(values)


from pipeline.config import (  # noqa: E402
    IMAGE_FORMATS, IMAGE_OPS, LAM_MODES, MERGE_SCHEDULES, METHODS, PRECISION_NAMES, RESIZE_MODES,
)


@app.command()
@user_errors
def generate(
    input: str = _opt("input", "LLaVA .json, image folder, webdataset tars (file, glob, {a..b}, folder) or .jsonl/.parquet manifest", "--input", "-i"),
    output: str = _opt("output", "output directory for shards/, run.json, index.json", "--output", "-o"),
    image_root: str = _opt("image_root", "directory the input's image paths are relative to (paths may not leave it)",
                           default="next to the JSON/JSONL/Parquet file; the folder itself"),
    folder_labels: bool = _opt("folder_labels", "image folder: class subfolders become labels", "--folder-labels/--no-folder-labels"),
    model: str = _opt("model", "open_clip model name, model-config JSON, or hf-hub:ORG/REPO"),
    pretrained: str = _opt("pretrained", "open_clip tag, checkpoint PATH, or none (random weights)",
                           default=f"{_default('pretrained')}; hf-hub: the repo's"),
    quick_gelu: bool = _opt("quick_gelu", "a checkpoint trained with QuickGELU MLPs", "--quick-gelu/--no-quick-gelu",
                            default="tag / model config"),
    mean: str = _opt("mean", "R,G,B mean a checkpoint was trained with", default="tag / config preprocess_cfg / OpenAI"),
    std: str = _opt("std", "R,G,B std a checkpoint was trained with", default="tag / config preprocess_cfg / OpenAI"),
    merge: int = _opt("merge", "tokens removed by merging before the saliency layer, R"),
    attn_layer: int = _opt("attn_layer", "block whose CLS attention is the saliency; negative counts from the end"),
    prop_attn: bool = _opt("prop_attn", "proportional attention on merged tokens", "--prop-attn/--no-prop-attn"),
    merge_schedule: str = _opt("merge_schedule", _choices(MERGE_SCHEDULES)),
    method: str = _opt("method", _choices(METHODS)),
    lam: str = _opt("lam", "beta:ALPHA | uniform:A,B | fixed:V"),
    lam_mode: str = _opt("lam_mode", _choices(LAM_MODES)),
    resize: str = _opt("resize", _choices(RESIZE_MODES)),
    image_format: str = _opt("image_format", f"{_choices(IMAGE_FORMATS)} (png and webp are lossless)"),
    jpeg_quality: int = _opt("jpeg_quality", "JPEG quality"),
    precision: str = _opt("precision", f"autocast dtype on CUDA: {_choices(PRECISION_NAMES)}"),
    seed: int = _opt("seed", "run seed; per-sample draws use (seed, key)"),
    workers: int = _opt("workers", "encoder actors", default="one per GPU, else one per 2 CPUs"),
    batch_size: int = _opt("batch_size", "images per encoder forward"),
    samples_per_shard: int = _opt("samples_per_shard", "inputs per work unit = per shard"),
    device: str = _opt("device", "auto | cpu | cuda"),
    image_ops: str = _opt("image_ops", f"{_choices(IMAGE_OPS)}: decode and fit images in CPU tasks (pil) or in the "
                          "encoder actor on its device (torch: nvJPEG on CUDA); auto: torch on CUDA, else pil"),
    device_encode: bool = _opt("device_encode", "torch image ops: JPEG-encode winners and losers in the encoder actor "
                               "(nvJPEG on CUDA); write tasks only pack them", "--device-encode/--no-device-encode"),
    compile: bool = _opt("compile", "torch.compile the encoder's blocks", "--compile/--no-compile"),
    address: str = _opt("address", "Ray cluster address", default="RAY_ADDRESS, else a local Ray"),
    unit_timeout: float = _opt("unit_timeout", "seconds a unit may go without progress before it is cancelled and retried"),
    overwrite: bool = _opt("overwrite", "replace output written with another configuration", "--overwrite"),
    progress: bool = _opt("progress", "show the progress bar", "--progress/--no-progress"),
    config: str = _opt("config", "YAML file with the same keys as these flags", "--config"),
):
    """Generate MergeMix winner/loser preference shards on Ray."""
    import json

    from pipeline.config import GenerateConfig
    from pipeline.run import generate as run_generate

    flags = {k: v for k, v in locals().items() if k not in ("json", "GenerateConfig", "run_generate")}
    cfg = GenerateConfig.build(flags)
    typer.echo("effective config: " + json.dumps(cfg.output_keys() | {"workers": cfg.workers, "batch_size": cfg.batch_size}, sort_keys=True), err=True)
    result = run_generate(cfg)
    _print_summary(result)
    if not result.ok:
        raise typer.Exit(code=1)


def _print_summary(result) -> None:
    counts = result.counts
    done = sum(counts.values())
    rate = done / result.seconds if result.seconds else 0.0
    lines = [
        ("output", str(result.out_dir)),
        ("fingerprint", result.fingerprint),
        ("tower", result.tower.removeprefix("tower ")),
        ("units", f"{result.units_written} written, {result.units_skipped} already committed, "
                  f"{len(result.failed_units)} failed, {result.units_total} planned"),
        ("inputs this run", f"{done}: {counts['ok']} ok, {counts['failed']} failed, {counts['skipped']} skipped"),
        ("time", f"{result.seconds:.1f} s ({rate:.1f} inputs/s)"),
    ]
    for unit, error in sorted(result.failed_units.items()):
        lines.append((f"failed unit {unit}", error))
    width = max(len(k) for k, _ in lines)
    for k, v in lines:
        typer.echo(f"{k:<{width}}  {v}")


# --- sample-data ---------------------------------------------------------------------------


@app.command("sample-data")
@user_errors
def sample_data(
    directory: str = typer.Argument(..., help="where to write llava.json and images/"),
    n: int = typer.Option(64, "--n", help="number of samples"),
    seed: int = typer.Option(0, help="seed for the generated images"),
):
    """Write a small LLaVA-format demo set (generated images, questions, answers)."""
    from stages.sample_data import write_sample_data

    path = write_sample_data(directory, n=n, seed=seed)
    typer.echo(f"wrote {n} samples: {path} (images under {path.parent / 'images'})")


# --- inspect -------------------------------------------------------------------------------


@app.command("inspect")
@user_errors
def inspect_cmd(out: str = typer.Argument(..., help="output directory of `generate`")):
    """Counts per status and failure reason, lam / lam_hat / margin histograms, methods, model, config."""
    from stages.report import inspect_output

    typer.echo(inspect_output(out))


# --- validate ------------------------------------------------------------------------------


@app.command("validate")
@user_errors
def validate_cmd(out: str = typer.Argument(..., help="output directory of `generate`")):
    """Check every committed unit: tar members against parquet rows and hashes, completeness,
    unique keys, index.json and run.json. Lists every problem; exit code 1 if any."""
    from stages.validate import validate_output

    problems = validate_output(out)
    for line in problems:
        typer.echo(line)
    if problems:
        typer.echo(f"{len(problems)} problem(s) in {out}", err=True)
        raise typer.Exit(code=1)
    typer.echo(f"ok: {out} is valid")


# --- preview -------------------------------------------------------------------------------


@app.command("preview")
@user_errors
def preview_cmd(
    out: str = typer.Argument(..., help="output directory of `generate`"),
    n: int = typer.Option(16, "--n", help="number of pairs (rows)"),
    output: str = typer.Option("preview.png", "--output", "-o", help="PNG file to write"),
):
    """Contact sheet PNG: winner, loser, mask overlay (and saliency) with key, lam, lam_hat, margin."""
    from pathlib import Path

    from stages.preview import make_contact_sheet

    path = make_contact_sheet(Path(out), n, Path(output))
    typer.echo(f"wrote {path}")


# --- train ---------------------------------------------------------------------------------


@app.command("train")
@user_errors
def train_cmd(
    shards: str = typer.Argument(..., help="output directory of `generate` (or its shards/ folder, or a .tar)"),
    output: str = typer.Option(..., "--output", "-o", help="run folder: log.jsonl, checkpoint.pt, train_config.json"),
    model: str = typer.Option("toy", help="model adapter: toy | llava-hf"),
    model_path: str = typer.Option(None, "--model-path", help="llava-hf: model folder or hub id; toy: open_clip config JSON"),
    model_dtype: str = typer.Option("fp32", "--model-dtype", help="llava-hf weight dtype: fp32 | bf16"),
    gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing", help="llava-hf: trade compute for memory"),
    steps: int = typer.Option(100, help="optimizer steps in total (a resumed run continues up to this)"),
    batch_size: int = typer.Option(8, "--batch-size", help="pairs per micro-batch"),
    grad_accum: int = typer.Option(1, "--grad-accum", help="micro-batches per optimizer step"),
    lr: float = typer.Option(1e-4, help="peak learning rate (AdamW)"),
    weight_decay: float = typer.Option(0.0, "--weight-decay"),
    warmup: int = typer.Option(10, help="linear warm-up steps before the cosine decay"),
    max_grad_norm: float = typer.Option(1.0, "--max-grad-norm", help="gradient clipping; 0 = off"),
    log_every: int = typer.Option(10, "--log-every", help="steps between log lines"),
    save_every: int = typer.Option(0, "--save-every", help="steps between checkpoints; 0 = at the end only"),
    beta: float = typer.Option(1.0, help="SimPO beta"),
    sft_weight: float = typer.Option(0.5, "--sft-weight", help="weight of the SFT loss"),
    pref_weight: float = typer.Option(0.5, "--pref-weight", help="weight of the mixed SimPO loss"),
    two_sided: bool = typer.Option(False, "--two-sided", help="gradients through the loser too (default: stop-gradient)"),
    margin_from: str = typer.Option("lam_hat", "--margin-from", help="SimPO margin 1 - lam_hat (stored) or 1 - lam"),
    seed: int = typer.Option(0),
    num_workers: int = typer.Option(0, "--num-workers", help="DataLoader workers"),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N"),
    resume: bool = typer.Option(False, "--resume", help="continue the run in --output from its checkpoint"),
    allow_partial: bool = typer.Option(False, "--allow-partial", help="train on the units committed now of an unfinished output (a fixed set, announced)"),
):
    """Train a model on the shards with SFT + mixed SimPO (docs/METHOD.md section 5)."""
    from stages.train import TrainConfig, train

    result = train(TrainConfig(
        shards=shards, output=output, model=model, model_path=model_path, model_dtype=model_dtype,
        gradient_checkpointing=gradient_checkpointing, steps=steps, batch_size=batch_size, grad_accum=grad_accum, lr=lr,
        weight_decay=weight_decay, warmup=warmup, max_grad_norm=max_grad_norm, log_every=log_every, save_every=save_every,
        beta=beta, sft_weight=sft_weight, pref_weight=pref_weight, two_sided=two_sided, margin_from=margin_from, seed=seed,
        num_workers=num_workers, device=device, resume=resume, allow_partial=allow_partial,
    ), echo=typer.echo)
    typer.echo(f"done: step {result['step']}, run folder {result['output']}")


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
