"""The image-side negatives (METHOD.md 4b) through `generate`'s command line, checked on what they
write: each method's statistics from its Parquet rows and PNG members (seeded, so every assertion
is reproducible), the losers rebuilt from the recorded parameters, `validate` clean, resume and
1 vs 2 workers byte-identical, no tower loaded, and the exports carrying the parameters."""
from __future__ import annotations

import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, ImageFilter

from stages.mixing.negatives import make, noise_abar
from stages.model.constants import CLIP_MEAN_RGB, OPENAI_MEAN, OPENAI_STD
from stages.readers.validate import validate_output
from tests.conftest import local_ray, write_photo_set

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module", autouse=True)
def ray_local():
    yield from local_ray()


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    return write_photo_set(tmp_path_factory.mktemp("negatives-photos"), n=24, seed=3)


@pytest.fixture(scope="module")
def many(tmp_path_factory) -> Path:
    """320 small pictures: enough draws for the crop statistics."""
    return write_photo_set(tmp_path_factory.mktemp("negatives-many"), n=320, seed=4, size=48)


@pytest.fixture(scope="module")
def grey(tmp_path_factory) -> Path:
    """Mid-range pictures (values 90..166): the noise's clamping stays rare where the space allows."""
    root = tmp_path_factory.mktemp("negatives-grey")
    rng = np.random.default_rng(5)
    (root / "images").mkdir()
    rows = []
    for i in range(16):
        img = np.clip(128 + rng.normal(0, 12, (80, 80, 3)) + rng.uniform(-20, 20, 3), 90, 166).astype(np.uint8)
        Image.fromarray(img).save(root / "images" / f"{i}.png")
        rows.append({"id": f"g{i}", "image": f"images/{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "Grey."}]})
    (root / "llava.json").write_text(json.dumps(rows))
    return root / "llava.json"


def generate(tiny_model_config, input, out, *flags) -> str:
    from typer.testing import CliRunner

    from pipeline.cli import app

    args = ["generate", "--input", str(input), "--output", str(out), "--model", str(tiny_model_config),
            "--pretrained", "none", "--no-progress", "--image-format", "png", "--samples-per-shard", "8",
            "--seed", "11", *flags]
    proc = CliRunner().invoke(app, args, catch_exceptions=False)
    assert proc.exit_code == 0, proc.output[-3000:]
    assert validate_output(out) == []
    return proc.output


def rows(out: Path) -> list[dict]:
    table = pa.concat_tables([pq.read_table(p) for p in sorted((out / "shards").glob("*.parquet"))])
    return [r for r in table.to_pylist() if r["status"] == "ok"]


def images(out: Path) -> dict[str, np.ndarray]:
    found = {}
    for path in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(path) as tf:
            for m in tf.getmembers():
                if m.name.endswith(".png"):
                    found[m.name.removesuffix(".png")] = np.asarray(Image.open(io.BytesIO(tf.extractfile(m).read())))
    return found


def tar_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "shards").iterdir()) if not p.name.endswith("_stats.json")}


def test_crop_boxes_follow_mdpo(tiny_model_config, many, tmp_path):
    """s ~ U(0.01, 0.20): the drawn share stays in range with mean 0.105 (tolerance 4 standard errors);
    the box's aspect is in [3/4, 4/3] up to rounding its sides; lam is the box's exact pixel share;
    the mask marks the box on the winner, and the loser is that box resized back."""
    out = tmp_path / "out"
    generate(tiny_model_config, many, out, "--method", "crop")
    ok = rows(out)
    assert len(ok) == 320
    params = [json.loads(r["method_params"]) for r in ok]
    scales = np.array([p["scale"] for p in params])
    assert scales.min() >= 0.01 and scales.max() <= 0.20
    se = (0.19 / math.sqrt(12)) / math.sqrt(len(scales))
    assert abs(scales.mean() - 0.105) < 4 * se, scales.mean()
    for p, r in zip(params, ok):
        w, h = p["width"], p["height"]
        assert (w - 0.5) / (h + 0.5) <= 4 / 3 and (w + 0.5) / (h - 0.5) >= 3 / 4, (w, h)
        assert r["lam"] == r["lam_hat"] == h * w / (64 * 64) and r["margin"] == 1 - r["lam"]
    pix = images(out)
    for r, p in list(zip(ok, params))[:20]:
        t, l, h, w = p["top"], p["left"], p["height"], p["width"]
        mask = pix[f"{r['key']}.mask"]
        assert mask.shape == (64, 64) and (mask[t:t + h, l:l + w] == 255).all() and (mask == 255).sum() == h * w
        box = Image.fromarray(pix[f"{r['key']}.winner"][t:t + h, l:l + w]).resize((64, 64), Image.BILINEAR)
        assert np.array_equal(pix[f"{r['key']}.loser"], np.asarray(box))


