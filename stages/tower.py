"""Which network computes the saliency, with which settings: resolved from configs, before anything is built.

A `Tower` says what open_clip builds (model config, activation) and how its input is
prepared (mean/std, interpolation, pad colour). The settings follow the weights:

- a pretrained tag (`--pretrained openai`): the tag's own config, as open_clip's
  `-quickgelu` model names apply it. open_clip's `create_model(name, pretrained=TAG)` merges
  the tag's mean/std but only warns when the tag was trained with QuickGELU; here the tag's
  activation is applied too. Flags that contradict a tag are refused.
- an `hf-hub:ORG/REPO` model: the repo's open_clip_config.json (model_cfg + preprocess_cfg),
  its weights from the repo, as open_clip's own `hf-hub:` syntax.
- a local checkpoint (`--pretrained PATH`) or random weights: `--quick-gelu/--no-quick-gelu`
  and `--mean/--std` when given, else a config JSON's `preprocess_cfg`, else the model
  config's activation (the `-quickgelu` names set it) and open_clip's OpenAI constants.

`resolve_tower` reads configs only (no weights, no building), so the driver can refuse a
tower the method cannot serve, and print what will run, before any worker starts.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import socket
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from stages.errors import UserError, one_line

log = logging.getLogger(__name__)

HF_HUB_PREFIX = "hf-hub:"  # open_clip's syntax for a model whose config and weights live in a hub repo
HF_REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
INTERPOLATIONS = ("bicubic", "bilinear")  # what open_clip's tags use; our resize supports both
# open_clip's default constants (OPENAI_DATASET_MEAN/STD), without importing open_clip here.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class Tower:
    """What computes the saliency. Plain values: cheap to pickle to Ray actors and tasks."""

    model: str  # as the user gave it: open_clip name, model-config JSON path, or hf-hub:ORG/REPO
    name: str  # the name open_clip builds (a built-in name, or the registered config)
    weights: str | None  # pretrained tag, checkpoint path, the hf-hub model itself, or None (random)
    quick_gelu: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    image_size: tuple[int, int]
    patch_size: tuple[int, int]
    settings_from: str  # where activation and constants come from, for the driver's line
    layers: int = 12  # transformer blocks of the vision tower

    @property
    def num_patches(self) -> int:
        return (self.image_size[0] // self.patch_size[0]) * (self.image_size[1] // self.patch_size[1])

    @property
    def activation(self) -> str:
        return "QuickGELU" if self.quick_gelu else "GELU"

    @property
    def pad_rgb(self) -> tuple[int, int, int]:
        """The pad and transparency colour: the tower's mean as LLaVA pads (int(255 * mean), truncated)."""
        return tuple(int(255 * m) for m in self.mean)

    def describe(self) -> dict:
        """The settings that shape the output: in the fingerprint, run.json and every row."""
        return {"activation": self.activation, "norm_mean": list(self.mean), "norm_std": list(self.std),
                "interpolation": self.interpolation}

    def summary(self) -> str:
        """One line for the driver: the tower, its weights, activation and constants."""
        weights = "random weights (--pretrained none)" if self.weights is None else f"weights {self.weights}"
        fmt = lambda v: "(" + ", ".join(f"{x:.8g}" for x in v) + ")"  # noqa: E731
        return (f"tower {self.model}, {weights}: activation {self.activation}, mean {fmt(self.mean)}, "
                f"std {fmt(self.std)}, {self.interpolation} resize, pad colour {self.pad_rgb} [{self.settings_from}]")


# --- reading configs ---------------------------------------------------------------------


def parse_hf_hub(model: str) -> str | None:
    """'hf-hub:ORG/REPO' -> 'ORG/REPO'; None for any other model string."""
    if not model.startswith(HF_HUB_PREFIX):
        return None
    repo = model[len(HF_HUB_PREFIX):]
    if not HF_REPO_RE.match(repo) or len(repo) > 96 or ".." in repo:
        raise UserError(f"--model {model!r}: write hf-hub:ORG/REPO, e.g. hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K")
    return repo


def parse_triple(value, name: str, positive: bool = False) -> tuple[float, float, float] | None:
    """Three finite floats from "a,b,c" or a sequence (per RGB channel); None passes through."""
    if value is None:
        return None
    parts = value.split(",") if isinstance(value, str) else value
    try:
        floats = tuple(float(v) for v in parts)
    except (TypeError, ValueError):
        floats = ()
    if len(floats) != 3 or not all(math.isfinite(v) for v in floats) or (positive and min(floats) <= 0):
        need = "three positive numbers" if positive else "three numbers"
        raise UserError(f"{name} needs {need}, one per RGB channel (e.g. 0.5,0.5,0.5), got {value!r}")
    return floats


