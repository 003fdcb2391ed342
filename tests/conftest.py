"""Shared fixtures: a tiny open_clip tower with random weights, generated images, one Ray cluster."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

# A ViT small enough to run in milliseconds on CPU: 64 px, patch 8 (8x8 = 64 patches), width 64, 4 blocks.
TINY_MODEL_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 64, "layers": 4, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny matrices gain nothing from a second thread, and lose much on a busy 2-core machine:
    training tests run with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_model_config(tmp_path_factory) -> Path:
    """Path to an open_clip model-config JSON for the tiny tower."""
    path = tmp_path_factory.mktemp("models") / "mm-tiny-vit.json"
    path.write_text(json.dumps(TINY_MODEL_CONFIG))
    return path


def make_image(seed: int, size=(80, 60)) -> np.ndarray:
    """A deterministic RGB uint8 image with structure (gradients + a bright square), H x W x 3."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)), np.full_like(xx, rng.integers(0, 255))], -1)
    x0, y0 = rng.integers(0, w // 2), rng.integers(0, h // 2)
    img[y0 : y0 + h // 3, x0 : x0 + w // 3] = rng.integers(0, 255, size=3)
    img = img + rng.integers(0, 20, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_photo(rng: np.random.Generator, size: int) -> np.ndarray:
    """A square photo-like RGB uint8 image: a smooth colour field of random blobs, a texture and
    per-pixel noise. No flat area and no padding, so no two patches look alike: the saliency of
    such images leaves no near-tie for float noise to break (tests/test_output_digest.py)."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = np.zeros((size, size, 3)) + rng.uniform(40, 200, 3)
    for _ in range(6):
        cy, cx, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.08, 0.4)
        img += rng.uniform(-90, 90, 3) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))[..., None]
    fy, fx, phase = rng.uniform(2, 9), rng.uniform(2, 9), rng.uniform(0, 2 * np.pi)
    img += 18 * np.sin(2 * np.pi * (fy * yy + fx * xx) + phase)[..., None]
    img += rng.normal(0, 10, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_photo_set(root: Path, n: int, seed: int, size: int = 96) -> Path:
    """root/llava.json with n square photo-like JPEGs (make_photo) and one text-only row."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        Image.fromarray(make_photo(rng, size)).save(root / "images" / f"{i:05d}.jpg", quality=92)
        rows.append({"id": f"photo-{i:05d}", "image": f"images/{i:05d}.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat is in the picture?"}, {"from": "gpt", "value": f"Picture {i}."}]})
    rows.append({"id": "text-only", "conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]})
    (root / "llava.json").write_text(json.dumps(rows))
    return root / "llava.json"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 server on 127.0.0.1 (SeaweedFS), one per test session; see tests/s3_server.py."""
    from tests.s3_server import start

    server = start(tmp_path_factory.mktemp("s3") / "data")
    yield server
    server.stop()


@pytest.fixture
def s3_prefix(s3_server, request) -> str:
    """A fresh, empty prefix `bucket/test-name-N` on the session's S3 server (one bucket for the
    session: SeaweedFS gives every bucket volumes of its own)."""
    import re

    fs = s3_server.filesystem()
    if not fs.exists("mergemix-tests"):
        fs.mkdir("mergemix-tests")
    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:60].strip("-")
    prefix, n = f"mergemix-tests/{name}", 0
    while fs.exists(f"{prefix}-{n}"):
        n += 1
    return f"{prefix}-{n}"


def direct_cls_attention(visual, x, layer):
    """CLS-row attention of block `layer`, from nn.MultiheadAttention's own weights output."""
    with torch.no_grad():
        h = visual._embeds(x)
        for block in visual.transformer.resblocks[:layer]:
            h = block(h)
        block = visual.transformer.resblocks[layer]
        y = block.ln_1(h)
        _, weights = block.attn(y, y, y, need_weights=True, average_attn_weights=False)
    return weights[:, :, 0, 1:].sum(dim=1)  # (B, L)


def local_ray(env: dict | None = None, runtime_env: dict | None = None):
    """The body of a module's Ray fixture (`yield from local_ray(...)`): a local cluster of 2 CPUs
    and no dashboard. address="local" never attaches to another Ray running on this machine.
    `env` goes into os.environ before the start, so Ray's workers and the CLI subprocesses a test
    starts inherit it, and is removed after."""
    import ray

    os.environ.update(env or {})
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env=runtime_env)
    try:
        yield
    finally:
        ray.shutdown()
        for name in env or {}:
            os.environ.pop(name, None)


def sample_demo(tmp_path_factory, n: int, seed: int, name: str = "demo") -> Path:
    """A folder with a LLaVA-format JSON of n generated pictures (stages.samples.demo)."""
    from stages.samples.demo import write_sample_data

    root = tmp_path_factory.mktemp(name)
    write_sample_data(root, n=n, seed=seed)
    return root
