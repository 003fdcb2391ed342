"""The `generate` configuration: defaults, YAML file, flags, validation and fingerprint.

Precedence: built-in defaults < `--config FILE.yaml` < flags given on the command line.
The fingerprint hashes only the keys that change the output, so a resumed run with, say,
more workers is accepted while a different seed or model is refused.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from schemas.shard import IMAGE_FORMATS
from stages.errors import UserError
from stages.mixing.methods import IMAGE_NEGATIVES, LAM_MODES, METHODS, NEGATIVE_KNOBS
from stages.mixing.ratios import parse_lam_spec
from stages.imaging.decode import IMAGE_OPS, RESIZE_MODES
from stages.tome.schedule import SCHEDULES
from stages.model.constants import HF_HUB_PREFIX, PRECISIONS
from stages.model.tower import parse_triple

DEVICES = ("auto", "cpu", "cuda")
PRECISION_NAMES = tuple(PRECISIONS)

# Keys that do not change a single output byte: they may differ between a run and its resume.
# `compile` changes saliency floats in the last bits at most, as --batch-size does (docs/DECISIONS.md).
RUN_ONLY_KEYS = frozenset({"output", "workers", "batch_size", "address", "overwrite", "config", "device", "progress",
                           "unit_timeout", "storage_options", "compile"})
LOCATION_KEYS = frozenset({"input", "image_root"})  # where the records are; the input digest says what they are
SECRET_KEYS = frozenset({"storage_options"})  # may hold credentials: never written to run.json, rows or the terminal


@dataclass
class GenerateConfig:
    input: str = ""
    output: str = ""
    image_root: str | None = None
    folder_labels: bool = False
    model: str = "ViT-L-14-336"
    pretrained: str = "openai"
    # How a local checkpoint was trained (None: from the tag, the config, or open_clip's defaults; stages.model.tower).
    quick_gelu: bool | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    merge: int = 288
    attn_layer: int | str = -2  # or "auto": the block saliency-check ranks first on a sample of the input
    prop_attn: bool = False
    merge_schedule: str = "constant"
    method: str = "mergemix"
    lam: str = "beta:1.0"
    lam_mode: str = "area"
    resize: str = "pad"
    image_format: str = "jpg"
    jpeg_quality: int = 95
    precision: str = "bf16"  # used on CUDA only; CPU runs in fp32
    seed: int = 0
    samples_per_shard: int = 1000
    workers: int | None = None  # encoder actors; default: one per GPU, else one per 2 CPUs
    batch_size: int = 64
    device: str = "auto"  # auto | cpu | cuda
    # Where images are decoded and fitted: pil in the CPU prepare tasks; torch in the encoder actor, on
    # its device (stages.imaging.device); auto: torch where the encoder runs on CUDA, else pil.
    image_ops: str = "auto"
    device_encode: bool = False  # torch image ops: the actor JPEG-encodes winners and losers (nvJPEG on CUDA)
    compile: bool = False  # torch.compile the encoder's blocks
    # The image-side negatives' knobs (METHOD.md 4b; stages.mixing.negatives.NegativeSettings checks them).
    crop_area: list[float] = field(default_factory=lambda: [0.01, 0.20])  # crop: range of the box's area share
    noise_step: int = 500  # noise: diffusion step t in 0..999
    noise_space: str = "pixel"  # noise: pixel (RGB in [0, 1], POVID) | normalized (the tower's, SeVa/BPO/CHiP)
    pixelate: int = 16  # pixelate: block side k
    blur_radius: list[int] | float = 20.0  # image-blur: Gaussian sigma in pixels, or A,B for U{A..B} per sample
    rotate_degrees: list[float] = field(default_factory=lambda: [10.0, 80.0])  # rotate: range of the angle
    address: str | None = None
    unit_timeout: float = 3600.0  # seconds a unit's current stage may go without progress
    storage_options: dict | None = None  # fsspec options for URL inputs/outputs (endpoint, keys, ...)
    overwrite: bool = False
    progress: bool = True
    config: str | None = None

    @classmethod
    def build(cls, flags: dict) -> "GenerateConfig":
        """Defaults < YAML (flags['config']) < flags that are not None."""
        values: dict = {}
        if flags.get("config"):
            values.update(load_yaml(flags["config"]))
        values.update({k: v for k, v in flags.items() if v is not None})
        if "pretrained" not in values and str(values.get("model", "")).startswith(HF_HUB_PREFIX):
            values["pretrained"] = values["model"]  # an hf-hub model brings its own weights, as in open_clip
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"unknown config key(s): {', '.join(unknown)}")
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if not self.input:
            raise UserError("--input is required (a LLaVA .json, an image folder, webdataset tars, or a .jsonl/.parquet manifest)")
        if not self.output:
            raise UserError("--output is required (the directory the shards go to)")
        choices = {"method": METHODS, "lam_mode": LAM_MODES, "resize": RESIZE_MODES, "image_format": IMAGE_FORMATS,
                   "device": DEVICES, "precision": PRECISION_NAMES, "merge_schedule": SCHEDULES,
                   "image_ops": IMAGE_OPS}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise UserError(f"--{key.replace('_', '-')} {getattr(self, key)!r} is not one of: {', '.join(allowed)}")
        try:
            parse_lam_spec(self.lam)
        except ValueError as exc:
            raise UserError(f"--lam: {exc}") from None
        self._check_attn_layer()
        for key, low in (("samples_per_shard", 1), ("batch_size", 1), ("merge", 0), ("workers", 1)):
            value = getattr(self, key)
            if value is not None and value < low:
                raise UserError(f"--{key.replace('_', '-')} must be >= {low}, got {value}")
        if not self.unit_timeout > 0:
            raise UserError(f"--unit-timeout must be > 0 seconds, got {self.unit_timeout}")
        if self.mean is not None:
            self.mean = list(parse_triple(self.mean, "--mean"))
        if self.std is not None:
            self.std = list(parse_triple(self.std, "--std", positive=True))
        if not 1 <= self.jpeg_quality <= 100:
            raise UserError(f"--jpeg-quality must be in 1..100, got {self.jpeg_quality}")
        if isinstance(self.storage_options, str):
            self.storage_options = parse_storage_options(self.storage_options)
        if self.storage_options is not None and not isinstance(self.storage_options, dict):
            raise UserError("--storage-options must be a JSON object, e.g. '{\"client_kwargs\": {\"endpoint_url\": \"http://...\"}}'")
        if self.device_encode and self.image_format != "jpg":
            raise UserError(f"--device-encode makes JPEGs: it needs --image-format jpg, not {self.image_format}")
        if self.device_encode and self.image_ops == "pil":
            raise UserError("--device-encode needs the torch image path: --image-ops torch (or auto on a GPU)")
        if self.image_root is not None and "://" not in self.image_root and not Path(self.image_root).is_dir():
            raise UserError(f"--image-root {self.image_root} is not a directory")
        self._check_negatives()

    def _check_attn_layer(self) -> None:
        """A block number (text from a flag becomes an int) or "auto" (pipeline.run resolves it)."""
        if isinstance(self.attn_layer, str) and self.attn_layer != "auto":
            try:
                self.attn_layer = int(self.attn_layer)
            except ValueError:
                raise UserError(f"--attn-layer must be a block number or auto, got {self.attn_layer!r}") from None
        if isinstance(self.attn_layer, bool) or not isinstance(self.attn_layer, (int, str)):
            raise UserError(f"--attn-layer must be a block number or auto, got {self.attn_layer!r}")

    @property
    def attn_layer_auto(self) -> bool:
        return self.attn_layer == "auto"

    def _check_negatives(self) -> None:
        """The image-side negatives' knobs (parsed from "A,B" text where the flags give text), and
        what these methods cannot do: they run no tower, so no torch image path and no paper lam_hat."""
        self.crop_area = _numbers(self.crop_area, "--crop-area", 2)
        self.rotate_degrees = _numbers(self.rotate_degrees, "--rotate-degrees", 2)
        radius = _numbers(self.blur_radius, "--blur-radius", (1, 2))
        self.blur_radius = radius[0] if len(radius) == 1 else [int(v) if float(v).is_integer() else v for v in radius]
        self.negative_settings()  # the ranges
        if self.method not in IMAGE_NEGATIVES:
            return
        if self.lam_mode == "paper":
            raise UserError(f"--lam-mode paper needs the merged tower's token count; {self.method} runs no tower: "
                            "use --lam-mode area (lam_hat = lam) or fixed")
        if self.image_ops == "torch" or self.device_encode:
            raise UserError(f"{self.method} runs no tower, so no encoder actor decodes images: drop --image-ops torch "
                            "and --device-encode")

    def negative_settings(self, mean=None, std=None, fill=None):
        """stages.mixing.negatives.NegativeSettings of this run (the tower's mean, std and pad colour
        where given); a knob out of range is one line naming its flag."""
        from stages.mixing.negatives import NegativeArgumentError, NegativeSettings

        radius = tuple(self.blur_radius) if isinstance(self.blur_radius, list) else self.blur_radius
        extra = {k: v for k, v in (("mean", mean), ("std", std), ("fill", fill)) if v is not None}
        try:
            return NegativeSettings(crop_area=tuple(self.crop_area), noise_step=self.noise_step,
                                    noise_space=self.noise_space, pixelate=self.pixelate, blur_radius=radius,
                                    rotate_degrees=tuple(self.rotate_degrees), **extra)
        except NegativeArgumentError as exc:
            text = str(exc)
            for name in NEGATIVE_KNOBS:
                text = text.replace(name, "--" + name.replace("_", "-"))
            raise UserError(text) from None

    @property
    def effective_merge(self) -> int:
        """Methods without merging run the un-merged tower whatever --merge says."""
        return 0 if self.method == "topk" else self.merge

    def to_dict(self) -> dict:
        """Every key, secrets included: for the workers of this run."""
        return asdict(self)

    def record(self) -> dict:
        """What run.json keeps of the config: every key but the secrets."""
        return {k: v for k, v in self.to_dict().items() if k not in SECRET_KEYS}

    def output_keys(self) -> dict:
        d = {k: v for k, v in self.to_dict().items() if k not in RUN_ONLY_KEYS}
        # Knobs that shape no byte of this method's output are left out (so outputs of the other methods
        # keep the fingerprints they had before these knobs existed); negatives use no tower settings.
        for knob, methods in NEGATIVE_KNOBS.items():
            if self.method not in methods:
                del d[knob]
        if self.method in IMAGE_NEGATIVES:
            for key in ("merge", "attn_layer", "prop_attn", "merge_schedule", "lam", "precision"):
                del d[key]
        else:
            d["merge"] = self.effective_merge
        d["input"], d["image_root"] = self._resolved("input"), self._resolved("image_root")
        if self.image_format != "jpg":
            d.pop("jpeg_quality")
        return d

    def _resolved(self, key: str):
        value = getattr(self, key)
        return str(Path(value).resolve()) if value and "://" not in value else value

    def fingerprint(self, input_digest: str = "", tower: dict | None = None, image_ops: str | None = None) -> str:
        """Hash of everything that shapes the output: these keys, the input's records, the
        tower's resolved settings (activation, mean/std, interpolation: stages.model.tower) and the image
        path as it resolved for the run (`image_ops`; None: the flag's, auto counting as pil). Not
        where the input lives: the same records read from a disk or a bucket give the same shards."""
        keys = {k: v for k, v in self.output_keys().items() if k not in LOCATION_KEYS}
        keys |= {"input_digest": input_digest} | ({"tower": tower} if tower else {})
        # pil and actor-side encoding off hash as before these flags existed: such outputs still resume.
        del keys["image_ops"], keys["device_encode"]
        image_ops = image_ops or (self.image_ops if self.image_ops != "auto" else "pil")
        if image_ops != "pil":
            keys["image_ops"] = image_ops
        if self.device_encode:
            keys["device_encode"] = True
        text = json.dumps(keys, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_yaml(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {path} not found")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must be a mapping of keys to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def parse_storage_options(text: str) -> dict:
    """--storage-options: a JSON object of fsspec options (endpoint, credentials, ...)."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise UserError(f"--storage-options is not valid JSON ({exc.msg}); pass a JSON object") from None
    if not isinstance(value, dict):
        raise UserError("--storage-options must be a JSON object")
    return value


def _numbers(value, flag: str, count) -> list[float]:
    """Numbers from "A,B" text (a flag) or a list (YAML); `count`: how many, or a tuple of the allowed counts."""
    parts = value.split(",") if isinstance(value, str) else value if isinstance(value, (list, tuple)) else [value]
    counts = count if isinstance(count, tuple) else (count,)
    try:
        numbers = [float(v) for v in parts]
    except (TypeError, ValueError):
        numbers = []
    if len(numbers) not in counts:
        raise UserError(f"{flag} needs {' or '.join(map(str, counts))} comma-separated numbers, got {value!r}")
    return numbers