def _read_config_json(path: Path) -> tuple[dict, dict]:
    """(model_cfg, preprocess_cfg) from a model-config JSON: a plain open_clip model config
    (optionally with a "preprocess_cfg" key), or open_clip's open_clip_config.json layout
    {"model_cfg": ..., "preprocess_cfg": ...} as hub repos and `local-dir:` folders hold it."""
    if not path.is_file():
        raise UserError(f"model config {path} not found")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"model config {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"model config {path} must be a JSON object")
    model_cfg = data.get("model_cfg", data)
    preprocess = data.get("preprocess_cfg") or {}
    if not isinstance(model_cfg, dict) or not all(k in model_cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
        raise UserError(f"model config {path} needs embed_dim, vision_cfg and text_cfg (an open_clip model config)")
    if not isinstance(preprocess, dict):
        raise UserError(f"model config {path}: preprocess_cfg must be an object")
    return {k: v for k, v in model_cfg.items() if k != "preprocess_cfg"}, preprocess


def _register(name: str, model_cfg: dict, open_clip, path: Path | None = None) -> None:
    """Register `model_cfg` with open_clip under `name`: from `path` when that file is exactly
    the config; otherwise (open_clip reads configs from files only) through a temporary file,
    which open_clip reads at once and keeps in memory."""
    if open_clip.get_model_config(name) == model_cfg:
        return
    if path is not None:
        open_clip.add_model_config(path)
        return
    with tempfile.TemporaryDirectory(prefix="mergemix-model-") as tmp:
        path = Path(tmp) / f"{name}.json"
        path.write_text(json.dumps(model_cfg))
        open_clip.add_model_config(path)


def register_model(model: str, open_clip=None) -> str:
    """The name open_clip builds `model` by: built-in names pass through; a config JSON and
    an hf-hub repo's config are registered (under the file stem / a name derived from the repo)."""
    return _model_config(model, open_clip)[0]


def _model_config(model: str, open_clip=None) -> tuple[str, dict, dict, str]:
    """(name to build, model_cfg, preprocess_cfg, where they came from)."""
    if open_clip is None:
        import open_clip
    repo = parse_hf_hub(model)
    if repo is not None:
        cfg = _hub_file(repo, "open_clip_config.json")
        try:
            data = json.loads(Path(cfg).read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"{model}: its open_clip_config.json does not read ({exc})") from None
        model_cfg = data.get("model_cfg") if isinstance(data, dict) else None
        if not isinstance(model_cfg, dict) or not all(k in model_cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
            raise UserError(f"{model}: its open_clip_config.json has no open_clip model_cfg; is it an open_clip repo?")
        preprocess = data.get("preprocess_cfg") or {}
        if not isinstance(preprocess, dict):
            raise UserError(f"{model}: the preprocess_cfg of its open_clip_config.json must be an object")
        name = "hf-hub-" + repo.replace("/", "--")
        _register(name, model_cfg, open_clip)
        return name, open_clip.get_model_config(name), preprocess, f"{model}'s open_clip_config.json"
    path = Path(model)
    if path.suffix != ".json":
        if model not in open_clip.list_models():
            raise UserError(f"unknown open_clip model {model!r}; pass a model name (e.g. ViT-L-14-336), "
                            "a model-config JSON path, or hf-hub:ORG/REPO")
        return model, open_clip.get_model_config(model), {}, f"{model} config"
    model_cfg, preprocess = _read_config_json(path)
    plain = json.loads(path.read_text()) == model_cfg  # no preprocess_cfg, no model_cfg wrapper
    _register(path.stem, model_cfg, open_clip, path if plain else None)
    return path.stem, model_cfg, preprocess, f"{path.name}"


@contextlib.contextmanager
def hub_offline_unless_reachable(host: str = "huggingface.co"):
    """Without network, let the hub answer from its cache at once instead of retrying for a minute."""
    from huggingface_hub import constants

    try:
        socket.getaddrinfo(host, 443)
        reachable = True
    except OSError:
        reachable = False
    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = before or not reachable
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def _hub_file(repo: str, filename: str | None) -> str:
    """A file of an hf-hub repo from the hub or its cache (filename None: open_clip's weights file)."""
    from open_clip.pretrained import download_pretrained_from_hf

    what = filename or "weights"
    try:
        with hub_offline_unless_reachable():
            return download_pretrained_from_hf(repo, filename=filename)
    except Exception as exc:  # the hub raises many types when offline or when the repo is wrong
        raise UserError(
            f"could not get the {what} of hf-hub:{repo} ({type(exc).__name__}); check the name, or download the repo "
            "where you have network and pass --model PATH/open_clip_config.json --pretrained PATH/weights"
        ) from None


# --- what the method can serve -----------------------------------------------------------


def unsupported_reason(model_cfg: dict) -> str | None:
    """Why this tower cannot give MergeMix saliency, from its config alone; None if it can.

    The method merges the tokens of open_clip's own VisionTransformer and reads the attention
    of the class token, the token the tower's image embedding is read from. Towers without
    such a class token cannot be served."""
    vision = model_cfg.get("vision_cfg") or {}
    if vision.get("timm_model_name"):
        return (f"its vision tower is the timm model {vision['timm_model_name']} (SigLIP, EVA, PE, ConvNeXt, ... towers), "
                "not open_clip's VisionTransformer whose blocks the token merging runs")
    if isinstance(vision.get("layers"), (list, tuple)):
        return "its vision tower is a ModifiedResNet (convolutional): no patch tokens and no class token"
    if vision.get("attentional_pool"):
        return "it pools the image with an attentional pooler (CoCa), not its class token, so class-token attention is no saliency"
    pool = vision.get("pool_type", "tok")
    if pool != "tok":
        return (f"it pools the image by pool_type={pool!r} (e.g. CLIPA's average of patch tokens): its class token is "
                "never read out, so class-token attention is no saliency")
    if vision.get("scaled_cosine_attn"):
        return "its blocks use scaled-cosine attention, which the merging encoder does not implement"
    return None


# --- the tower ---------------------------------------------------------------------------


def resolve_tower(model: str, pretrained: str | None = "openai", *, quick_gelu: bool | None = None,
                  mean: Sequence[float] | str | None = None, std: Sequence[float] | str | None = None) -> Tower:
    """The tower `model` + `pretrained` stand for, with its activation and constants.

    `pretrained`: an open_clip tag, a checkpoint path, None/"none" for random weights; for an
    hf-hub: model, the model string itself (its repo's weights), a path or none.
    `quick_gelu`, `mean`, `std`: how a local checkpoint was trained; refused where they
    contradict a tag or hub repo, whose own settings apply."""
    import open_clip

    mean, std = parse_triple(mean, "--mean"), parse_triple(std, "--std", positive=True)
    name, model_cfg, preprocess, config_source = _model_config(model, open_clip)
    reason = unsupported_reason(model_cfg)
    if reason:
        raise UserError(f"{model} cannot give MergeMix saliency: {reason}; choose a ViT with class-token pooling "
                        "(e.g. ViT-L-14-336, ViT-B-16)")
    weights = _weights(model, name, pretrained, open_clip)
    model_quick_gelu = bool(model_cfg.get("quick_gelu", False))

    # Weights that come with their own settings (a tag, a hub repo): those settings apply.
    own = None
    if weights is not None and weights == model:  # an hf-hub model with its repo's weights
        own, origin = dict(preprocess, quick_gelu=model_quick_gelu), config_source
    elif weights is not None and open_clip.pretrained.is_pretrained_cfg(name, weights):
        tag = open_clip.pretrained.get_pretrained_cfg(name, weights)
        # A tag trained with QuickGELU gets it (as the -quickgelu names do); otherwise the model config decides.
        own = {"mean": tag.get("mean"), "std": tag.get("std"), "interpolation": tag.get("interpolation"),
               "quick_gelu": bool(tag.get("quick_gelu", False)) or model_quick_gelu}
        origin = f"tag {weights}"
    if own is not None:
        quick = own["quick_gelu"]
        mean_ = _floats(own.get("mean"), f"{origin} mean") or OPENAI_MEAN
        std_ = _floats(own.get("std"), f"{origin} std", positive=True) or OPENAI_STD
        for flag, given, value in ((_gelu_flag(quick_gelu), quick_gelu, quick), ("--mean", mean, mean_), ("--std", std, std_)):
            if given is not None and given != value:
                raise UserError(f"{flag} contradicts {origin}, whose weights were trained with "
                                f"{_setting(flag, value)}; drop {flag}")
        interpolation = own.get("interpolation") or "bicubic"
        source = f"settings of {origin}"
    else:  # a local checkpoint or random weights: what the user says, else the configs
        if quick_gelu is False and model_quick_gelu:
            raise UserError(f"--no-quick-gelu contradicts {config_source}, which sets quick_gelu; "
                            "use the model name without -quickgelu")
        quick = model_quick_gelu if quick_gelu is None else quick_gelu
        mean_ = mean or _floats(preprocess.get("mean"), f"{config_source} preprocess_cfg mean") or OPENAI_MEAN
        std_ = std or _floats(preprocess.get("std"), f"{config_source} preprocess_cfg std", positive=True) or OPENAI_STD
        interpolation = preprocess.get("interpolation") or "bicubic"
        said = [flag for flag, given in ((_gelu_flag(quick_gelu), quick_gelu), ("--mean", mean), ("--std", std))
                if given is not None]
        if preprocess:
            said.append(f"{config_source} preprocess_cfg")
        source = ", ".join(said) or (f"{config_source} and open_clip's defaults; a checkpoint trained otherwise "
                                     "needs --quick-gelu, --mean, --std")
    if interpolation not in INTERPOLATIONS:
        raise UserError(f"{config_source}: interpolation {interpolation!r} is not one of {', '.join(INTERPOLATIONS)}")
    vision = model_cfg.get("vision_cfg") or {}
    return Tower(model=model, name=name, weights=weights, quick_gelu=quick, mean=mean_, std=std_,
                 interpolation=interpolation, image_size=_pair(vision.get("image_size", 224)),
                 patch_size=_pair(vision.get("patch_size", 16)), settings_from=source,
                 layers=int(vision.get("layers", 12)))


def _floats(value, where: str, positive: bool = False) -> tuple[float, float, float] | None:
    return None if value is None else parse_triple(value, where, positive)


def _gelu_flag(quick_gelu: bool | None) -> str:
    return "--quick-gelu" if quick_gelu else "--no-quick-gelu"


def _setting(flag: str, value) -> str:
    if "quick-gelu" in flag:
        return "QuickGELU" if value else "GELU"
    return f"{flag.lstrip('-')} " + ",".join(f"{v:g}" for v in value)


def _pair(value) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, (int, float)) else (int(value[0]), int(value[1]))


def _weights(model: str, name: str, pretrained: str | None, open_clip) -> str | None:
    """The weights `pretrained` names, checked but not downloaded."""
    tag = None if pretrained in (None, "", "none") else str(pretrained)
    if tag is None or Path(tag).is_file() or "://" in tag:  # a URL is checked by resolve_pretrained
        return tag
    if parse_hf_hub(model) is not None:
        if tag == model:
            return tag
        raise UserError(f"{model} brings its own weights: leave --pretrained out (or pass --pretrained {model}), "
                        "or pass --pretrained none or a checkpoint PATH")
    if not open_clip.pretrained.is_pretrained_cfg(name, tag):
        if Path(tag).suffix or "/" in tag:
            raise UserError(f"checkpoint {tag} not found; pass --pretrained PATH to an existing file, or --pretrained none")
        known = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none known"
        raise UserError(f"{model} has no pretrained tag {tag!r} (tags: {known}); or pass --pretrained PATH or --pretrained none")
    return tag


def resolve_pretrained(model: str, pretrained: str | None, storage_options: dict | None = None,
                       download: bool = True) -> str | None:
    """A local checkpoint path for `pretrained` (tag and hub downloads go to their caches; a
    checkpoint URL such as s3://bucket/ViT-L-14-336.pt is fetched into a local cache), or None
    for random weights. The driver runs it once, with download=False for a URL (checked, not
    fetched), so that missing weights fail with one clear line before any worker starts."""
    import open_clip
    from open_clip.pretrained import download_pretrained, get_pretrained_cfg

    name = register_model(model, open_clip)
    tag = _weights(model, name, pretrained, open_clip)
    if tag is None or Path(tag).is_file():
        return tag
    if "://" in tag:
        return _fetch_checkpoint(tag, storage_options, download)
    repo = parse_hf_hub(model)
    if repo is not None:
        return _hub_file(repo, None)
    try:
        with hub_offline_unless_reachable():
            path = download_pretrained(get_pretrained_cfg(name, tag))
    except Exception as exc:  # hub and url downloads raise many types when offline
        raise UserError(
            f"could not get pretrained weights {tag!r} for {model} ({type(exc).__name__}); "
            "download them where you have network and pass --pretrained PATH, or use --pretrained none for random weights"
        ) from None
    if not path:
        raise UserError(f"no download source for {model} {tag!r}; pass --pretrained PATH or --pretrained none")
    return path


def _fetch_checkpoint(url: str, storage_options: dict | None, download: bool) -> str:
    """A checkpoint on an object store or web server, copied once into a local cache (open_clip
    loads files); the copy is redone when the remote size differs."""
    from stages.storage import input_fs

    try:
        fs, path = input_fs(url, storage_options)
        size = fs.size(path)
    except FileNotFoundError:
        raise UserError(f"checkpoint {url} not found; pass --pretrained with an existing checkpoint, or none") from None
    except Exception as exc:  # no endpoint, no credentials, no bucket
        raise UserError(f"cannot read checkpoint {url}: {one_line(exc)}") from None
    if not download:
        return url
    cache = Path(os.environ.get("MERGEMIX_CACHE", Path.home() / ".cache" / "mergemix")) / "checkpoints"
    local = cache / f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{PurePosixPath(path).name}"
    if not (local.is_file() and local.stat().st_size == size):
        cache.mkdir(parents=True, exist_ok=True)
        partial = local.with_name(f".{local.name}.{os.getpid()}.part")
        fs.get_file(path, str(partial))
        os.replace(partial, local)  # whole or absent: actors on one node may fetch at once
    return str(local)


def model_geometry(model: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """(image size, patch size) of an open_clip ViT from its config, without building it."""
    _, model_cfg, _, _ = _model_config(model)
    vision = model_cfg.get("vision_cfg") or {}
    return _pair(vision.get("image_size", 224)), _pair(vision.get("patch_size", 16))


# --- building ------------------------------------------------------------------------------
# torch and open_clip are imported when a tower is built, not when this module is: the driver
# resolves towers from configs without loading either.

PRECISIONS = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # autocast dtype names in torch


def load_encoder(
    model: str = "ViT-L-14-336",
    pretrained: str | None = "openai",
    *,
    merge: int = 0,
    attn_layer: int = -2,
    prop_attn: bool = False,
    schedule: str = "constant",
    device="cpu",
    precision: str = "fp32",
    quick_gelu: bool | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    storage_options: dict | None = None,
) -> "MergingEncoder":
    """Build the encoder. `model`: open_clip name, path to a model-config JSON, or
    hf-hub:ORG/REPO; `pretrained`: open_clip tag, local checkpoint path, None/"none" for
    random weights (for hf-hub: the model string itself for its repo's weights).

    The tower is the network open_clip builds for these weights with their settings applied
    (stages.tower): a tag's or hub repo's activation and mean/std; for a local checkpoint or
    random weights `quick_gelu`, `mean`, `std` say how it was trained (default: the configs)."""
    import torch

    from stages.encoder import MergingEncoder

    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    tower = resolve_tower(model, pretrained, quick_gelu=quick_gelu, mean=mean, std=std)
    checkpoint = resolve_pretrained(model, tower.weights, storage_options)
    if checkpoint is None:
        log.warning("RANDOM WEIGHTS: %s built with --pretrained none; saliency is meaningless for real data", model)
    clip = build_clip(tower, checkpoint)
    visual = clip.visual
    del clip  # the text tower is not needed
    encoder = MergingEncoder(visual, merge, attn_layer, prop_attn, schedule, tower.mean, tower.std)
    encoder.tower = tower
    encoder.to(device)
    if torch.device(device).type == "cuda" and precision != "fp32":
        encoder.autocast_dtype = getattr(torch, PRECISIONS[precision])
    return encoder


def build_clip(tower: Tower, checkpoint: str | None, device="cpu"):
    """open_clip's model for `tower`: its config, its activation, `checkpoint` (None: seeded
    random weights) and its mean/std/interpolation as the model's preprocess config.
    device="meta" builds the structure only, without allocating or initialising weights."""
    import open_clip
    import torch

    settings = {"mean": tower.mean, "std": tower.std, "interpolation": tower.interpolation}
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(0)  # random weights are the same in every process: runs stay reproducible
        return open_clip.create_model(tower.name, pretrained=checkpoint, weights_only=True, device=device,
                                      force_preprocess_cfg=settings, quick_gelu=tower.quick_gelu)
