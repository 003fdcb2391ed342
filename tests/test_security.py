"""Security: nothing is unpickled from untrusted files, YAML is parsed safely, shard member
names are safe and unsafe ones are refused, and `generate` opens nothing outside the image
root and writes nothing outside OUT (checked on every file the driver and its Ray workers open).
"""
from __future__ import annotations

import ast
import io
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline.config import GenerateConfig
from schemas.shard import empty_row, sample_key
from stages.errors import UserError
from stages.training.loader import ShardDataset
from stages.readers.shards import iter_tar_members, resolve_shards
from stages.readers.validate import validate_output
from stages.imaging.compose import PairImages
from stages.output.writer import write_unit
from tests.conftest import make_image

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "stages", "schemas")


class _Payload:
    """Unpickling this creates a directory: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


# --- pickles and YAML ------------------------------------------------------------------------


def _torch_load_calls() -> list[tuple[str, int, str]]:
    """(file, line, weights_only source) for every torch.load call in our packages."""
    calls = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Call) and ast.unparse(node.func) in ("torch.load", "load") and any(
                        k.arg == "map_location" or k.arg == "weights_only" for k in node.keywords):
                    value = next((ast.unparse(k.value) for k in node.keywords if k.arg == "weights_only"), "<missing>")
                    calls.append((str(path.relative_to(REPO)), node.lineno, value))
    return calls


def test_every_torch_load_uses_weights_only():
    calls = _torch_load_calls()
    assert calls  # the scan finds the calls it is meant to check
    assert [c for c in calls if c[2] != "True"] == []


def test_encoder_checkpoint_path_is_not_unpickled(tiny_model_config, tmp_path):
    """A --pretrained PATH that carries code is refused by torch's weights-only loader."""
    from stages.model.factory import load_encoder

    marker = tmp_path / "pwned"
    torch.save({"state_dict": {"x": _Payload(marker)}}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="(?i)weights|unpickl|global"):
        load_encoder(str(tiny_model_config), str(tmp_path / "evil.pt"))
    assert not marker.exists()


def test_train_resume_does_not_unpickle_code(tmp_path):
    from stages.training.train import CHECKPOINT, TrainConfig, train

    run = tmp_path / "run"
    run.mkdir()
    marker = tmp_path / "pwned"
    torch.save({"model": {}, "config": _Payload(marker)}, run / CHECKPOINT)
    try:
        train(TrainConfig(shards=str(tmp_path), output=str(run), resume=True))
    except Exception:
        pass
    assert not marker.exists()


def test_yaml_config_is_parsed_safely(tmp_path):
    marker = tmp_path / "pwned"
    cfg = tmp_path / "evil.yaml"
    cfg.write_text(f"input: x\noutput: !!python/object/apply:os.mkdir [{str(marker)!r}]\n")
    with pytest.raises(UserError, match="not valid YAML"):
        GenerateConfig.build({"config": str(cfg)})
    assert not marker.exists()


# --- shard contents and member names ---------------------------------------------------------


def _write_shard(out: Path, n: int = 3) -> Path:
    """One real unit through the real writer (pixels made here; no Ray needed)."""
    rows, images = [], {}
    for i in range(n):
        key = sample_key(0, i)
        row = empty_row(key=key, source_id=f"../../etc/passwd#{i}", unit=0, index=i, input_index=i, resize_mode="pad")
        row.update(status="ok", partner_key=sample_key(0, (i + 1) % n), lam=0.5, lam_hat=0.5, margin=0.5,
                   grid=[8, 8], image_size=[64, 64], kept_patches=32)
        rows.append(row)
        winner = make_image(i, (64, 64))
        mask = np.zeros((8, 8), np.uint8)
        mask[:4] = 255
        images[key] = PairImages(winner, winner[::-1].copy(), mask)
    write_unit(out, 0, rows, images, image_format="png", fingerprint="f" * 16)
    return out / "shards" / "000000.tar"


MEMBER = re.compile(r"^\d{6}_\d{6}\.(winner\.(png|jpg|webp)|loser\.(png|jpg|webp)|mask\.png|json)$")


def test_our_tars_have_safe_member_names_and_nothing_pickled(tmp_path):
    tar_path = _write_shard(tmp_path / "out")
    with tarfile.open(tar_path) as tf:
        members = tf.getmembers()
        assert members and all(MEMBER.match(m.name) and m.isfile() and m.mode == 0o444 for m in members)
        for m in members:
            data = tf.extractfile(m).read()
            assert not data.startswith(b"\x80") and b"c__builtin__" not in data  # no pickle stream
            if m.name.endswith(".json"):
                json.loads(data)
            else:
                Image.open(io.BytesIO(data)).verify()
    meta = pq.read_metadata(tar_path.with_suffix(".parquet")).metadata or {}
    assert set(meta) <= {b"ARROW:schema", b"mergemix"} or all(not v.startswith(b"\x80") for v in meta.values())
    assert validate_output(tmp_path / "out") != []  # no run files yet, but the unit itself is whole
    assert all(p.startswith(("index.json", "run.json")) for p in validate_output(tmp_path / "out"))


