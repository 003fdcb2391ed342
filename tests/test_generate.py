"""`generate` end to end on real Ray, real files and a tiny random open_clip tower."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.config import GenerateConfig
from schemas.shard import IMAGE_NEGATIVES
from pipeline.run import generate
from stages.errors import UserError
from stages.mixing.methods import METHODS
from stages.readers.validate import validate_output
from tests.conftest import local_ray, make_image, sample_demo

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module", autouse=True)
def ray_local():
    # --compile in these tests: aot_eager, the same graph capture without inductor's C++ build
    # (half a minute on a cold CI machine).
    yield from local_ray(runtime_env={"env_vars": {"MERGEMIX_COMPILE_BACKEND": "aot_eager"}})


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return sample_demo(tmp_path_factory, n=14, seed=3)


def config(tiny_model_config, input, output, **kw) -> GenerateConfig:
    base = dict(input=str(input), output=str(output), model=str(tiny_model_config), pretrained="none", merge=16,
                samples_per_shard=5, batch_size=4, image_format="png", progress=False, seed=7)
    return GenerateConfig.build(base | kw)


def invoke_generate(tiny_model_config, input, out, *flags):
    """`generate` as the command line runs it, on the tiny tower, in this process (on the module's Ray)."""
    from typer.testing import CliRunner

    from pipeline.cli import app

    args = ["generate", "--input", str(input), "--output", str(out), "--model", str(tiny_model_config),
            "--pretrained", "none", "--merge", "16", "--no-progress", *flags]
    return CliRunner().invoke(app, args, catch_exceptions=False)


def generate_cli(tiny_model_config, input, out, *flags) -> dict:
    """invoke_generate with config()'s settings; it must succeed; the run's counts from run.json."""
    proc = invoke_generate(tiny_model_config, input, out, "--batch-size", "4", "--image-format", "png", "--seed", "7", *flags)
    assert proc.exit_code == 0, proc.output[-3000:]
    return json.loads((Path(out) / "run.json").read_text())["this_run"]["counts"]


def read_rows(out: Path) -> pa.Table:
    tables = [pq.read_table(p) for p in sorted((out / "shards").glob("*.parquet"))]
    return pa.concat_tables(tables).sort_by([("unit", "ascending"), ("index", "ascending")])


def tar_members(out: Path) -> dict[str, bytes]:
    members = {}
    for path in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(path) as tf:
            for m in tf.getmembers():
                members[m.name] = tf.extractfile(m).read()
    return members


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def test_llava_json_end_to_end(tiny_model_config, demo, tmp_path):
    out = tmp_path / "out"
    result = generate(config(tiny_model_config, demo / "llava.json", out, image_root=str(demo)))
    assert result.ok and result.units_written == 3  # 15 inputs / 5 per shard
    assert result.counts == {"ok": 14, "failed": 0, "skipped": 1}
    assert validate_output(out) == []
    rows = read_rows(out).to_pylist()
    assert [r["source_id"] for r in rows] == [f"demo-{i:05d}" for i in range(14)] + ["demo-text-only"]
    skipped = rows[-1]
    assert skipped["status"] == "skipped" and skipped["error"].startswith("no_image")
    ok = [r for r in rows if r["status"] == "ok"]
    for r in ok:
        assert r["prompt"].startswith("What colour is the") and r["answer"].startswith("The ")
        assert r["partner_key"] != r["key"] and r["partner_key"][:6] == r["key"][:6]  # partner from the same unit
        assert r["lam_hat"] == r["kept_patches"] / 64 and r["margin"] == pytest.approx(1 - r["lam_hat"])
        assert r["kept_patches"] == int(r["lam"] * 64)  # area mode: exactly floor(lam * L)
        assert r["merge_total"] == 16 and sum(r["merge_schedule"]) == 16 and r["attn_layer"] == 2
        assert r["activation"] == "GELU" and r["interpolation"] == "bicubic"  # the tiny config, random weights
        assert r["norm_mean"] == [0.48145466, 0.4578275, 0.40821073] and r["norm_std"] == [0.26862954, 0.26130258, 0.27577711]
    run = json.loads((out / "run.json").read_text())
    assert run["fingerprint"] == result.fingerprint and run["totals"]["ok"] == 14


def test_stored_mask_and_winner_are_exactly_what_was_used(tiny_model_config, demo, tmp_path):
    """loser == M * winner + (1 - M) * partner_winner, pixel for pixel, with the stored mask;
    the winner equals the encoder's input pixels recomputed from the source image."""
    from stages.imaging.decode import load_pixels

    out = tmp_path / "out"
    generate(config(tiny_model_config, demo / "llava.json", out, image_root=str(demo)))
    members = tar_members(out)
    rows = {r["key"]: r for r in read_rows(out).to_pylist() if r["status"] == "ok"}
    for key, r in rows.items():
        winner, loser = decode(members[f"{key}.winner.png"]), decode(members[f"{key}.loser.png"])
        partner = decode(members[f"{r['partner_key']}.winner.png"])
        mask = decode(members[f"{key}.mask.png"])
        m = np.kron(mask == 255, np.ones((8, 8), bool))[..., None]
        assert np.array_equal(loser, np.where(m, winner, partner))
        source = demo / "images" / f"{r['source_id'][5:]}.jpg"
        expected, _ = load_pixels(source.read_bytes(), (64, 64), "pad")
        assert np.array_equal(winner, expected)


def test_same_pairs_whatever_the_number_of_workers(tiny_model_config, demo, tmp_path):
    outs = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        generate(config(tiny_model_config, demo / "llava.json", out, image_root=str(demo), workers=workers,
                        image_format="jpg"))
        outs.append(out)
    assert read_rows(outs[0]).equals(read_rows(outs[1]))
    assert tar_members(outs[0]) == tar_members(outs[1])
    for name in ("000000.tar", "000001.tar", "000002.tar"):
        assert (outs[0] / "shards" / name).read_bytes() == (outs[1] / "shards" / name).read_bytes()


def test_resume_completes_an_interrupted_run_and_refuses_other_configs(tiny_model_config, demo, tmp_path):
    out, reference = tmp_path / "out", tmp_path / "ref"
    generate(config(tiny_model_config, demo / "llava.json", reference, image_root=str(demo)))
    cfg = config(tiny_model_config, demo / "llava.json", out, image_root=str(demo))
    generate(cfg)
    # Interrupt: unit 1 lost its commit marker, unit 2 left a temp file behind.
    (out / "shards" / "000001_stats.json").unlink()
    (out / "shards" / ".000002.tar.0123456789ab.tmp").write_bytes(b"partial")
    assert validate_output(out)  # the damage is visible
    result = generate(cfg)
    assert result.units_written == 1 and result.units_skipped == 2
    assert validate_output(out) == []
    assert read_rows(out).equals(read_rows(reference))
    assert tar_members(out) == tar_members(reference)

    with pytest.raises(UserError, match="different configuration"):
        generate(config(tiny_model_config, demo / "llava.json", out, image_root=str(demo), seed=8))
    # Same flags, but the input list changed under them: also a different run.
    copy = tmp_path / "in.json"
    entries = json.loads((demo / "llava.json").read_text())[:6]
    copy.write_text(json.dumps(entries))
    generate(config(tiny_model_config, copy, tmp_path / "copy-out", image_root=str(demo)))
    entries[3]["conversations"][1]["value"] = "A different answer."
    copy.write_text(json.dumps(entries))
    with pytest.raises(UserError, match="different configuration"):
        generate(config(tiny_model_config, copy, tmp_path / "copy-out", image_root=str(demo)))
    redone = generate(config(tiny_model_config, demo / "llava.json", out, image_root=str(demo), seed=8, overwrite=True))
    assert redone.units_written == 3 and validate_output(out) == []


def _write_folder(root: Path, classes=("cat", "dog"), per_class=3) -> None:
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(make_image(10 * c + i)).save(root / name / f"{i}.png")


def test_image_folder_with_class_labels(tiny_model_config, tmp_path):
    _write_folder(tmp_path / "imgs")
    out = tmp_path / "out"
    counts = generate_cli(tiny_model_config, tmp_path / "imgs", out, "--folder-labels", "--samples-per-shard", "6")
    assert counts["ok"] == 6 and validate_output(out) == []
    rows = read_rows(out).to_pylist()
    assert [r["label"] for r in rows] == ["cat"] * 3 + ["dog"] * 3
    by_key = {r["key"]: r for r in rows}
    for r in rows:
        assert r["partner_label"] == by_key[r["partner_key"]]["label"]
        assert 0.0 <= r["lam_hat"] <= 1.0


def test_webdataset_and_manifests(tiny_model_config, tmp_path):
    images = [make_image(i) for i in range(6)]
    encoded = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        encoded.append(buf.getvalue())
    # Webdataset input: image + json, one sample with a txt prompt and a class.
    tar_path = tmp_path / "in-000.tar"
    with tarfile.open(tar_path, "w") as tf:
        for i, data in enumerate(encoded):
            parts = {f"s{i}.png": data}
            if i == 0:
                parts[f"s{i}.txt"] = b"a caption"
                parts[f"s{i}.cls"] = b"3"
            else:
                parts[f"s{i}.json"] = json.dumps({"question": f"q{i}", "answer": f"a{i}"}).encode()
            for name, payload in parts.items():
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
    out = tmp_path / "wds"
    counts = generate_cli(tiny_model_config, tar_path, out, "--samples-per-shard", "6")
    assert counts["ok"] == 6 and validate_output(out) == []
    rows = read_rows(out).to_pylist()
    assert (rows[0]["prompt"], rows[0]["label"]) == ("a caption", "3")
    assert (rows[1]["prompt"], rows[1]["answer"]) == ("q1", "a1")

    # Parquet manifest with image bytes, JSONL manifest with paths: same images -> same pixels.
    pq.write_table(pa.table({"id": [f"p{i}" for i in range(6)], "image_bytes": encoded, "prompt": ["x"] * 6}),
                   tmp_path / "m.parquet")
    (tmp_path / "files").mkdir()
    lines = []
    for i, data in enumerate(encoded):
        (tmp_path / "files" / f"{i}.png").write_bytes(data)
        lines.append(json.dumps({"id": f"j{i}", "image": f"{i}.png", "prompt": "x"}))
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n{not json\n")
    out_pq, out_jl = tmp_path / "pq", tmp_path / "jl"
    generate_cli(tiny_model_config, tmp_path / "m.parquet", out_pq, "--samples-per-shard", "6")
    counts = generate_cli(tiny_model_config, tmp_path / "m.jsonl", out_jl, "--image-root", str(tmp_path / "files"),
                          "--samples-per-shard", "6")
    assert counts == {"ok": 6, "failed": 1, "skipped": 0}
    rows_pq, rows_jl = read_rows(out_pq).to_pylist(), read_rows(out_jl).to_pylist()
    assert rows_jl[-1]["error"].startswith("malformed_row")
    for a, b in zip(rows_pq, rows_jl[:6]):
        assert a["winner_sha256"] == b["winner_sha256"] and a["lam"] == b["lam"]


def test_bad_rows_fail_alone(tiny_model_config, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    for i in range(3):
        Image.fromarray(make_image(i)).save(root / f"{i}.jpg")
    (root / "empty.jpg").write_bytes(b"")
    (root / "text.jpg").write_text("not an image")
    (tmp_path / "secret.jpg").write_bytes((root / "0.jpg").read_bytes())
    os.symlink(tmp_path / "secret.jpg", root / "link.jpg")
    entries = [{"id": str(i), "image": f"{i}.jpg"} for i in range(3)] + [
        {"id": "empty", "image": "empty.jpg"}, {"id": "text", "image": "text.jpg"},
        {"id": "missing", "image": "nope.jpg"}, {"id": "up", "image": "../secret.jpg"},
        {"id": "abs", "image": str(tmp_path / "secret.jpg")}, {"id": "link", "image": "link.jpg"},
        "not an object",
    ]
    (tmp_path / "in.json").write_text(json.dumps(entries))
    out = tmp_path / "out"
    result = generate(config(tiny_model_config, tmp_path / "in.json", out, image_root=str(root), samples_per_shard=4))
    assert result.ok and sum(result.counts.values()) == len(entries)
    reasons = {r["source_id"]: (r["error"] or "").split(":")[0] for r in read_rows(out).to_pylist()}
    assert reasons == {"0": "", "1": "", "2": "", "empty": "empty_file", "text": "not_an_image",
                       "missing": "missing_file", "up": "path_outside_root", "abs": "path_outside_root",
                       "link": "path_outside_root", "row-9": "malformed_row"}
    assert validate_output(out) == []


def _cli_env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}


def test_cli_one_line_errors(tiny_model_config, demo, tmp_path):
    exe = [sys.executable, "-m", "pipeline.cli"]
    cases = [
        (["generate", "--input", str(tmp_path / "nope.json"), "--output", str(tmp_path / "o")], "does not exist"),
        (["generate", "--input", str(demo / "llava.json"), "--output", str(tmp_path / "o"), "--lam", "beta:-1"], "--lam"),
        (["generate", "--input", str(demo / "llava.json"), "--output", str(tmp_path / "o"), "--model", "ViT-B-16",
          "--image-root", str(demo)], "--pretrained PATH"),
        (["generate", "--config", str(tmp_path / "missing.yaml")], "config file"),
        # Towers the method cannot serve, and flags that contradict the weights: refused before any worker starts.
        (["generate", "--input", str(demo / "llava.json"), "--output", str(tmp_path / "o"), "--model", "ViT-B-16-SigLIP",
          "--pretrained", "none"], "cannot give MergeMix saliency: its vision tower is the timm model"),
        (["generate", "--input", str(demo / "llava.json"), "--output", str(tmp_path / "o"), "--no-quick-gelu"],
         "--no-quick-gelu contradicts tag openai"),
        (["generate", "--input", str(demo / "llava.json"), "--output", str(tmp_path / "o"), "--model", "hf-hub:nope"],
         "hf-hub:ORG/REPO"),
        (["generate", "--input", str(demo / "llava.json"), "--output", str(tmp_path / "o"), "--mean", "0.5,0.5"],
         "--mean needs three numbers"),
    ]
    for args, needle in cases:
        proc = subprocess.run(exe + args, capture_output=True, text=True, timeout=120, env=_cli_env())
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr and needle in proc.stderr
        assert proc.stderr.strip().splitlines()[-1].startswith("error: ")


def test_tower_settings_shape_the_pixels_and_the_fingerprint(tiny_model_config, demo, tmp_path):
    """The pad colour is the tower's mean (int(255 * mean)) and the resize its interpolation,
    taken here from a model config's preprocess_cfg; both are in run.json and the fingerprint."""
    from stages.imaging.decode import load_pixels

    cfg = json.loads(tiny_model_config.read_text()) | {
        "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bilinear"}}
    model = tmp_path / "mm-tiny-half.json"
    model.write_text(json.dumps(cfg))
    out = tmp_path / "out"
    result = generate(config(model, demo / "llava.json", out, image_root=str(demo)))
    assert result.ok and validate_output(out) == []
    run = json.loads((out / "run.json").read_text())
    assert run["tower"] | {"settings_from": None} == {
        "model": str(model), "weights": None, "activation": "GELU", "norm_mean": [0.5] * 3, "norm_std": [0.5] * 3,
        "interpolation": "bilinear", "pad_rgb": [127, 127, 127], "settings_from": None}
    members = tar_members(out)
    rows = [r for r in read_rows(out).to_pylist() if r["status"] == "ok"]
    assert {(r["norm_mean"][0], r["norm_std"][2], r["interpolation"]) for r in rows} == {(0.5, 0.5, "bilinear")}
    row = next(r for r in rows if r["orig_size"][0] != r["orig_size"][1])
    source = (demo / "images" / f"{row['source_id'][5:]}.jpg").read_bytes()
    winner = decode(members[f"{row['key']}.winner.png"])
    assert np.array_equal(winner, load_pixels(source, (64, 64), "pad", (127, 127, 127), "bilinear")[0])
    assert not np.array_equal(winner, load_pixels(source, (64, 64), "pad")[0])  # not the OpenAI pad and bicubic
    # Other constants for the same local weights: another output, so a resume is refused.
    with pytest.raises(UserError, match="different configuration"):
        generate(config(model, demo / "llava.json", out, image_root=str(demo), mean="0.4,0.4,0.4"))


def test_cli_run_prints_the_tower_and_worker_warnings_once(tiny_model_config, demo, tmp_path):
    """The driver prints the tower line once; the warnings every encoder actor raises while
    loading (our random-weights warning, open_clip's own) reach the terminal once each; the
    summary says random weights; a local run prints no token-authentication notice."""
    out = tmp_path / "out"
    env = _cli_env()
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "generate", "--no-progress", "--input", str(demo / "llava.json"),
         "--image-root", str(demo), "--output", str(out), "--model", str(tiny_model_config), "--pretrained", "none",
         "--merge", "16", "--samples-per-shard", "5", "--workers", "2"],
        capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    err = proc.stderr
    assert err.count("activation GELU, mean (0.48145466, 0.4578275, 0.40821073)") == 1
    assert err.count("worker: stages.model.factory: RANDOM WEIGHTS") == 1  # two actors, one line
    assert err.count("worker: open_clip: No pretrained weights loaded") == 1
    assert "Token authentication" not in err and "auth_token" not in err
    summary = dict(line.split(None, 1) for line in proc.stdout.splitlines() if line.startswith(("tower", "units")))
    assert "random weights (--pretrained none)" in summary["tower"] and "activation GELU" in summary["tower"]
    assert summary["units"].startswith("3 written")


