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


@app.command()
@user_errors
def generate(
    input: str = typer.Option(None, "--input", "-i", help="LLaVA .json, image folder, webdataset tars (file, glob, {a..b}, folder) or .jsonl/.parquet manifest"),
    output: str = typer.Option(None, "--output", "-o", help="output directory for shards/, run.json, index.json"),
    image_root: str = typer.Option(None, help="directory the input's image paths are relative to (paths may not leave it)"),
    folder_labels: bool = typer.Option(None, "--folder-labels/--no-folder-labels", help="image folder: class subfolders become labels"),
    model: str = typer.Option(None, help="open_clip model name or model-config JSON [ViT-L-14-336]"),
    pretrained: str = typer.Option(None, help="open_clip tag, checkpoint PATH, or none (random weights) [openai]"),
    merge: int = typer.Option(None, help="tokens removed by merging before the saliency layer, R [288]"),
    attn_layer: int = typer.Option(None, help="block whose CLS attention is the saliency; negative counts from the end [-2]"),
    prop_attn: bool = typer.Option(None, "--prop-attn/--no-prop-attn", help="proportional attention on merged tokens [off]"),
    merge_schedule: str = typer.Option(None, help="constant | decreasing [constant]"),
    method: str = typer.Option(None, help="mergemix | mergemix-official | mergemix-r | topk | random | mixup | cutmix | resizemix | blur [mergemix]"),
    lam: str = typer.Option(None, help="beta:ALPHA | uniform:A,B | fixed:V [beta:1.0]"),
    lam_mode: str = typer.Option(None, help="area | paper | fixed [area]"),
    resize: str = typer.Option(None, help="pad | center-crop | squash [pad]"),
    image_format: str = typer.Option(None, help="jpg | png | webp (png and webp are lossless) [jpg]"),
    jpeg_quality: int = typer.Option(None, help="JPEG quality [95]"),
    precision: str = typer.Option(None, help="autocast dtype on CUDA: bf16 | fp16 | fp32 [bf16]"),
    seed: int = typer.Option(None, help="run seed; per-sample draws use (seed, key) [0]"),
    workers: int = typer.Option(None, help="encoder actors [one per GPU, else one per 2 CPUs]"),
    batch_size: int = typer.Option(None, help="images per encoder forward [64]"),
    samples_per_shard: int = typer.Option(None, help="inputs per work unit = per shard [1000]"),
    device: str = typer.Option(None, help="auto | cpu | cuda [auto]"),
    address: str = typer.Option(None, help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)"),
    unit_timeout: float = typer.Option(None, help="seconds a unit may go without progress before it is cancelled and retried [3600]"),
    overwrite: bool = typer.Option(None, "--overwrite", help="replace output written with another configuration"),
    progress: bool = typer.Option(None, "--progress/--no-progress", help="show the progress bar [on]"),
    config: str = typer.Option(None, "--config", help="YAML file with the same keys as these flags"),
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
    from stages.shardcheck import inspect_output

    typer.echo(inspect_output(out))


# --- validate ------------------------------------------------------------------------------


@app.command("validate")
@user_errors
def validate_cmd(out: str = typer.Argument(..., help="output directory of `generate`")):
    """Check every committed unit: tar members against parquet rows and hashes, completeness,
    unique keys, index.json and run.json. Lists every problem; exit code 1 if any."""
    from stages.shardcheck import validate_output

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
    max_length: int = typer.Option(2048, "--max-length", help="tokens kept per sequence, image tokens included (LLaVA-1.5: 2048); 0 = no cut"),
    text_only_rows: bool = typer.Option(False, "--text-only-rows", help="also train on the text-only rows of the Parquet metadata (skipped: no_image), SFT only"),
    num_workers: int = typer.Option(0, "--num-workers", help="DataLoader workers (may change on --resume: the batch order does not depend on it)"),
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
        max_length=max_length or None, text_only_rows=text_only_rows, num_workers=num_workers, device=device, resume=resume, allow_partial=allow_partial,
    ), echo=typer.echo)
    typer.echo(f"done: step {result['step']}, run folder {result['output']}")


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
