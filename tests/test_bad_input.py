"""A corpus of bad and awkward inputs, made here, run through `generate` on real Ray.

Unusable inputs become one `failed` (or `skipped`) row each with a specific reason and the
run goes on; convertible images (CMYK, 16-bit, palette with transparency, grey, EXIF-rotated,
1x1, 1x4000) become `ok` rows with the right pixels. Counts always add up to the inputs.
"""
from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.config import GenerateConfig
from pipeline.run import generate
from stages.model.constants import CLIP_MEAN_RGB
from stages.imaging.decode import decode_rgb
from stages.inputs.records import InputError
from stages.readers.validate import validate_output
from tests.conftest import local_ray, make_image

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(300)  # every test here runs with the module's Ray up


@pytest.fixture(scope="module", autouse=True)
def ray_local():
    yield from local_ray()


# --- corpus builders ----------------------------------------------------------------------


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def raw_png(width: int, height: int, bit_depth: int, colour_type: int, idat: bytes) -> bytes:
    """A PNG from its parts: lets us write 16-bit RGB (which PIL cannot) and lying headers."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def rgb48_png(rgb16: np.ndarray) -> bytes:
    """16 bits per channel RGB PNG of an (H, W, 3) uint16 array."""
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in rgb16)
    return raw_png(rgb16.shape[1], rgb16.shape[0], 16, 2, zlib.compress(rows))


def bomb_png(width: int, height: int) -> bytes:
    """Declares width x height RGB, carries a few hundred bytes: decoding would need w*h*3 bytes."""
    return raw_png(width, height, 8, 2, zlib.compress(b"\x00" * 1000))


def bomb_jpeg() -> bytes:
    """A real JPEG whose frame header is rewritten to declare 65000 x 65000."""
    data = bytearray(encode(Image.new("RGB", (16, 16), (1, 2, 3)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", 65000, 65000)
    return bytes(data)


def halves(size, left, right, mode="RGB") -> Image.Image:
    """Left half one colour, right half another."""
    w, h = size
    img = Image.new(mode, size, right)
    img.paste(left, (0, 0, w // 2, h))
    return img


def exif_rotated_jpeg() -> bytes:
    """Stored 48 wide x 32 high, left red / right blue, with EXIF Orientation 6 (rotate 90 CW
    to display): shown upright it is 32 wide x 48 high, red on top, blue below."""
    img = halves((48, 32), (255, 0, 0), (0, 0, 255))
    exif = img.getexif()
    exif[0x0112] = 6
    return encode(img, "JPEG", quality=95, exif=exif.tobytes())


def build_corpus(base: Path) -> tuple[Path, Path, list]:
    """Image root + LLaVA JSON covering every kind. Returns (json, root, entries)."""
    root = base / "root"
    (root / "sub").mkdir(parents=True)
    good = encode(Image.fromarray(make_image(0, (40, 40))), "JPEG", quality=95)
    files = {f"good{i}.jpg": encode(Image.fromarray(make_image(i, (40, 40))), "JPEG", quality=95) for i in range(3)}
    files |= {
        "truncated.jpg": good[: len(good) // 2],
        "empty.jpg": b"",
        "text.jpg": b"this is not an image\n",
        "cmyk.jpg": encode(halves((32, 32), (0, 255, 255, 0), (255, 0, 255, 0), "CMYK"), "JPEG", quality=95),
        "grey16.png": encode(Image.fromarray(np.tile(np.linspace(0, 65535, 32).astype(np.uint16), (32, 1))), "PNG"),
        "rgb48.png": rgb48_png(np.broadcast_to(np.array([65535, 32768, 0], np.uint16), (32, 32, 3))),
        "palette.png": b"",  # filled below
        "grey.png": encode(Image.new("L", (32, 32), 77), "PNG"),
        "exif.jpg": exif_rotated_jpeg(),
        "one.png": encode(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"),
        "tall.png": encode(Image.new("RGB", (1, 4000), (200, 10, 10)), "PNG"),
        "bomb.png": bomb_png(100_000, 100_000),
        "bomb95m.png": bomb_png(10_000, 9_500),  # over our 90 M limit, under Pillow's own 2x89 M error
        "bomb.jpg": bomb_jpeg(),
        "sub/ok.png": encode(Image.fromarray(make_image(7, (32, 32))), "PNG"),
    }
    pal = Image.new("P", (32, 32), 0)
    pal.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    pal.paste(1, (0, 0, 16, 32))  # left half index 1 (opaque green), right half index 0 (transparent)
    files["palette.png"] = encode(pal, "PNG", transparency=0)
    for name, data in files.items():
        (root / name).write_bytes(data)
    (base / "secret.jpg").write_bytes(good)
    os.symlink(base / "secret.jpg", root / "link.jpg")
    os.symlink("../secret.jpg", root / "rel-link.jpg")
    os.mkfifo(root / "fifo.jpg")  # opening it for reading would wait for a writer forever
    (root / "dir.jpg").mkdir()

    def row(id_, image, prompt="What is shown?"):
        entry = {"id": id_, "conversations": [{"from": "human", "value": f"<image>\n{prompt}"}, {"from": "gpt", "value": "An image."}]}
        if image is not None:
            entry["image"] = image
        return entry

    entries = [row(f"good{i}", f"good{i}.jpg") for i in range(3)] + [
        row("truncated", "truncated.jpg"),
        row("empty", "empty.jpg"),
        row("text", "text.jpg"),
        row("cmyk", "cmyk.jpg"),
        row("grey16", "grey16.png"),
        row("rgb48", "rgb48.png"),
        row("palette", "palette.png"),
        row("grey", "grey.png"),
        row("exif", "exif.jpg"),
        row("one", "one.png"),
        row("tall", "tall.png"),
        row("bomb", "bomb.png"),
        row("bomb95m", "bomb95m.png"),
        row("bombjpg", "bomb.jpg"),
        row("missing", "nope.jpg"),
        row("dotdot", "../secret.jpg"),
        row("dotdot-inner", "sub/../../secret.jpg"),
        row("absolute", str(base / "secret.jpg")),
        row("home", "~/secret.jpg"),
        row("symlink", "link.jpg"),
        row("rel-symlink", "rel-link.jpg"),
        "not an object",
        {"id": "image-not-str", "image": 5},
        {"id": "bad-conv", "image": "good0.jpg", "conversations": "hello"},
        row("text-only", None),
        row("dup", "good1.jpg"),
        row("dup", "good2.jpg"),
        row("a.b.c", "good0.jpg"),
        row("x/../y/z", "sub/ok.png"),
        row("ünï/😀 id", "good1.jpg"),
        row("surrogate", "good2.jpg", prompt="lone \ud800 surrogate"),
        row("bad-utf8", "good0.jpg", prompt="PLACEHOLDER"),
        row("surrogate-path", "x\ud800.jpg"),
        row("fifo", "fifo.jpg"),
        row("dir", "dir.jpg"),
    ]
    text = json.dumps(entries, ensure_ascii=True)  # keeps "\ud800" as an escape: valid JSON, invalid UTF-8 once decoded
    raw = text.encode().replace(b"PLACEHOLDER", b"caf\xe9 \xff\xfe")  # raw Latin-1 bytes in a UTF-8 file
    (base / "corpus.json").write_bytes(raw)
    return base / "corpus.json", root, entries


EXPECTED = {  # source id -> (status, reason); ok rows have no reason
    "good0": ("ok", None), "good1": ("ok", None), "good2": ("ok", None),
    "truncated": ("failed", "corrupt_image"),
    "empty": ("failed", "empty_file"),
    "text": ("failed", "not_an_image"),
    "cmyk": ("ok", None), "grey16": ("ok", None), "rgb48": ("ok", None), "palette": ("ok", None),
    "grey": ("ok", None), "exif": ("ok", None), "one": ("ok", None), "tall": ("ok", None),
    "bomb": ("failed", "too_large"), "bomb95m": ("failed", "too_large"), "bombjpg": ("failed", "too_large"),
    "missing": ("failed", "missing_file"),
    "dotdot": ("failed", "path_outside_root"), "dotdot-inner": ("failed", "path_outside_root"),
    "absolute": ("failed", "path_outside_root"), "home": ("failed", "path_outside_root"),
    "symlink": ("failed", "path_outside_root"), "rel-symlink": ("failed", "path_outside_root"),
    "row-24": ("failed", "malformed_row"), "image-not-str": ("failed", "malformed_row"),
    "bad-conv": ("failed", "malformed_row"),
    "text-only": ("skipped", "no_image"),
    "dup": ("ok", None),
    "a.b.c": ("ok", None), "x/../y/z": ("ok", None), "ünï/😀 id": ("ok", None),
    "surrogate": ("ok", None), "bad-utf8": ("ok", None), "surrogate-path": ("failed", "read_error"),
    "fifo": ("failed", "not_a_file"), "dir": ("failed", "not_a_file"),
}


def config(tiny_model_config, input, output, **kw) -> GenerateConfig:
    base = dict(input=str(input), output=str(output), model=str(tiny_model_config), pretrained="none", merge=16,
                samples_per_shard=64, batch_size=8, image_format="png", progress=False, seed=1)
    return GenerateConfig.build(base | kw)


def read_rows(out: Path) -> list[dict]:
    tables = [pq.read_table(p) for p in sorted((out / "shards").glob("*.parquet"))]
    return pa.concat_tables(tables).sort_by([("unit", "ascending"), ("index", "ascending")]).to_pylist()


def winners(out: Path) -> dict[str, np.ndarray]:
    images = {}
    for path in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(path) as tf:
            for m in tf.getmembers():
                if m.name.endswith(".winner.png"):
                    images[m.name.split(".")[0]] = np.asarray(Image.open(tf.extractfile(m)))
    return images


@pytest.fixture(scope="module")
def corpus_run(tiny_model_config, tmp_path_factory):
    base = tmp_path_factory.mktemp("corpus")
    path, root, entries = build_corpus(base)
    out = base / "out"
    result = generate(config(tiny_model_config, path, out, image_root=str(root)))
    return result, out, entries


# --- the corpus through generate ------------------------------------------------------------


@pytest.mark.timeout(240)
def test_every_kind_gets_its_row_and_reason(corpus_run):
    result, out, entries = corpus_run
    assert result.ok and result.units_written == 1
    rows = read_rows(out)
    assert len(rows) == len(entries)
    assert sum(result.counts.values()) == len(entries)
    got = {}
    for r in rows:
        reason = r["error"].split(":")[0] if r["error"] else None
        got.setdefault(r["source_id"], set()).add((r["status"], reason))
    assert got == {k: {v} for k, v in EXPECTED.items()}
    for r in rows:
        if r["status"] != "ok":  # a reason and a detail, e.g. "too_large: declared size 100000x100000 ..."
            assert ": " in r["error"] and len(r["error"].split(": ", 1)[1]) > 3, r
    run = json.loads((out / "run.json").read_text())
    totals = run["totals"]
    assert totals["ok"] + totals["failed"] + totals["skipped"] == run["inputs"] == len(entries)
    assert totals["errors"]["path_outside_root"] == 6 and totals["errors"]["too_large"] == 3
    assert validate_output(out) == []


@pytest.mark.timeout(240)
def test_convertible_images_have_the_right_pixels(corpus_run):
    _, out, _ = corpus_run
    rows = {r["source_id"]: r for r in read_rows(out) if r["status"] == "ok"}
    px = {sid: winners(out)[r["key"]].astype(int) for sid, r in rows.items()}

    def near(value, colour, tol=12):
        return np.abs(np.asarray(value) - np.asarray(colour)).max() <= tol

    # CMYK: left half pure red, right half pure green (not inverted, not washed out).
    assert near(px["cmyk"][32, 10], (255, 0, 0)) and near(px["cmyk"][32, 54], (0, 255, 0))
    # 16-bit grey gradient: scaled to 8 bits, dark on the left, bright on the right, not clipped white.
    row = px["grey16"][32, :, 0]
    assert row[2] < 20 and row[-3] > 235 and np.all(np.diff(row[4:-4]) >= 0) and (px["grey16"] == 255).mean() < 0.2
    assert near(px["rgb48"][32, 32], (255, 128, 0), tol=2)
    # Palette with transparency: opaque half keeps its colour, transparent half becomes the pad colour.
    assert near(px["palette"][32, 10], (0, 255, 0), 2) and near(px["palette"][32, 54], CLIP_MEAN_RGB, 2)
    assert near(px["grey"][32, 32], (77, 77, 77), 1) and (px["grey"][..., 0] == px["grey"][..., 2]).all()
    # EXIF orientation 6 applied: upright 32 x 48 (w x h) with red on top, blue at the bottom.
    assert rows["exif"]["orig_size"] == [48, 32]
    assert near(px["exif"][8, 32], (255, 0, 0), 30) and near(px["exif"][56, 32], (0, 0, 255), 30)
    assert near(px["exif"][32, 2], CLIP_MEAN_RGB, 2)  # padded left and right: it is tall now
    assert (px["one"] == (200, 10, 10)).all(axis=-1).all() and rows["one"]["orig_size"] == [1, 1]
    assert rows["tall"]["orig_size"] == [4000, 1] and px["tall"].shape == (64, 64, 3)
    for sid in px:
        assert rows[sid]["image_size"] == [64, 64]


@pytest.mark.timeout(240)
def test_ids_and_text_survive_as_data_and_keys_stay_valid(corpus_run):
    _, out, _ = corpus_run
    rows = read_rows(out)
    keys = [r["key"] for r in rows]
    assert len(set(keys)) == len(keys)
    assert all(len(k) == 13 and k[6] == "_" and k.replace("_", "").isdigit() for k in keys)
    by_id: dict[str, list] = {}
    for r in rows:
        by_id.setdefault(r["source_id"], []).append(r)
    assert len(by_id["dup"]) == 2 and by_id["dup"][0]["key"] != by_id["dup"][1]["key"]
    assert by_id["dup"][0]["winner_sha256"] != by_id["dup"][1]["winner_sha256"]  # both kept, different images
    assert {"a.b.c", "x/../y/z", "ünï/😀 id"} <= set(by_id)
    assert "\ufffd" in by_id["surrogate"][0]["prompt"]  # lone surrogate replaced, row kept
    assert by_id["bad-utf8"][0]["prompt"].startswith("caf\ufffd")  # undecodable bytes replaced
    with tarfile.open(out / "shards" / "000000.tar") as tf:
        names = tf.getnames()
        records = [json.loads(tf.extractfile(n).read()) for n in names if n.endswith(".json")]
    assert all(n.split(".", 1)[0] in keys and "/" not in n and ".." not in n for n in names)
    assert {r["source_id"] for r in records} >= {"a.b.c", "x/../y/z", "ünï/😀 id"}


@pytest.mark.timeout(240)
def test_torch_image_ops_give_every_input_the_same_row_and_pixels(corpus_run, tiny_model_config):
    """--image-ops torch: plain JPEGs are decoded in the encoder actor; everything else (CMYK,
    16-bit, palette, EXIF-rotated, PNG, truncated or oversize JPEGs) still goes through PIL in the
    prepare task. Every row gets the pil run's status and error, and every winner its pixels."""
    _, pil_out, entries = corpus_run
    base = pil_out.parent
    out = base / "out-torch"
    result = generate(config(tiny_model_config, base / "corpus.json", out, image_root=str(base / "root"),
                             image_ops="torch"))
    assert result.ok and validate_output(out) == []
    fields = ("source_id", "status", "error", "orig_size", "partner_key", "lam", "kept_patches")
    assert [[r[f] for f in fields] for r in read_rows(out)] == [[r[f] for f in fields] for r in read_rows(pil_out)]
    got, ref = winners(out), winners(pil_out)
    assert sorted(got) == sorted(ref) and all(np.array_equal(got[k], ref[k]) for k in ref)
    stats = json.loads((out / "shards" / "000000_stats.json").read_text())
    assert stats["images"] == {"host_decoded": 9, "device_decoded": 9, "device_refused": 0, "failed": 0}


