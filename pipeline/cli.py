"""The `mergemix-pipeline` command line.

Each command parses its flags, calls into pipeline/ or stages/, and turns user mistakes
(`UserError`) into one readable line and a non-zero exit code instead of a traceback.
"""
from __future__ import annotations

import sys
from functools import wraps
from pathlib import Path

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


def _print_version(value: bool) -> None:
    if value:
        from pipeline.distribution import DISTRIBUTION, version

        typer.echo(f"{DISTRIBUTION} {version()}")
        raise typer.Exit()


@app.callback()
def _options(version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                          help="print the installed version and exit")) -> None:
    """Generate MergeMix preference shards for vision-language models, and inspect, check and train on them."""


# --- commands are registered below, one section per command --------------------------


# --- generate ----------------------------------------------------------------------------


OUT_HELP = "output of `generate`: a directory or an object-store URL (s3://bucket/out)"
STORAGE_HELP = "JSON object of fsspec options for URLs (endpoint, credentials); never written anywhere"


def _default(name: str, config=None) -> str:
    """A config default as --help shows it: the defaults live in the dataclass only
    (GenerateConfig unless `config` is given)."""
    from dataclasses import MISSING, fields

    from pipeline.config import GenerateConfig

    f = next(f for f in fields(config or GenerateConfig) if f.name == name)
    value = f.default_factory() if f.default is MISSING else f.default
    if isinstance(value, list):
        return ",".join(f"{v:g}" for v in value)
    return {True: "on", False: "off"}.get(value, str(value)) if isinstance(value, bool) else str(value)


def _opt(name: str, help: str, *decls: str, default: str | None = None):
    """A generate flag: None unless given (so YAML < flags), its help ending with the default."""
    shown = default if default is not None else _default(name)
    return typer.Option(None, *decls, help=f"{help} [{shown}]" if shown not in ("", "None") else help)


def _choices(values) -> str:
    return " | ".join(values)


from pipeline.config import (  # noqa: E402
    IMAGE_FORMATS, IMAGE_OPS, LAM_MODES, METHODS, PRECISION_NAMES, RESIZE_MODES, SCHEDULES,
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
    attn_layer: str = _opt("attn_layer", "block whose CLS attention is the saliency; negative counts from the end; "
                           "auto: the block saliency-check ranks first on a sample of the input"),
    prop_attn: bool = _opt("prop_attn", "proportional attention on merged tokens", "--prop-attn/--no-prop-attn"),
    merge_schedule: str = _opt("merge_schedule", _choices(SCHEDULES)),
    method: str = _opt("method", _choices(METHODS)),
    crop_area: str = _opt("crop_area", "crop: range A,B of the box's share of the image (mDPO)", "--crop-area"),
    noise_step: int = _opt("noise_step", "noise: diffusion step t in 0..999 (POVID, SeVa, CHiP 500; BPO 900)", "--noise-step"),
    noise_space: str = _opt("noise_space", "noise: pixel (RGB in [0, 1], POVID) | normalized (the tower's, SeVa/BPO/CHiP)",
                            "--noise-space"),
    pixelate: int = _opt("pixelate", "pixelate: block side k (Image-DPO: 16 or 32)", "--pixelate"),
    blur_radius: str = _opt("blur_radius", "image-blur: Gaussian sigma in pixels, or A,B for U{A..B} per sample",
                            "--blur-radius"),
    rotate_degrees: str = _opt("rotate_degrees", "rotate: range A,B of the angle in degrees (CHiP)", "--rotate-degrees"),
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
    storage_options: str = _opt("storage_options", STORAGE_HELP, "--storage-options", default=""),
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


sample_data = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                          help="Write a small data set to try the pipeline on: demo pictures, or scenes with known object masks.")
app.add_typer(sample_data, name="sample-data")