def _tar_with(path: Path, members: list[tarfile.TarInfo], data: bytes = b"{}") -> Path:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
        for info in members:
            if info.isfile():
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
            else:
                tf.addfile(info)
    return path


@pytest.mark.parametrize("name, kind", [
    ("../000000_000000.json", tarfile.REGTYPE),
    ("a/../../000000_000000.json", tarfile.REGTYPE),
    ("/etc/000000_000000.json", tarfile.REGTYPE),
    ("C:\\x\\000000_000000.json", tarfile.REGTYPE),
    ("000000_000000.json", tarfile.SYMTYPE),
    ("000000_000000.json", tarfile.LNKTYPE),
])
def test_reader_refuses_unsafe_members(tmp_path, name, kind):
    info = tarfile.TarInfo(name)
    info.type = kind
    if kind != tarfile.REGTYPE:
        info.linkname = "/etc/passwd"
    tar = _tar_with(tmp_path / "bad.tar", [info])
    with pytest.raises(UserError, match="refusing to read this shard"):
        list(iter_tar_members(resolve_shards(str(tar))[0]))
    with pytest.raises(UserError, match="refusing to read this shard"):
        list(ShardDataset(str(tar)))
    assert not (tmp_path.parent / "000000_000000.json").exists()


def test_loader_never_unpickles_extra_members(tmp_path):
    """A shard with a pickle member added (webdataset would decode .pyd with pickle): our loader
    yields the real samples and never runs the pickle; validate names the stray member."""
    tar_path = _write_shard(tmp_path / "out")
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Payload(marker))
    extended = tmp_path / "extended.tar"
    with tarfile.open(tar_path) as src, tarfile.open(extended, "w", format=tarfile.USTAR_FORMAT) as dst:
        for m in src.getmembers():
            dst.addfile(m, src.extractfile(m))
            if m.name == "000000_000000.json":  # next to the sample's own members
                for ext in ("pyd", "pickle", "pth"):
                    info = tarfile.TarInfo(f"000000_000000.{ext}")
                    info.size = len(payload)
                    dst.addfile(info, io.BytesIO(payload))
    samples = list(ShardDataset(str(extended)))
    assert len(samples) == 3 and not marker.exists()
    shutil.copy(extended, tar_path)
    problems = validate_output(tmp_path / "out")
    assert any("unexpected member 000000_000000.pyd" in p for p in problems) and not marker.exists()


# --- confinement: every file generate opens ----------------------------------------------------

SITECUSTOMIZE = '''
"""Test-only: log every Python-level open of this process (driver or Ray worker)."""
import os, sys
_dir = os.environ.get("MM_AUDIT_DIR")
if _dir:
    _fd = os.open(os.path.join(_dir, f"{os.getpid()}.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def _hook(event, args):
        if event == "open" and not isinstance(args[0], int):
            path = os.path.abspath(os.fsdecode(args[0]))
            os.write(_fd, f"{args[1]}\\t{args[2]}\\t{path}\\n".encode("utf-8", "surrogateescape"))

    sys.addaudithook(_hook)
'''

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _audit_opens(folder: Path) -> list[tuple[int, str, bool]]:
    """(pid, path, for writing) from the audit logs."""
    opens = []
    for log in folder.glob("*.log"):
        for line in log.read_text(errors="surrogateescape").splitlines():
            mode, flags, path = line.split("\t", 2)
            writing = any(c in mode for c in "wax+") if mode != "None" else bool(int(flags) & WRITE_FLAGS)
            opens.append((int(log.stem), path, writing))
    return opens


STRACE_LINE = re.compile(r'^(\d+)\s+(\w+)\((.*)\)\s+=\s+(-?\d+)')
STRACE_WRITE = ("O_WRONLY", "O_RDWR", "O_CREAT", "O_TRUNC", "O_APPEND")


def _strace_opens(log: Path) -> list[tuple[int, str, bool]]:
    """(pid, path, for writing) of every successful path syscall in an `strace -f` log."""
    opens = []
    for line in log.read_text(errors="replace").splitlines():
        m = STRACE_LINE.match(line)
        if not m or int(m.group(4)) < 0:
            continue
        call, args = m.group(2), m.group(3)
        paths = re.findall(r'"((?:[^"\\]|\\.)*)"', args)
        writing = call not in ("open", "openat", "openat2") or any(f in args for f in STRACE_WRITE)
        for path in paths:
            opens.append((int(m.group(1)), os.path.normpath(os.path.join(str(REPO), path)), writing))
    return opens


