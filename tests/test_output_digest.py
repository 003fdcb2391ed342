"""The output-byte invariant: a fixed set of `generate` runs (every method, png / jpg / webp,
1 and 2 workers) must keep producing the same tar members and Parquet rows.

Refactors must not change a byte. A change that alters output on purpose updates
tests/data/output_digests.json in its own commit and says why in the message:

    MERGEMIX_UPDATE_DIGESTS=1 python -m pytest tests/test_output_digest.py

The digests cover every tar member (JSON records parsed) and every Parquet row. Two fields
are left out because they name this machine's temporary paths: `fingerprint` (it hashes the
resolved input path) and `model` (the tiny tower's config path); both are checked elsewhere.
Float saliency depends on the CPU's vector kernels in the last bits, so the recorded
digests apply to the torch version and CPU capability they were recorded with; on another
combination the test says so and skips instead of failing for a reason that is not ours.
"""
from __future__ import annotations

import hashlib
import json
import os
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from pipeline.config import GenerateConfig
from pipeline.run import generate
from stages.methods import METHODS
from stages.validate import validate_output
from tests.conftest import local_ray, sample_demo

pytestmark = pytest.mark.timeout(600)

DIGESTS = Path(__file__).parent / "data" / "output_digests.json"
UPDATE = os.environ.get("MERGEMIX_UPDATE_DIGESTS") == "1"
VOLATILE = ("fingerprint", "model")

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


def environment() -> dict:
    return {"torch": torch.__version__.split("+")[0], "cpu": torch.backends.cpu.get_cpu_capability()}


@pytest.fixture(scope="module", autouse=True)
def ray_local():
    yield from local_ray()


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return sample_demo(tmp_path_factory, n=13, seed=11, name="digest-demo")


@pytest.fixture(scope="module")
def recorded() -> dict:
    data = json.loads(DIGESTS.read_text()) if DIGESTS.is_file() else {"environment": None, "runs": {}}
    yield data
    if UPDATE:
        data["environment"] = environment()
        DIGESTS.parent.mkdir(exist_ok=True)
        DIGESTS.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def _canonical(record: dict) -> str:
    return json.dumps({k: v for k, v in record.items() if k not in VOLATILE}, sort_keys=True, ensure_ascii=False)


def output_digest(out: Path) -> str:
    """sha256 over every tar member (name + bytes; JSON records canonicalised) and every Parquet row."""
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


@pytest.mark.parametrize("name", sorted(RUNS))
def test_output_bytes_unchanged(name, tiny_model_config, demo, tmp_path, recorded):
    out = tmp_path / "out"
    cfg = GenerateConfig.build(dict(
        input=str(demo / "llava.json"), output=str(out), model=str(tiny_model_config), pretrained="none", merge=16,
        samples_per_shard=5, batch_size=4, image_format="png", progress=False, seed=5) | RUNS[name])
    result = generate(cfg)
    assert result.ok and validate_output(out) == []
    assert result.counts == {"ok": 13, "failed": 0, "skipped": 1}  # 13 images + the text-only row
    digest = output_digest(out)
    if UPDATE:
        recorded["runs"][name] = digest
        return
    if recorded["environment"] != environment():
        pytest.skip(f"digests were recorded with {recorded['environment']}, this machine is {environment()}: "
                    "record them here with MERGEMIX_UPDATE_DIGESTS=1 before a refactor")
    assert name in recorded["runs"], f"no digest recorded for {name}: run with MERGEMIX_UPDATE_DIGESTS=1"
    assert digest == recorded["runs"][name], f"{name}: output bytes changed"
    if name in TORCH_TWINS:
        assert digest == recorded["runs"][TORCH_TWINS[name][0]], f"{name}: not the bytes of the pil path"