@sample_data.command("demo")
@user_errors
def sample_demo(
    directory: str = typer.Argument("demo", help="where to write llava.json and images/"),
    n: int = typer.Option(64, "--n", help="number of samples"),
    seed: int = typer.Option(0, help="seed for the generated images"),
):
    """A small LLaVA-format demo set (generated pictures, questions, answers)."""
    from stages.samples.demo import write_sample_data

    path = write_sample_data(directory, n=n, seed=seed)
    typer.echo(f"wrote {n} samples: {path} (images under {path.parent / 'images'})")


@sample_data.command("scenes")
@user_errors
def sample_scenes(
    directory: str = typer.Argument("scenes", help="where to write the images, masks/ and scenes.json"),
    n: int = typer.Option(256, "--n", help="number of scenes"),
    seed: int = typer.Option(0, help="seed of the scenes (the checked-in scene tower was trained on seed 100: use another to hold out)"),
    size: int = typer.Option(112, help="image side in pixels"),
    layout: str = typer.Option("llava", help="llava (llava.json + images/) | folder (images/<class>/, for --folder-labels)"),
):
    """Scenes of one coloured shape on grey clutter, each with its pixel-exact object mask
    (masks/ID.png) and ground truth (scenes.json): the data the trained scene tower knows and
    saliency-check and bench/saliency.py measure masks against."""
    from stages.samples.scenes import LAYOUTS, write_scenes

    if layout not in LAYOUTS:
        raise UserError(f"--layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if n < 1 or size < 28:
        raise UserError(f"--n must be >= 1 and --size >= 28, got {n} and {size}")
    path = write_scenes(directory, n=n, seed=seed, size=size, layout=layout)
    hint = f"--input {path} --folder-labels" if layout == "folder" else f"--input {path}"
    typer.echo(f"wrote {n} scenes with object masks under {Path(directory) / 'masks'}: {hint}")


# --- saliency-check --------------------------------------------------------------------------


@app.command("saliency-check")
@user_errors
def saliency_check_cmd(
    input: str = typer.Option(..., "--input", "-i", help="the images to check on, any input kind generate reads"),
    image_root: str = typer.Option(None, "--image-root", help="as generate's"),
    folder_labels: bool = typer.Option(False, "--folder-labels/--no-folder-labels", help="as generate's"),
    model: str = typer.Option(_default("model"), help="as generate's"),
    pretrained: str = typer.Option(None, help=f"as generate's [{_default('pretrained')}]"),
    quick_gelu: bool = typer.Option(None, "--quick-gelu/--no-quick-gelu", help="as generate's"),
    mean: str = typer.Option(None, help="as generate's"),
    std: str = typer.Option(None, help="as generate's"),
    merge: int = typer.Option(int(_default("merge")), help="R as generate's (each block gets what its earlier blocks allow)"),
    prop_attn: bool = typer.Option(False, "--prop-attn/--no-prop-attn", help="as generate's"),
    merge_schedule: str = typer.Option(_default("merge_schedule"), help=_choices(SCHEDULES)),
    resize: str = typer.Option(_default("resize"), help=_choices(RESIZE_MODES)),
    n: int = typer.Option(256, "--n", help="images checked: the first N of the input that decode"),
    lam: float = typer.Option(0.3, help="share of patches in the salient part"),
    seed: int = typer.Option(0, help="seed of the random baseline's patches"),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    json_out: str = typer.Option(None, "--json", help="also write the scores to this JSON file"),
    storage_options: str = typer.Option(None, "--storage-options", help=STORAGE_HELP),
):
    """Rank the tower's blocks by how well their CLS attention finds what its image embedding rests
    on, on your own images, without labels; flags a tower whose saliency is no better than random."""
    import json

    from pipeline.config import GenerateConfig, parse_storage_options
    from stages.model.saliency_check import run_check

    # The tower flags are checked as generate checks them (a wrong mean, an unknown schedule: one line).
    cfg = GenerateConfig.build({"input": input, "output": "-", "model": model, "pretrained": pretrained,
                                "quick_gelu": quick_gelu, "mean": mean, "std": std, "merge": merge,
                                "prop_attn": prop_attn, "merge_schedule": merge_schedule, "resize": resize,
                                "image_root": image_root, "device": device})
    options = parse_storage_options(storage_options) if storage_options else None
    result = run_check(cfg.model, cfg.pretrained, source=input, image_root=image_root, folder_labels=folder_labels,
                       resize=resize, storage_options=options, quick_gelu=cfg.quick_gelu, mean=cfg.mean, std=cfg.std,
                       merge=merge, prop_attn=prop_attn, schedule=merge_schedule, n=n, lam=lam, seed=seed,
                       device=device, echo=lambda line: typer.echo(line, err=True))
    typer.echo(result.table())
    if json_out:
        Path(json_out).write_text(json.dumps(result.to_json(), indent=1) + "\n")
        typer.echo(f"wrote {json_out}")


# --- inspect -------------------------------------------------------------------------------


def _storage_options(text: str | None) -> dict | None:
    from pipeline.config import parse_storage_options

    return parse_storage_options(text) if text else None


@app.command("inspect")
@user_errors
def inspect_cmd(
    out: str = typer.Argument(..., help=OUT_HELP),
    plot: str = typer.Option(None, "--plot", help="also draw FILE.png: lam / lam_hat / margin histograms, "
                             "failures by reason, kept area against lam, mean saliency map (needs matplotlib)"),
    storage_options: str = typer.Option(None, "--storage-options", help=STORAGE_HELP),
):
    """Counts per status and failure reason, lam / lam_hat / margin histograms, methods, model, config."""
    from stages.readers.inspect import inspect_output

    options = _storage_options(storage_options)
    typer.echo(inspect_output(out, options))
    if plot:
        from stages.readers.plot import plot_output

        typer.echo(f"wrote {plot_output(out, plot, options)}")


# --- validate ------------------------------------------------------------------------------


@app.command("validate")
@user_errors
def validate_cmd(
    out: str = typer.Argument(..., help=OUT_HELP),
    storage_options: str = typer.Option(None, "--storage-options", help=STORAGE_HELP),
):
    """Check every committed unit: tar members against parquet rows and hashes, completeness,
    unique keys, index.json and run.json. Lists every problem; exit code 1 if any."""
    from stages.readers.validate import validate_output

    problems = validate_output(out, _storage_options(storage_options))
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
    out: str = typer.Argument(..., help=OUT_HELP),
    n: int = typer.Option(16, "--n", help="number of pairs (rows)"),
    output: str = typer.Option("preview.png", "--output", "-o", help="PNG file to write"),
    storage_options: str = typer.Option(None, "--storage-options", help=STORAGE_HELP),
):
    """Contact sheet PNG: winner, loser, mask overlay (and saliency) with key, lam, lam_hat, margin."""
    from pathlib import Path

    from stages.readers.preview import make_contact_sheet

    path = make_contact_sheet(out, n, Path(output), _storage_options(storage_options))
    typer.echo(f"wrote {path}")