def _strace_usable() -> bool:
    if not shutil.which("strace"):
        return False
    probe = subprocess.run(["strace", "-f", "-qq", "--seccomp-bpf", "-e", "trace=openat", "-o", "/dev/null", "true"],
                           capture_output=True)
    return probe.returncode == 0


def _inside(path: str, folder: Path) -> bool:
    return os.path.commonpath([path, str(folder)]) == str(folder)


@pytest.mark.timeout(300)
def test_generate_opens_nothing_outside_root_and_writes_nothing_outside_out(tiny_model_config, tmp_path):
    data = tmp_path / "data"
    root, secret, out, home = data / "root", data / "secret", data / "out", data / "home"
    for folder in (root / "sub", secret, home):
        folder.mkdir(parents=True)
    for i in range(4):
        Image.fromarray(make_image(i, (48, 40))).save(root / f"{i}.png")
    Image.fromarray(make_image(9)).save(secret / "s.png")
    os.symlink(secret / "s.png", root / "link.png")
    os.symlink(secret, root / "sub" / "dir-link")
    entries = [{"id": str(i), "image": f"{i}.png"} for i in range(4)] + [
        {"id": "up", "image": "../secret/s.png"}, {"id": "abs", "image": str(secret / "s.png")},
        {"id": "link", "image": "link.png"}, {"id": "dirlink", "image": "sub/dir-link/s.png"},
        {"id": "inner", "image": "sub/../../secret/s.png"},
    ]
    (data / "in.json").write_text(json.dumps(entries))
    audit, hooks = tmp_path / "audit", tmp_path / "hooks"
    audit.mkdir()
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
    scratch = Path(tempfile.mkdtemp(prefix="mmsec", dir="/tmp"))  # short: Ray's socket paths have a length limit
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MERGEMIX_TEST_FAULTS")}
    env.update(PYTHONPATH=f"{hooks}:{REPO}", MM_AUDIT_DIR=str(audit), HOME=str(home), TMPDIR=str(scratch),
               RAY_TMPDIR=str(scratch), PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "pipeline.cli", "generate", "--no-progress", "--input", str(data / "in.json"),
           "--image-root", str(root), "--output", str(out), "--model", str(tiny_model_config), "--pretrained", "none",
           "--merge", "16", "--samples-per-shard", "9", "--image-format", "png"]
    use_strace = _strace_usable()
    trace = tmp_path / "strace.log"
    if use_strace:
        calls = "open,openat,openat2,creat,truncate,rename,renameat,renameat2,mkdir,mkdirat,unlink,unlinkat,link,linkat,symlink,symlinkat"
        cmd = ["strace", "-f", "-qq", "--seccomp-bpf", "-e", f"trace={calls}", "-e", "signal=none", "-o", str(trace)] + cmd
    try:
        proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=280)
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows = pq.read_table(out / "shards" / "000000.parquet").to_pylist()
        assert [r["status"] for r in rows] == ["ok"] * 4 + ["failed"] * 5
        assert {r["error"].split(":")[0] for r in rows[4:]} == {"path_outside_root"}

        opens = _audit_opens(audit)
        drivers = {pid for pid, path, _ in opens if os.path.basename(path).startswith(".run.json.")}  # writes run.json
        input_readers = {pid for pid, path, _ in opens if path == str(data / "in.json")}
        image_readers = {pid for pid, path, _ in opens if _inside(path, root)}
        # The driver lists the input; the prepare tasks read their slices of it and the images:
        # the hook ran in Ray workers too.
        assert len(drivers) == 1 and drivers < input_readers and image_readers and not image_readers & drivers
        if use_strace:
            traced = _strace_opens(trace)
            assert any(w and ".parquet" in p and _inside(p, out) for _, p, w in traced)  # C++ (Arrow) writes seen
            opens += traced

        allowed_writes = (out, scratch, home, audit, Path("/dev"), Path("/proc"))
        bad_writes = sorted({p for _, p, w in opens if w and not any(_inside(p, a) for a in allowed_writes)})
        assert bad_writes == []
        allowed_reads = (root, out, home, data / "in.json")
        bad_reads = sorted({p for _, p, _ in opens if _inside(p, data) and not any(_inside(p, a) for a in allowed_reads)})
        assert bad_reads == [] and not any(_inside(os.path.realpath(p), secret) for _, p, _ in opens)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
