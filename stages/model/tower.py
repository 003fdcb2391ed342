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
tower the method cannot serve, and print what will run, before any worker starts."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from stages.errors import UserError
from stages.model.configs import model_config, pair
from stages.model.constants import INTERPOLATIONS, OPENAI_MEAN, OPENAI_STD
from stages.model.weights import check_weights


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


def resolve_tower(model: str, pretrained: str | None = "openai", *, quick_gelu: bool | None = None,
                  mean: Sequence[float] | str | None = None, std: Sequence[float] | str | None = None) -> Tower:
    """The tower `model` + `pretrained` stand for, with its activation and constants.

    `pretrained`: an open_clip tag, a checkpoint path, None/"none" for random weights; for an
    hf-hub: model, the model string itself (its repo's weights), a path or none.
    `quick_gelu`, `mean`, `std`: how a local checkpoint was trained; refused where they
    contradict a tag or hub repo, whose own settings apply."""
    import open_clip

    mean, std = parse_triple(mean, "--mean"), parse_triple(std, "--std", positive=True)
    name, model_cfg, preprocess, config_source = model_config(model, open_clip)
    reason = unsupported_reason(model_cfg)
    if reason:
        raise UserError(f"{model} cannot give MergeMix saliency: {reason}; choose a ViT with class-token pooling "
                        "(e.g. ViT-L-14-336, ViT-B-16)")
    weights = check_weights(model, name, pretrained, open_clip)
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
                 interpolation=interpolation, image_size=pair(vision.get("image_size", 224)),
                 patch_size=pair(vision.get("patch_size", 16)), settings_from=source,
                 layers=int(vision.get("layers", 12)))


def _floats(value, where: str, positive: bool = False) -> tuple[float, float, float] | None:
    return None if value is None else parse_triple(value, where, positive)


def _gelu_flag(quick_gelu: bool | None) -> str:
    return "--quick-gelu" if quick_gelu else "--no-quick-gelu"


def _setting(flag: str, value) -> str:
    if "quick-gelu" in flag:
        return "QuickGELU" if value else "GELU"
    return f"{flag.lstrip('-')} " + ",".join(f"{v:g}" for v in value)