# --- export --------------------------------------------------------------------------------


@app.command("export")
@user_errors
def export_cmd(
    out: str = typer.Argument(..., help=OUT_HELP),
    dest: str = typer.Argument(..., help="new (or empty) local folder to write the export to"),
    to: str = typer.Option(..., "--to", help="swift (ms-swift JSONL) | hf (datasets: save_to_disk + Parquet) | llava (LLaVA JSON)"),
    allow_partial: bool = typer.Option(False, "--allow-partial", help="export the units committed now of an unfinished output"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="show the progress bar"),
    storage_options: str = typer.Option(None, "--storage-options", help=STORAGE_HELP),
):
    """Write the pairs in the layout of another trainer: ms-swift, Hugging Face datasets / TRL, LLaVA."""
    from stages.export.exporter import export

    result = export(out, dest, to, storage_options=_storage_options(storage_options), allow_partial=allow_partial,
                    progress=progress, echo=lambda line: typer.echo(line, err=True))
    typer.echo(f"exported {result.pairs} pairs of {result.units} units to {result.dest} ({result.to}); "
               f"how to train on them: {result.dest / 'README.md'}")


# --- train ---------------------------------------------------------------------------------


def _train_opt(name: str, help: str, *decls: str):
    """A train flag: None unless given, its help ending with TrainConfig's default."""
    from stages.training.config import TrainConfig

    return _opt(name, help, *decls, default=_default(name, TrainConfig))


