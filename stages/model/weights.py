"""Which weights a tower loads: a pretrained tag (downloaded into open_clip's cache), a local
checkpoint, a checkpoint URL on an object store (fetched once per node into a local cache), an
hf-hub repo's weights, or none (random). Checked on the driver before any worker starts."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path, PurePosixPath

from stages.errors import UserError, one_line
from stages.model.configs import register_model
from stages.model.hub import hub_file, hub_offline_unless_reachable, parse_hf_hub


def check_weights(model: str, name: str, pretrained: str | None, open_clip) -> str | None:
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
    tag = check_weights(model, name, pretrained, open_clip)
    if tag is None or Path(tag).is_file():
        return tag
    if "://" in tag:
        return _fetch_checkpoint(tag, storage_options, download)
    repo = parse_hf_hub(model)
    if repo is not None:
        return hub_file(repo, None)
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
