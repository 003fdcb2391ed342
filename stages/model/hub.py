"""Models whose config and weights live in a Hugging Face hub repo (`hf-hub:ORG/REPO`, open_clip's
syntax): the repo name, and a file of the repo from the hub or its cache."""
from __future__ import annotations

import contextlib
import re
import socket

from stages.errors import UserError
from stages.model.constants import HF_HUB_PREFIX


HF_REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def parse_hf_hub(model: str) -> str | None:
    """'hf-hub:ORG/REPO' -> 'ORG/REPO'; None for any other model string."""
    if not model.startswith(HF_HUB_PREFIX):
        return None
    repo = model[len(HF_HUB_PREFIX):]
    if not HF_REPO_RE.match(repo) or len(repo) > 96 or ".." in repo:
        raise UserError(f"--model {model!r}: write hf-hub:ORG/REPO, e.g. hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K")
    return repo


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


def hub_file(repo: str, filename: str | None) -> str:
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