@app.command("train")
@user_errors
def train_cmd(
    shards: str = typer.Argument(..., help="output directory of `generate` (or its shards/ folder, or a .tar)"),
    output: str = typer.Option(..., "--output", "-o", help="run folder: log.jsonl, checkpoint.pt, train_config.json"),
    model: str = _train_opt("model", "model adapter: toy | llava-hf"),
    model_path: str = _train_opt("model_path", "llava-hf: model folder or hub id; toy: open_clip config JSON", "--model-path"),
    model_dtype: str = _train_opt("model_dtype", "llava-hf weight dtype: fp32 | bf16", "--model-dtype"),
    gradient_checkpointing: bool = _train_opt("gradient_checkpointing", "llava-hf: trade compute for memory", "--gradient-checkpointing"),
    steps: int = _train_opt("steps", "optimizer steps in total (a resumed run continues up to this)"),
    batch_size: int = _train_opt("batch_size", "pairs per micro-batch", "--batch-size"),
    grad_accum: int = _train_opt("grad_accum", "micro-batches per optimizer step", "--grad-accum"),
    lr: float = _train_opt("lr", "peak learning rate (AdamW)"),
    weight_decay: float = _train_opt("weight_decay", "AdamW weight decay", "--weight-decay"),
    warmup: int = _train_opt("warmup", "linear warm-up steps before the cosine decay"),
    max_grad_norm: float = _train_opt("max_grad_norm", "gradient clipping; 0 = off", "--max-grad-norm"),
    log_every: int = _train_opt("log_every", "steps between log lines", "--log-every"),
    save_every: int = _train_opt("save_every", "steps between checkpoints; 0 = at the end only", "--save-every"),
    beta: float = _train_opt("beta", "SimPO beta"),
    sft_weight: float = _train_opt("sft_weight", "weight of the SFT loss", "--sft-weight"),
    pref_weight: float = _train_opt("pref_weight", "weight of the mixed SimPO loss", "--pref-weight"),
    two_sided: bool = _train_opt("two_sided", "gradients through the loser too (default: stop-gradient)", "--two-sided"),
    margin_from: str = _train_opt("margin_from", "SimPO margin 1 - lam_hat (stored) or 1 - lam", "--margin-from"),
    seed: int = _train_opt("seed", "seed of the shard order and the model's initialisation"),
    max_length: int = _train_opt("max_length", "tokens kept per sequence, image tokens included (LLaVA-1.5: 2048); 0 = no cut", "--max-length"),
    text_only_rows: bool = _train_opt("text_only_rows", "also train on the text-only rows of the Parquet metadata (skipped: no_image), SFT only", "--text-only-rows"),
    num_workers: int = _train_opt("num_workers", "DataLoader workers (may change on --resume: the batch order does not depend on it)", "--num-workers"),
    device: str = _train_opt("device", "auto | cpu | cuda | cuda:N"),
    resume: bool = _train_opt("resume", "continue the run in --output from its checkpoint", "--resume"),
    allow_partial: bool = _train_opt("allow_partial", "train on the units committed now of an unfinished output (a fixed set, announced)", "--allow-partial"),
    storage_options: str = typer.Option(None, "--storage-options", help=STORAGE_HELP),
):
    """Train a model on the shards with SFT + mixed SimPO (docs/METHOD.md section 5)."""
    flags = dict(locals())  # first: the flags only
    from stages.training.config import TrainConfig
    from stages.training.train import train

    given = {name: value for name, value in flags.items() if name not in ("shards", "output", "storage_options") and value is not None}
    if given.get("max_length") == 0:
        given["max_length"] = None  # 0 on the command line: no cut
    cfg = TrainConfig(shards=shards, output=output, storage_options=_storage_options(storage_options), **given)
    result = train(cfg, echo=typer.echo)
    typer.echo(f"done: step {result['step']}, run folder {result['output']}")


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