@pytest.mark.parametrize("method", METHODS)
def test_every_method_is_written_and_validates(tiny_model_config, demo, tmp_path, method):
    """Each --method through the command line as a new user runs it (jpg): every image ok,
    validate clean, and preview draws it. A method whose output cannot be written fails here."""
    from stages.readers.preview import make_contact_sheet

    out = tmp_path / "out"
    proc = run_cli(tiny_model_config, demo, out, "--method", method, "--image-format", "jpg")
    assert proc.exit_code == 0, proc.output[-3000:]
    run = json.loads((out / "run.json").read_text())
    assert not run["failed_units"] and run["this_run"]["counts"] == {"ok": 14, "failed": 0, "skipped": 1}
    assert validate_output(out) == []
    rows = [r for r in read_rows(out).to_pylist() if r["status"] == "ok"]
    assert {r["method"] for r in rows} == {method}
    if method == "mixup" or method in IMAGE_NEGATIVES:  # no patch is kept whole: lam_hat is lam
        assert all(r["kept_patches"] is None and r["lam_hat"] == r["lam"] for r in rows)
    else:
        assert all(r["lam_hat"] == r["kept_patches"] / 64 for r in rows)
    if method in ("cutmix", "resizemix"):  # the box decides the ratio: the row's lam is the area kept
        assert all(r["lam"] == r["lam_hat"] for r in rows)
    assert make_contact_sheet(out, 3, tmp_path / "preview.png").is_file()