def _censored_moments(mu: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of clip(Y, 0, 1) for Y ~ N(mu, sigma^2)."""
    a, b = (0 - mu) / sigma, (1 - mu) / sigma
    cdf = lambda z: 0.5 * (1 + torch.special.erf(z / math.sqrt(2)))  # noqa: E731
    pdf = lambda z: torch.exp(-z * z / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    inside = cdf(b) - cdf(a)
    mean = mu * inside + sigma * (pdf(a) - pdf(b)) + (1 - cdf(b))
    second = (mu**2 + sigma**2) * inside + 2 * mu * sigma * (pdf(a) - pdf(b)) + sigma**2 * (a * pdf(a) - b * pdf(b))
    return mean, second + (1 - cdf(b)) - mean**2


@pytest.mark.parametrize("space", ["pixel", "normalized"])
@pytest.mark.parametrize("t", [500, 800])
def test_noise_is_forward_diffusion_at_step_t(tiny_model_config, grey, tmp_path, space, t):
    """Regressing the loser on the winner gives slope sqrt(abar_t) and residual sqrt(1 - abar_t) in the
    space's own units, to 0.03. The stored loser is clamped to [0, 1]: the fit takes that into account
    (the censored normal's mean and variance per winner level), so it holds where clamping is frequent
    too (pixel space at these t clamps a third of the values even on mid-range pictures). Every loser
    is the one its recorded parameters rebuild."""
    out = tmp_path / "out"
    generate(tiny_model_config, grey, out, "--method", "noise", "--noise-step", str(t), "--noise-space", space)
    pix = images(out)
    ok = rows(out)
    winners = np.stack([pix[f"{r['key']}.winner"] for r in ok]).astype(np.float64) / 255
    losers = np.stack([pix[f"{r['key']}.loser"] for r in ok]).astype(np.float64) / 255
    for r in ok[:4]:
        rebuilt = make("noise", pix[f"{r['key']}.winner"], None, json.loads(r["method_params"])).loser
        assert np.array_equal(rebuilt, pix[f"{r['key']}.loser"])
    assert all(r["lam"] == noise_abar(t) for r in ok)
    mean, std = (np.array(OPENAI_MEAN), np.array(OPENAI_STD)) if space == "normalized" else (np.zeros(3), np.ones(3))
    # per winner level (rounded to 1/255) and channel: observed mean and variance of the loser
    levels = np.round(winners * 255).astype(int)
    x, obs_mean, obs_var, weight, chan = [], [], [], [], []
    for c in range(3):
        for v in np.unique(levels[..., c]):
            sel = losers[..., c][levels[..., c] == v]
            if sel.size >= 50:
                x.append(v / 255), obs_mean.append(sel.mean()), obs_var.append(sel.var()), weight.append(sel.size)
                chan.append(c)
    x, obs_mean, obs_var, weight, chan = map(torch.tensor, (x, obs_mean, obs_var, weight, chan))
    best = None
    for a in torch.arange(0.30, 1.0001, 0.005):
        for b in torch.arange(0.30, 1.0001, 0.005):
            # in the space's own units y = a z + b eps, z = (x - mean) / std; back in [0, 1]: a x + (1 - a) mean + b std eps
            mu = a * x + (1 - a) * torch.tensor(mean)[chan]
            m, var = _censored_moments(mu, b * torch.tensor(std)[chan])
            err = float((weight * ((m - obs_mean) ** 2 + (var - obs_var) ** 2)).sum())
            if best is None or err < best[0]:
                best = (err, float(a), float(b))
    _, slope, residual = best
    assert abs(slope - math.sqrt(noise_abar(t))) < 0.03, (slope, math.sqrt(noise_abar(t)))
    assert abs(residual - math.sqrt(1 - noise_abar(t))) < 0.03, (residual, math.sqrt(1 - noise_abar(t)))


@pytest.mark.parametrize("k", [16, 32])
def test_pixelate_is_k_by_k_blocks(tiny_model_config, photos, tmp_path, k):
    out = tmp_path / "out"
    generate(tiny_model_config, photos, out, "--method", "pixelate", "--pixelate", str(k))
    pix = images(out)
    for r in rows(out):
        loser = pix[f"{r['key']}.loser"]
        blocks = loser.reshape(64 // k, k, 64 // k, k, 3)
        assert (blocks == blocks[:, :1, :, :1]).all()  # every pixel equals its block's first
        assert r["lam"] == 1 / k**2 and (pix[f"{r['key']}.mask"] == round(255 / k**2)).all()


def test_image_blur_is_pillows_gaussian_blur(tiny_model_config, photos, tmp_path):
    out = tmp_path / "out"
    generate(tiny_model_config, photos, out, "--method", "image-blur", "--blur-radius", "3")
    pix = images(out)
    for r in rows(out):
        expected = Image.fromarray(pix[f"{r['key']}.winner"]).filter(ImageFilter.GaussianBlur(3.0))
        assert np.array_equal(pix[f"{r['key']}.loser"], np.asarray(expected))


def test_rotate_angle_in_range_and_lam_is_the_winners_share(tiny_model_config, photos, tmp_path):
    out = tmp_path / "out"
    generate(tiny_model_config, photos, out, "--method", "rotate", "--rotate-degrees", "10,80")
    pix = images(out)
    for r in rows(out):
        params = json.loads(r["method_params"])
        assert 10 <= params["angle"] <= 80
        mask, loser = pix[f"{r['key']}.mask"], pix[f"{r['key']}.loser"]
        assert r["lam"] == np.count_nonzero(mask) / mask.size < 1
        assert (loser[mask == 0] == CLIP_MEAN_RGB).all()  # the corners are the pad colour


def test_blank_and_other_are_exact(tiny_model_config, photos, tmp_path):
    out = tmp_path / "blank"
    generate(tiny_model_config, photos, out, "--method", "blank")
    pix = images(out)
    for r in rows(out):
        assert (pix[f"{r['key']}.loser"] == CLIP_MEAN_RGB).all() and r["lam"] == 0 and r["margin"] == 1
        assert (pix[f"{r['key']}.mask"] == 0).all()
    out = tmp_path / "other"
    generate(tiny_model_config, photos, out, "--method", "other")
    pix = images(out)
    for r in rows(out):
        assert np.array_equal(pix[f"{r['key']}.loser"], pix[f"{r['partner_key']}.winner"])
        assert r["partner_key"] != r["key"] and r["lam"] == 0


def test_no_tower_same_bytes_with_two_workers_and_after_a_resume(tiny_model_config, photos, tmp_path):
    """The run says it loads no tower; --workers 2 and a resume of a half-done run write the bytes of
    one worker; the JPEG notice for noise; the knobs of other methods do not enter the fingerprint."""
    one, two = tmp_path / "one", tmp_path / "two"
    said = generate(tiny_model_config, photos, one, "--method", "rotate", "--workers", "1")
    assert "rotate runs no tower" in said and "RANDOM WEIGHTS" not in said
    generate(tiny_model_config, photos, two, "--method", "rotate", "--workers", "2")
    assert tar_bytes(one) == tar_bytes(two)
    (one / "shards" / "000001_stats.json").unlink()  # uncommit a unit: the rerun redoes it alone
    said = generate(tiny_model_config, photos, one, "--method", "rotate", "--pixelate", "8")
    assert "1 written, 3 already committed" in said
    assert tar_bytes(one) == tar_bytes(two)
    noisy = generate(tiny_model_config, photos, tmp_path / "jpg", "--method", "noise",
                     "--image-format", "jpg")
    assert "notice: JPEG smooths away" in noisy


def test_bad_knobs_and_impossible_combinations_are_one_line(tiny_model_config, photos, tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli import app

    base = ["generate", "--input", str(photos), "--output", str(tmp_path / "o"), "--model",
            str(tiny_model_config), "--pretrained", "none", "--no-progress"]
    for flags, words in ((["--method", "crop", "--crop-area", "0.3,0.1"], "--crop-area"),
                         (["--method", "noise", "--noise-step", "1000"], "noise step"),
                         (["--method", "rotate", "--rotate-degrees", "10"], "--rotate-degrees"),
                         (["--method", "noise", "--lam-mode", "paper"], "runs no tower"),
                         (["--method", "blank", "--image-ops", "torch"], "runs no tower")):
        proc = CliRunner().invoke(app, base + flags)
        assert proc.exit_code == 2 and words in proc.output, (flags, proc.output)
        assert "Traceback" not in proc.output and len(proc.output.strip().splitlines()) == 1


def test_exports_carry_the_parameters(tiny_model_config, photos, tmp_path):
    from stages.export.exporter import export

    out = tmp_path / "out"
    generate(tiny_model_config, photos, out, "--method", "crop")
    by_key = {r["key"]: r for r in rows(out)}
    export(str(out), str(tmp_path / "swift"), "swift", progress=False)
    first = json.loads((tmp_path / "swift" / "train.jsonl").read_text().splitlines()[0])
    assert first["method"] == "crop" and first["method_params"] == by_key[first["key"]]["method_params"]
    export(str(out), str(tmp_path / "llava"), "llava", progress=False)
    first = json.loads((tmp_path / "llava" / "llava.json").read_text())[0]
    assert first["method_params"] == by_key[first["id"]]["method_params"]
    export(str(out), str(tmp_path / "hf"), "hf", progress=False)
    data = pq.read_table(sorted((tmp_path / "hf" / "data").glob("*.parquet"))[0]).to_pylist()[0]
    assert json.loads(data["method_params"]) == json.loads(by_key[data["key"]]["method_params"])


def test_inspect_plot_and_preview_show_the_negatives(tiny_model_config, photos, tmp_path):
    """`inspect --plot` and `preview` through the CLI on a crop output: the preview's mask tile is the
    winner untinted inside the recorded box and tinted outside it; its text gives the drawn box."""
    from typer.testing import CliRunner

    from pipeline.cli import app
    from stages.readers.preview import PAD, TILE_H

    out = tmp_path / "out"
    generate(tiny_model_config, photos, out, "--method", "crop")
    runner = CliRunner()
    proc = runner.invoke(app, ["inspect", str(out), "--plot", str(tmp_path / "plot.png")])
    assert proc.exit_code == 0 and "crop" in proc.output and (tmp_path / "plot.png").stat().st_size > 10_000
    proc = runner.invoke(app, ["preview", str(out), "--n", "2", "--output", str(tmp_path / "preview.png")])
    assert proc.exit_code == 0, proc.output
    sheet = np.asarray(Image.open(tmp_path / "preview.png").convert("RGB")).astype(int)
    first = sorted(rows(out), key=lambda r: r["key"])[0]
    box, size = json.loads(first["method_params"]), first["image_size"][0]
    scale = TILE_H / size
    top = 22  # the column titles
    cy, cx = box["top"] + box["height"] // 2, box["left"] + box["width"] // 2
    y = top + int((cy + 0.5) * scale)
    winner = sheet[y, PAD + int((cx + 0.5) * scale)]
    mask_x0 = PAD + 2 * (TILE_H + PAD)
    assert (sheet[y, mask_x0 + int((cx + 0.5) * scale)] == winner).all()  # inside the box: the winner as is
    def inside(y, x):
        return box["top"] <= y < box["top"] + box["height"] and box["left"] <= x < box["left"] + box["width"]

    corner = next(c for c in ((0, 0), (0, size - 1), (size - 1, 0), (size - 1, size - 1)) if not inside(*c))
    yo, xo = (top + int((corner[0] + 0.5) * scale), int((corner[1] + 0.5) * scale))
    red_winner, red_mask = sheet[yo, PAD + xo][0], sheet[yo, mask_x0 + xo][0]
    assert red_mask == int(0.45 * red_winner + 0.55 * 230) or abs(red_mask - (0.45 * red_winner + 0.55 * 230)) <= 1