# --- other readers -------------------------------------------------------------------------


@pytest.mark.timeout(240)
def test_jsonl_and_webdataset_bad_rows(tiny_model_config, tmp_path):
    good = [encode(Image.fromarray(make_image(i, (32, 32))), "PNG") for i in range(3)]
    files = tmp_path / "files"
    files.mkdir()
    for i, data in enumerate(good):
        (files / f"{i}.png").write_bytes(data)
    lines = [json.dumps({"id": f"j{i}", "image": f"{i}.png", "prompt": "q"}).encode() for i in range(3)]
    lines += [b"{not json", b"[1, 2]", json.dumps({"id": "noimg", "prompt": "text only"}).encode(),
              b'{"id": "latin1", "image": "0.png", "prompt": "caf\xe9"}', b'{"id": "esc", "image": "../0.png"}']
    (tmp_path / "m.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "jl"
    result = generate(config(tiny_model_config, tmp_path / "m.jsonl", out, image_root=str(files)))
    rows = read_rows(out)
    assert sum(result.counts.values()) == len(rows) == 8
    reasons = {r["source_id"]: (r["status"], (r["error"] or "").split(":")[0]) for r in rows}
    assert reasons == {"j0": ("ok", ""), "j1": ("ok", ""), "j2": ("ok", ""), "line-4": ("failed", "malformed_row"),
                       "line-5": ("failed", "malformed_row"), "noimg": ("skipped", "no_image"),
                       "latin1": ("ok", ""), "esc": ("failed", "path_outside_root")}

    # Webdataset input: a truncated image member, undecodable text, a broken json member,
    # and member names that try to climb out (read from the tar only, never extracted).
    tar_path = tmp_path / "in.tar"
    members = {"a.png": good[0], "a.txt": b"caption \xff", "b.png": good[1], "b.json": b"{broken",
               "c.png": good[2][:40], "../evil.png": good[0], "/abs/x.png": good[1], "d.png": good[2]}
    with tarfile.open(tar_path, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    out = tmp_path / "wds"
    result = generate(config(tiny_model_config, tar_path, out))
    rows = read_rows(out)
    assert sum(result.counts.values()) == len(rows) == 6
    reasons = {r["source_id"]: (r["status"], (r["error"] or "").split(":")[0]) for r in rows}
    assert reasons == {"a": ("ok", ""), "b": ("failed", "malformed_row"), "c": ("failed", "corrupt_image"),
                       "../evil": ("ok", ""), "/abs/x": ("ok", ""), "d": ("ok", "")}
    assert rows[0]["prompt"] == "caption \ufffd"
    assert not (tmp_path / "evil.png").exists() and not Path("/abs/x.png").exists()
    assert validate_output(out) == []


# --- decoding limits, outside Ray -------------------------------------------------------------


def test_truncated_jpeg_is_refused_not_padded():
    """Pillow's LOAD_TRUNCATED_IMAGES stays off: a cut JPEG is corrupt, not grey-filled."""
    data = encode(Image.fromarray(make_image(3, (120, 90))), "JPEG", quality=90)
    for cut in (len(data) // 2, len(data) - 200, 400):
        with pytest.raises(InputError, match="corrupt_image"):
            decode_rgb(data[:cut])
    png = encode(Image.fromarray(make_image(3, (20, 20))), "PNG")
    with pytest.raises(InputError, match="corrupt_image: PNG header"):  # cut inside the header
        decode_rgb(png[:12])
    with pytest.raises(InputError, match="not_an_image"):
        decode_rgb(b"<html>not found</html>\n")


def test_decompression_bombs_are_refused_before_decoding(tmp_path):
    """In a process capped at 1 GiB of address space: decoding any of these would need far more
    (100000^2 x 3 bytes = 30 GB; 65000^2 x 3 = 12 GB; 10000 x 9500 x 3 = 285 MB, then fail as
    corrupt), so a fast `too_large` proves the size check ran on the header alone."""
    bombs = [bomb_png(100_000, 100_000), bomb_png(10_000, 9_500), bomb_jpeg()]
    for i, data in enumerate(bombs):
        assert len(data) < 2000
        (tmp_path / f"{i}.bin").write_bytes(data)
    code = """
import resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
from pathlib import Path
from stages.imaging.decode import decode_rgb
from stages.inputs.records import InputError
for path in sorted(Path(sys.argv[1]).glob("*.bin")):
    t = time.perf_counter()
    try:
        decode_rgb(path.read_bytes())
        print("decoded")
    except InputError as exc:
        print(exc.reason, round(time.perf_counter() - t, 3))
"""
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120,
                          env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().split("\n")
    assert len(lines) == 3
    for line in lines:
        reason, seconds = line.split()
        assert reason == "too_large" and float(seconds) < 0.5, line