# --- the torch image path (--image-ops torch, --device-encode, --compile) through the CLI ----------


def run_cli(tiny_model_config, demo, out, *flags):
    """The demo through `generate`'s command line."""
    return invoke_generate(tiny_model_config, demo / "llava.json", out, "--image-root", str(demo),
                           "--samples-per-shard", "5", "--batch-size", "3", "--seed", "2", *flags)


def _fitted(demo, row) -> np.ndarray:
    from stages.imaging.decode import load_pixels

    return load_pixels((demo / "images" / f"{row['source_id'][5:]}.jpg").read_bytes(), (64, 64), "pad")[0]


def test_cli_torch_image_ops_keep_the_invariants_and_the_pil_pixels(tiny_model_config, demo, tmp_path):
    """--image-ops torch: the actor decodes and fits the JPEGs. Stored winner = the encoder's input
    (the saliency recomputed from it is the row's), loser = the mask's selection, lam_hat = the mask's
    area; on CPU the winners are the pil path's pixels, bit for bit. The image path is recorded in
    run.json, the unit stats and the fingerprint: a pil resume of it is refused."""
    import torch

    from stages.imaging.compose import compose_loser
    from stages.model.factory import load_encoder

    out = tmp_path / "out"
    proc = run_cli(tiny_model_config, demo, out, "--image-ops", "torch", "--image-format", "png")
    assert proc.exit_code == 0, proc.output
    run = json.loads((out / "run.json").read_text())
    assert run["image_ops"] == "torch" and run["config"]["image_ops"] == "torch"
    stats = [json.loads(p.read_text()) for p in sorted((out / "shards").glob("*_stats.json"))]
    assert sum(s["images"]["device_decoded"] for s in stats) == 14
    members = tar_members(out)
    encoder = load_encoder(str(tiny_model_config), "none", merge=16)
    ok = [r for r in read_rows(out).to_pylist() if r["status"] == "ok"]
    assert len(ok) == 14
    for r in ok:
        winner, loser = decode(members[f"{r['key']}.winner.png"]), decode(members[f"{r['key']}.loser.png"])
        mask = decode(members[f"{r['key']}.mask.png"])
        assert np.array_equal(winner, _fitted(demo, r))
        sal = encoder.saliency_from_pixels(torch.from_numpy(winner[None].copy())).grid.flatten()
        np.testing.assert_allclose(r["saliency"], sal.numpy(), rtol=1e-5, atol=1e-7)
        assert np.array_equal(loser, compose_loser(winner, decode(members[f"{r['partner_key']}.winner.png"]), mask))
        assert r["lam_hat"] == (mask == 255).mean() == r["kept_patches"] / 64
    refused = run_cli(tiny_model_config, demo, out, "--image-ops", "pil", "--image-format", "png")
    assert refused.exit_code == 2 and "different configuration" in refused.output


