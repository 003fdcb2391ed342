"""The output-byte invariant: a fixed set of `generate` runs (every method, png / jpg / webp,
1 and 2 workers, both image paths) must keep producing the same tar members and Parquet rows,
on any CPU.

Refactors must not change a byte. A change that alters output on purpose updates
tests/data/output_digests.json in its own commit and says why in the message:

    MERGEMIX_UPDATE_DIGESTS=1 python -m pytest tests/test_output_digest.py

Why it holds on any CPU. Saliency floats differ between CPU kernels in the last bits (~6e-7
relative between ATEN_CPU_CAPABILITY=default and avx2 here), so:
- the digests hash every member and row except the stored `saliency` floats, which are compared
  with the recorded ones to a relative tolerance (SALIENCY_RTOL) instead;
- the input leaves no decision near a tie: square photo-like pictures with noise everywhere
  (tests.conftest.make_photo), no padding, no flat areas. Every row's top-k boundary and every
  merge decision is at least MIN_MARGIN away from a tie (asserted: a change that brings one
  closer fails here and says which, instead of flaking on another machine);
- test_digests_hold_under_other_kernels reruns the kernel-dependent runs with torch's scalar
  kernels (ATEN_CPU_CAPABILITY=default) and 4 torch threads per encoder actor, standing in for
  another machine.
The digests hold for the software stack they were recorded with (torch, numpy, Pillow,
libjpeg: a new libjpeg may decode other pixels); on another stack the test skips and says so.
The two fields that name this machine's temporary paths, `fingerprint` (it hashes the resolved
input path) and `model` (the tiny tower's config path), are left out; both are checked elsewhere.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import PIL
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, features

from pipeline.config import GenerateConfig
from pipeline.distribute import THREADS_ENV
from pipeline.run import generate
from stages.mixing.methods import METHODS, NEEDS_SALIENCY
from stages.mixing.masks import topk_margin
from stages.model.factory import load_encoder
from stages.readers.validate import validate_output
from tests.conftest import local_ray, write_photo_set

pytestmark = pytest.mark.timeout(600)

DIGESTS = Path(__file__).parent / "data" / "output_digests.json"
UPDATE = os.environ.get("MERGEMIX_UPDATE_DIGESTS") == "1"
VOLATILE = ("fingerprint", "model", "saliency")
SALIENCY_RTOL = 1e-5  # 15x the kernel noise measured between capabilities; a real change moves far more
MIN_MARGIN = 1e-4  # distance from a tie of every decision the saliency makes: ~200x the kernel noise
MERGE = 16
BASE = dict(pretrained="none", merge=MERGE, samples_per_shard=5, batch_size=4, image_format="png", progress=False,
            seed=5)

# name -> config overrides; every method with png and one worker, plus formats and workers.
RUNS = {f"{m}-png-w1": {"method": m} for m in METHODS}
RUNS |= {
    "mergemix-jpg-w1": {"method": "mergemix", "image_format": "jpg"},
    "mergemix-jpg-w2": {"method": "mergemix", "image_format": "jpg", "workers": 2},
    "mergemix-webp-w1": {"method": "mergemix", "image_format": "webp"},
    "cutmix-png-w2": {"method": "cutmix", "workers": 2},
}
# The torch image path (JPEGs decoded and fitted in the encoder actor, --device-encode: encoded there).
# On CPU its decode is libjpeg's and its resampling Pillow's, exactly: each run must also write the
# bytes of its pil twin.
TORCH_TWINS = {
    "torch-mergemix-png-w1": ("mergemix-png-w1", {"method": "mergemix", "image_ops": "torch"}),
    "torch-mergemix-jpg-w2": ("mergemix-jpg-w2", {"method": "mergemix", "image_format": "jpg", "workers": 2,
                                                  "image_ops": "torch"}),
    "torch-encode-mergemix-jpg-w1": ("mergemix-jpg-w1", {"method": "mergemix", "image_format": "jpg",
                                                         "image_ops": "torch", "device_encode": True}),
}
RUNS |= {name: flags for name, (_, flags) in TORCH_TWINS.items()}
# The runs whose bytes float kernels compute: saliency, and the actor's blends, resizes and blurs.
KERNEL_RUNS = sorted(f"{m}-png-w1" for m in NEEDS_SALIENCY | {"mixup", "resizemix"})


def software() -> dict:
    """What the bytes may legitimately depend on: the software stack."""
    return {"torch": torch.__version__.split("+")[0], "numpy": np.__version__, "pillow": PIL.__version__,
            "libjpeg_turbo": features.version("libjpeg_turbo"), "webp": features.version("webp")}


def environment() -> dict:
    """The full environment of a recording: the stack, and the machine it holds across."""
    cpu = platform.processor()
    if Path("/proc/cpuinfo").is_file():
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), cpu)
    return software() | {"cpu": cpu, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                         "actor_threads": int(os.environ.get(THREADS_ENV, "1")), "python": platform.python_version()}


@pytest.fixture(scope="module", autouse=True)
def ray_local():
    yield from local_ray()


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    # Seed 21: every decision of the saliency is >= 1.3e-4 from a tie (found by search; asserted below).
    return write_photo_set(tmp_path_factory.mktemp("digest-photos"), n=13, seed=21)


@pytest.fixture(scope="module")
def recorded() -> dict:
    data = json.loads(DIGESTS.read_text()) if DIGESTS.is_file() else {}
    data.setdefault("runs", {})
    data.setdefault("saliency", {})
    yield data
    if UPDATE:
        data["environment"] = environment()
        DIGESTS.parent.mkdir(exist_ok=True)
        DIGESTS.write_text(_dump(data))


def _dump(data: dict) -> str:
    """Indented JSON with each saliency row on one line (13 rows of 64 floats per reference)."""
    rows = {ref: {key: f"@{i}@{ref}" for i, key in enumerate(values)} for ref, values in data["saliency"].items()}
    text = json.dumps(data | {"saliency": rows}, indent=1, sort_keys=True)
    for ref, values in data["saliency"].items():
        for i, key in enumerate(values):
            text = text.replace(json.dumps(f"@{i}@{ref}"), json.dumps(values[key]))
    return text + "\n"


def _canonical(record: dict) -> str:
    return json.dumps({k: v for k, v in record.items() if k not in VOLATILE}, sort_keys=True, ensure_ascii=False)


def output_digest(out: Path) -> str:
    """sha256 over every tar member (name + bytes; JSON records canonicalised) and every Parquet row,
    saliency floats left out."""
    h = hashlib.sha256()
    for path in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(path) as tf:
            for member in tf.getmembers():
                data = tf.extractfile(member).read()
                if member.name.endswith(".json"):
                    data = _canonical(json.loads(data)).encode()
                h.update(member.name.encode() + b"\0" + hashlib.sha256(data).digest())
    for path in sorted((out / "shards").glob("*.parquet")):
        for row in pq.read_table(path).to_pylist():
            h.update(_canonical(row).encode())
    return h.hexdigest()


def ok_rows(out: Path) -> list[dict]:
    rows = [r for p in sorted((out / "shards").glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    return [r for r in rows if r["status"] == "ok"]


def winners(out: Path) -> dict[str, np.ndarray]:
    """Key -> the stored winner (png: exactly the pixels the encoder saw)."""
    found = {}
    for path in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(path) as tf:
            for member in tf.getmembers():
                if member.name.endswith(".winner.png"):
                    found[member.name.split(".")[0]] = np.asarray(Image.open(io.BytesIO(tf.extractfile(member).read())))
    return found


@pytest.fixture(scope="module")
def encoders(tiny_model_config) -> dict:
    """The runs' towers (random weights are seeded, so these are the actors' own), by merge total."""
    return {r: load_encoder(str(tiny_model_config), "none", merge=r) for r in (0, MERGE)}


def assert_far_from_ties(method: str, rows: list[dict], pixels: dict, encoders: dict) -> None:
    """Every decision the saliency makes for these rows is at least MIN_MARGIN from a tie: the
    top-k boundary of each mask (as the method ranks: recovered patches, merged tokens or plain
    patches) and every merge before the saliency layer. Then float noise of another kernel
    cannot move a mask."""
    enc = encoders[rows[0]["merge_total"]]
    batch = np.stack([pixels[r["key"]] for r in rows])
    sal = enc.saliency_from_pixels(batch)
    lam = torch.tensor([r["lam"] for r in rows], dtype=torch.float64)
    stored = torch.tensor([r["saliency"] for r in rows])
    torch.testing.assert_close(sal.grid.flatten(1), stored, rtol=SALIENCY_RTOL, atol=0)  # the actor's own
    tokens = sal.token_scores.shape[1]
    sizes = torch.stack([torch.bincount(s, minlength=tokens) for s in sal.source]).double()
    if method == "mergemix-official":  # top int(K * lam) merged tokens
        margins = topk_margin(sal.token_scores, torch.floor(lam * tokens))
    elif method == "mergemix-r":  # random token scores (exact); only the merges depend on floats
        margins = torch.full((len(rows),), torch.inf, dtype=torch.float64)
    else:  # top floor(lam * L) recovered patches; a merged token's patches move together
        margins = topk_margin(sal.token_scores, torch.floor(lam * enc.num_patches), sizes)
    margins = torch.minimum(margins, enc.merge_margins(batch).double())
    close = [(r["key"], f"{float(m):.1e}") for r, m in zip(rows, margins) if m < MIN_MARGIN]
    assert not close, (f"{method}: decisions within {MIN_MARGIN} of a tie in rows {close}: float noise of another "
                       "CPU kernel could change their masks; choose other data (tests.conftest.make_photo, seed)")


@pytest.mark.parametrize("name", sorted(RUNS))
def test_output_bytes_unchanged(name, tiny_model_config, photos, tmp_path, recorded, encoders):
    out = tmp_path / "out"
    cfg = GenerateConfig.build(dict(input=str(photos), output=str(out), model=str(tiny_model_config)) | BASE | RUNS[name])
    result = generate(cfg)
    assert result.ok and validate_output(out) == []
    assert result.counts == {"ok": 13, "failed": 0, "skipped": 1}  # 13 images + the text-only row
    rows = ok_rows(out)
    if cfg.method in NEEDS_SALIENCY and cfg.image_format == "png":
        assert_far_from_ties(cfg.method, rows, winners(out), encoders)
    digest = output_digest(out)
    saliency = {r["key"]: r["saliency"] for r in rows if r["saliency"] is not None}
    reference = f"merge={rows[0]['merge_total']}"
    if UPDATE:
        recorded["runs"][name] = digest
        if saliency:
            recorded["saliency"][reference] = saliency
        return
    if not recorded.get("environment"):
        pytest.fail("no digests recorded: run with MERGEMIX_UPDATE_DIGESTS=1")
    if {k: recorded["environment"].get(k) for k in software()} != software():
        pytest.skip(f"digests were recorded with {recorded['environment']}; this software stack is {software()}, "
                    "which may decode or encode other bytes: record them here with MERGEMIX_UPDATE_DIGESTS=1 "
                    "before a refactor")
    assert name in recorded["runs"], f"no digest recorded for {name}: run with MERGEMIX_UPDATE_DIGESTS=1"
    assert digest == recorded["runs"][name], f"{name}: output bytes changed"
    if name in TORCH_TWINS:
        assert digest == recorded["runs"][TORCH_TWINS[name][0]], f"{name}: not the bytes of the pil path"
    if saliency:
        expected = recorded["saliency"][reference]
        assert saliency.keys() == expected.keys()
        for key, values in saliency.items():
            np.testing.assert_allclose(values, expected[key], rtol=SALIENCY_RTOL, atol=0, err_msg=f"{name} {key}")


@pytest.mark.skipif(UPDATE, reason="recording")
@pytest.mark.timeout(900)
def test_digests_hold_under_other_kernels():
    """The runs whose bytes come from float kernels, again with torch's scalar kernels and 4 threads
    per encoder actor (in a fresh process: the capability is fixed when torch loads)."""
    if os.environ.get("ATEN_CPU_CAPABILITY") or os.environ.get(THREADS_ENV):
        pytest.skip("this process already runs with other kernels")
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default", **{THREADS_ENV: "4"})
    tests = [f"{__file__}::test_output_bytes_unchanged[{name}]" for name in KERNEL_RUNS]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
                          cwd=Path(__file__).parents[1], env=env, capture_output=True, text=True, timeout=850)
    tail = (proc.stdout + proc.stderr)[-3000:]
    assert proc.returncode == 0, tail
    assert f"{len(KERNEL_RUNS)} passed" in proc.stdout, tail
