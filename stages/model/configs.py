"""open_clip model configs: a built-in name, a model-config JSON (optionally with its preprocess_cfg, or
in open_clip's open_clip_config.json layout) or an hf-hub repo's, registered with open_clip under the
name it builds. Reads configs only: no weights, no building."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from stages.errors import UserError
from stages.model.hub import hub_file, parse_hf_hub


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
    return model_config(model, open_clip)[0]


def model_config(model: str, open_clip=None) -> tuple[str, dict, dict, str]:
    """(name to build, model_cfg, preprocess_cfg, where they came from)."""
    if open_clip is None:
        import open_clip
    repo = parse_hf_hub(model)
    if repo is not None:
        cfg = hub_file(repo, "open_clip_config.json")
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


def model_geometry(model: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """(image size, patch size) of an open_clip ViT from its config, without building it."""
    _, model_cfg, _, _ = model_config(model)
    vision = model_cfg.get("vision_cfg") or {}
    return pair(vision.get("image_size", 224)), pair(vision.get("patch_size", 16))


def pair(value) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, (int, float)) else (int(value[0]), int(value[1]))