def test_cli_device_encode_and_compile_give_the_write_tasks_bytes(tiny_model_config, demo, tmp_path):
    """--device-encode on CPU encodes in the actor with the writer's own encoder: the tars hold the
    bytes a write task makes of the pil path's pixels. --compile gives the eager saliency. Flags
    that cannot work together are one line each."""
    import torch

    from stages.imaging.compose import compose_loser
    from stages.model.factory import load_encoder
    from stages.imaging.codec import encode_image

    out = tmp_path / "out"
    proc = run_cli(tiny_model_config, demo, out, "--image-ops", "torch", "--device-encode", "--compile")
    assert proc.exit_code == 0, proc.output
    members = tar_members(out)
    ok = [r for r in read_rows(out).to_pylist() if r["status"] == "ok"]
    winners = {r["key"]: _fitted(demo, r) for r in ok}
    encoder = load_encoder(str(tiny_model_config), "none", merge=16)
    for r in ok:
        loser = compose_loser(winners[r["key"]], winners[r["partner_key"]], decode(members[f"{r['key']}.mask.png"]))
        assert members[f"{r['key']}.winner.jpg"] == encode_image(winners[r["key"]], "jpg", 95)
        assert members[f"{r['key']}.loser.jpg"] == encode_image(loser, "jpg", 95)
        sal = encoder.saliency_from_pixels(torch.from_numpy(winners[r["key"]][None].copy())).grid.flatten()
        np.testing.assert_allclose(r["saliency"], sal.numpy(), rtol=1e-5, atol=1e-7)
    stats = json.loads((out / "shards" / "000000_stats.json").read_text())
    assert stats["timings"]["device_encode_s"] > 0 and stats["images"]["device_decoded"] == 5
    wrong = run_cli(tiny_model_config, demo, tmp_path / "x", "--device-encode", "--image-format", "png")
    assert wrong.exit_code == 2 and "--image-format jpg" in wrong.output
    auto_pil = run_cli(tiny_model_config, demo, tmp_path / "y", "--device-encode")  # auto picks pil on CPU
    assert auto_pil.exit_code == 2 and "--image-ops torch" in auto_pil.output
