"""Tests for stages.mixing.masks: masks, partners, ratios and loser pixels for every method."""
from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stages.mixing import masks, methods, ratios
from stages.imaging.compose import compose_loser
from stages.errors import UserError
from tests.conftest import make_image

GRID = (4, 6)  # non-square on purpose: catches row/column mix-ups
PATCH = (3, 2)
L = GRID[0] * GRID[1]
H, W = GRID[0] * PATCH[0], GRID[1] * PATCH[1]
SEED = 1234


def batch(n: int = 8, k_tokens: int = 10, offset: int = 0):
    """Images, keys, lam, partner and encoder-like outputs for n samples (generated, deterministic)."""
    keys = [f"{i + offset:06d}" for i in range(n)]
    pixels = torch.from_numpy(np.stack([make_image(i + offset, size=(W, H)) for i in range(n)]))
    rng = np.random.default_rng(7 + offset)
    # source: every token owns at least one patch; token scores are random
    source = np.stack([rng.permutation(np.r_[np.arange(k_tokens), rng.integers(0, k_tokens, L - k_tokens)])
                       for _ in range(n)])
    token_scores = torch.from_numpy(rng.random((n, k_tokens)))
    source = torch.from_numpy(source).long()
    saliency = token_scores.gather(1, source)
    lam = torch.from_numpy(ratios.sample_lams(ratios.LamSpec("beta", 1.0), SEED, keys))
    partner = torch.from_numpy(ratios.derangement(keys, SEED))
    return dict(pixels=pixels, keys=keys, lam=lam, partner=partner, token_scores=token_scores,
                source=source, saliency=saliency)


def run(method: str, d: dict, **kw) -> masks.MixResult:
    return masks.make_losers(method, d["pixels"], d["partner"], d["lam"], grid=GRID, patch=PATCH, keys=d["keys"],
                           seed=SEED, saliency=d["saliency"], token_scores=d["token_scores"], source=d["source"], **kw)


def losers(r: masks.MixResult, d: dict) -> torch.Tensor:
    """Every sample's loser: shipped by make_losers (blends, blurs, resized pastes), or composed
    from the mask by the one patch-selection composer, stages.imaging.compose."""
    if r.loser is not None:
        return r.loser
    px, partner = d["pixels"].cpu().numpy(), d["partner"].cpu().numpy()
    mask = r.mask.cpu().numpy()
    return torch.from_numpy(np.stack([compose_loser(px[i], px[partner[i]], mask[i]) for i in range(len(partner))]))


def np_upsample(grid_mask: np.ndarray) -> np.ndarray:
    return np.kron(grid_mask, np.ones(PATCH, dtype=grid_mask.dtype)).astype(bool)


# ----------------------------------------------------------------------------- ratios and partners

def test_parse_lam_spec_accepts_the_three_forms():
    assert ratios.parse_lam_spec("beta:1.0") == ratios.LamSpec("beta", 1.0)
    assert ratios.parse_lam_spec("uniform:0.2,0.8") == ratios.LamSpec("uniform", 0.2, 0.8)
    assert ratios.parse_lam_spec(" Fixed:0.5") == ratios.LamSpec("fixed", 0.5)
    assert str(ratios.parse_lam_spec("uniform:0.2,0.8")) == "uniform:0.2,0.8"


@pytest.mark.parametrize("text", ["beta", "beta:", "beta:0", "beta:-1", "beta:1,2", "gamma:1", "uniform:0.5",
                                  "uniform:0.8,0.2", "uniform:0,1.5", "fixed:1.5", "fixed:nan", "fixed:abc", ""])
def test_parse_lam_spec_rejects_bad_text(text):
    with pytest.raises(ValueError, match="lam|beta|uniform|fixed") as info:
        ratios.parse_lam_spec(text)
    assert isinstance(info.value, UserError)  # the CLI prints it as one line
    assert "\n" not in str(info.value)


def test_sample_lams_are_per_key_and_independent_of_batching():
    keys = [f"{i:06d}" for i in range(40)]
    for spec in (ratios.LamSpec("beta", 1.0), ratios.LamSpec("beta", 0.4), ratios.LamSpec("uniform", 0.2, 0.8)):
        full = ratios.sample_lams(spec, SEED, keys)
        assert full.dtype == np.float64 and full.shape == (40,)
        assert np.all((full >= spec.a if spec.kind == "uniform" else full >= 0) & (full <= 1))
        assert np.array_equal(np.r_[ratios.sample_lams(spec, SEED, keys[:13]), ratios.sample_lams(spec, SEED, keys[13:])], full)
        assert np.array_equal(ratios.sample_lams(spec, SEED, keys[::-1]), full[::-1])
        assert len(np.unique(full)) == 40
        assert not np.array_equal(ratios.sample_lams(spec, SEED + 1, keys), full)
    assert np.array_equal(ratios.sample_lams(ratios.LamSpec("fixed", 0.3), SEED, keys), np.full(40, 0.3))


def test_sample_rng_is_stable_across_processes():
    here = ratios.sample_rng(5, "000017", "lam").random(3)
    code = "from stages.mixing.ratios import sample_rng; print(repr(sample_rng(5, '000017', 'lam').random(3).tolist()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "99"}, cwd=Path(masks.__file__).parents[2])
    assert eval(out.stdout) == here.tolist()
    assert not np.array_equal(ratios.sample_rng(5, "000017", "random").random(3), here)  # purposes are independent
    # the derivation is part of the shard contract (same seed -> same pairs on any release): pin it
    entropy = int.from_bytes(hashlib.sha256(json.dumps([5, "000017", "lam"], separators=(",", ":")).encode()).digest(), "little")
    ref = np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy))).random(3)
    assert np.array_equal(ref, here)


def test_derangement_has_no_fixed_points_and_is_deterministic():
    for n in range(2, 51):
        keys = [f"k{i:04d}" for i in range(n)]
        p = ratios.derangement(keys, SEED)
        assert p.dtype == np.int64
        assert sorted(p.tolist()) == list(range(n))
        assert np.all(p != np.arange(n))
        assert np.array_equal(ratios.derangement(keys, SEED), p)
        # depends on the set of keys only: shuffling the input shuffles the answer consistently
        perm = np.random.default_rng(n).permutation(n)
        q = ratios.derangement([keys[i] for i in perm], SEED)
        assert [keys[perm[j]] for j in q] == [keys[p[i]] for i in perm]
    assert ratios.derangement(["only"], SEED).tolist() == [0]
    keys = [f"k{i:04d}" for i in range(30)]
    assert not np.array_equal(ratios.derangement(keys, 1), ratios.derangement(keys, 2))


def test_lam_hat_modes():
    keys = [f"{i:06d}" for i in range(6)]
    lam = np.array([0.0, 0.1, 0.35, 0.5, 0.9, 1.0])
    kept = np.floor(lam * L) / L
    assert np.array_equal(ratios.lam_hats("area", lam, kept, tokens_kept=12, num_patches=L, seed=SEED, keys=keys), kept)
    assert np.array_equal(ratios.lam_hats("fixed", lam, kept, tokens_kept=12, num_patches=L, seed=SEED, keys=keys), lam)
    paper = ratios.lam_hats("paper", lam, kept, tokens_kept=12, num_patches=L, seed=SEED, keys=keys)
    assert paper.shape == (6,) and np.all((paper >= 0) & (paper <= 1))
    assert paper.min() == 0 and 0.999 < paper.max() < 1  # min-max over the group with tau = 1e-5
    # z is drawn per key from its own generator: reproduce it by hand
    z = np.array([ratios.sample_rng(SEED, k, "paper").normal(12 / L, 1.0) for k in keys])
    assert np.allclose(paper, (z - z.min()) / (z.max() - z.min() + 1e-5))
    # std = p / sum(M) when the mask does not keep p patches (mergemix-official); 1 when sum(M) == 0
    kept2 = np.array([0.0, 1 / L, 4 / L, 6 / L, 1.0, 1.0])
    p, sum_m = np.floor(lam * L), np.rint(kept2 * L)
    std = np.where(sum_m > 0, p / np.maximum(sum_m, 1), 1.0)
    z = np.array([ratios.sample_rng(SEED, k, "paper").normal(12 / L, sd) for k, sd in zip(keys, std)])
    paper2 = ratios.lam_hats("paper", lam, kept2, tokens_kept=12, num_patches=L, seed=SEED, keys=keys)
    assert np.allclose(paper2, (z - z.min()) / (z.max() - z.min() + 1e-5)) and not np.allclose(paper2, paper)
    assert np.array_equal(ratios.lam_hats("paper", lam, kept, tokens_kept=12, num_patches=L, seed=SEED, keys=keys), paper)
    with pytest.raises(ValueError, match="lam_hat mode"):
        ratios.lam_hats("areas", lam, kept, tokens_kept=12, num_patches=L, seed=SEED, keys=keys)
    with pytest.raises(ValueError, match="lam"):
        ratios.lam_hats("area", lam + 0.5, kept, tokens_kept=12, num_patches=L, seed=SEED, keys=keys)
    with pytest.raises(ValueError, match="kept"):
        ratios.lam_hats("area", lam, kept[:3], tokens_kept=12, num_patches=L, seed=SEED, keys=keys)


# ----------------------------------------------------------------------------- masks

def test_topk_patch_mask_kept_area_is_exact():
    rng = np.random.default_rng(0)
    for n_patches in (1, 7, 24, 196, 576):
        lam = np.r_[0.0, 1.0, 0.5, 1e-9, 1 - 1e-12, rng.random(200)]
        scores = torch.from_numpy(rng.random((lam.size, n_patches)))
        m = masks.topk_patch_mask(scores, torch.from_numpy(lam))
        assert m.dtype == torch.bool and m.shape == (lam.size, n_patches)
        counts = m.sum(1).numpy()
        assert np.array_equal(counts, np.floor(lam * n_patches).astype(int))
        assert np.array_equal(counts / n_patches, np.floor(lam * n_patches) / n_patches)
        # the kept patches are the highest-scoring ones
        for row, c in zip(range(5, 10), counts[5:10]):
            if 0 < c < n_patches:
                assert scores[row][m[row]].min() > scores[row][~m[row]].max()


def test_topk_patch_mask_breaks_ties_by_lower_index():
    scores = torch.tensor([[1.0, 5.0, 5.0, 2.0, 5.0, 5.0], [0.0] * 6])
    m = masks.topk_patch_mask(scores, torch.tensor([0.5, 0.5], dtype=torch.float64))
    assert m.tolist() == [[False, True, True, False, True, False], [True, True, True, False, False, False]]
    # a grid-sized row with many ties (unstable sorts reorder these)
    s = torch.zeros(2, 576, dtype=torch.float64)
    s[:, ::7] = 1.0
    m = masks.topk_patch_mask(s, torch.tensor([0.25, 0.5], dtype=torch.float64))
    ones = np.arange(0, 576, 7)
    for row, p in enumerate((144, 288)):
        expected = np.r_[ones, np.setdiff1d(np.arange(576), ones)][:p]
        assert np.array_equal(np.nonzero(m[row].numpy())[0], np.sort(expected))


def test_merged_topk_mask_copies_tokens_onto_all_their_patches():
    token_scores = torch.tensor([[0.1, 0.9, 0.5, 0.7], [0.3, 0.3, 0.3, 0.3]], dtype=torch.float64)
    source = torch.tensor([[0, 1, 1, 2, 3, 3, 3, 1], [3, 2, 1, 0, 0, 1, 2, 3]])
    lam = torch.tensor([0.5, 0.3], dtype=torch.float64)  # k = int(4*0.5) = 2 and int(4*0.3) = 1
    m = masks.merged_topk_mask(token_scores, source, lam)
    # row 0: tokens 1 and 3 win; row 1: all tie, token 0 wins
    assert m.tolist() == [[False, True, True, False, True, True, True, True],
                          [False, False, False, True, True, False, False, False]]
    d = batch(16)
    m = masks.merged_topk_mask(d["token_scores"], d["source"], d["lam"])
    k = torch.floor(d["lam"] * d["token_scores"].shape[1]).long()
    for b in range(16):
        chosen = set(torch.argsort(-d["token_scores"][b])[: int(k[b])].tolist())
        assert m[b].tolist() == [int(s) in chosen for s in d["source"][b]]


def test_upsample_mask_is_nearest_neighbour():
    g = torch.rand(3, *GRID) > 0.5
    up = masks.upsample_mask(g, PATCH)
    assert up.shape == (3, H, W) and up.dtype == torch.bool
    for b in range(3):
        assert np.array_equal(up[b].numpy(), np_upsample(g[b].numpy()))


def test_mix_pixels_is_exact():
    d = batch(4)
    x_j = d["pixels"][d["partner"]]
    m = torch.rand(4, H, W) > 0.3
    out = masks.mix_pixels(d["pixels"], x_j, m)
    ref = np.where(m.numpy()[..., None], d["pixels"].numpy(), x_j.numpy())
    assert out.dtype == torch.uint8 and np.array_equal(out.numpy(), ref)
    # the formula itself, in wide integers
    mi = m.numpy()[..., None].astype(np.int64)
    assert np.array_equal(out.numpy(), mi * d["pixels"].numpy() + (1 - mi) * x_j.numpy())


# ----------------------------------------------------------------------------- make_losers

MASKED = ("mergemix", "mergemix-official", "mergemix-r", "topk", "random", "cutmix")


@pytest.mark.parametrize("method", methods.MIX_METHODS)
def test_every_method_output_shape_dtype_and_range(method):
    d = batch(8)
    r = run(method, d)
    assert (r.loser is None) == (method in methods.PATCH_SELECT)  # a selection's loser is composed, not shipped
    loser = losers(r, d)
    assert loser.shape == (8, H, W, 3) and loser.dtype == torch.uint8
    assert r.mask.shape == (8, *GRID) and r.mask.dtype == torch.uint8
    assert r.kept.shape == (8,) and r.kept.dtype == torch.float64
    assert bool(((r.kept >= 0) & (r.kept <= 1)).all())
    if method != "mixup":
        assert set(r.mask.unique().tolist()) <= {0, 255}
        assert np.array_equal(r.kept.numpy(), (r.mask == 255).sum((1, 2)).numpy() / L)
    assert (method in methods.NEEDS_SALIENCY) == (method in {"mergemix", "mergemix-official", "mergemix-r", "topk", "blur"})


@pytest.mark.parametrize("method", MASKED)
def test_loser_is_pixel_exact_mix_of_source_and_partner(method):
    d = batch(8)
    r = run(method, d)
    x_i, x_j = d["pixels"].numpy(), d["pixels"][d["partner"]].numpy()
    m = np.stack([np_upsample(g == 255) for g in r.mask.numpy()])[..., None]
    assert np.array_equal(losers(r, d).numpy(), np.where(m, x_i, x_j))
    assert 0 < r.kept.mean() < 1  # the masks are not degenerate


@pytest.mark.parametrize("method", ["mergemix", "mergemix-r", "topk", "random", "blur"])
def test_kept_area_is_floor_lam_L(method):
    d = batch(12)
    d["lam"] = torch.tensor([0.0, 1.0, 0.5, 0.01, 0.99, 0.123, 0.25, 0.75, 0.333, 0.6, 0.9, 0.04], dtype=torch.float64)
    r = run(method, d)
    assert np.array_equal(r.kept.numpy(), np.floor(d["lam"].numpy() * L) / L)


def test_mergemix_uses_saliency_and_recovers_from_tokens():
    d = batch(8)
    r = run("mergemix", d)
    assert torch.equal(r.mask == 255, masks.topk_patch_mask(d["saliency"], d["lam"]).view(8, *GRID))
    r2 = masks.make_losers("mergemix", d["pixels"], d["partner"], d["lam"], grid=GRID, patch=PATCH, keys=d["keys"],
                         seed=SEED, token_scores=d["token_scores"], source=d["source"])
    assert torch.equal(r.mask, r2.mask) and r.loser is None and r2.loser is None
    off = run("mergemix-official", d)
    assert torch.equal(off.mask == 255, masks.merged_topk_mask(d["token_scores"], d["source"], d["lam"]).view(8, *GRID))


def test_mergemix_r_is_constant_on_merged_tokens_except_one_boundary_token():
    d = batch(8)
    r = run("mergemix-r", d)
    for b in range(8):
        m = (r.mask[b] == 255).flatten()
        src = d["source"][b]
        split = [t for t in src.unique().tolist() if len(set(m[src == t].tolist())) > 1]
        assert len(split) <= 1  # only the token at the floor(lam*L) cut may be partly kept


def test_mixup_blends_with_lam():
    d = batch(6)
    r = run("mixup", d)
    lam = d["lam"].numpy()[:, None, None, None]
    ref = np.clip(np.round(lam * d["pixels"].numpy() + (1 - lam) * d["pixels"][d["partner"]].numpy()), 0, 255)
    assert np.array_equal(r.loser.numpy(), ref.astype(np.uint8))
    assert np.array_equal(r.kept.numpy(), d["lam"].numpy())
    assert np.array_equal(r.mask.numpy(), np.broadcast_to(np.round(d["lam"].numpy() * 255)[:, None, None], (6, *GRID)))


def test_cutmix_box_is_grid_aligned_and_close_to_lam():
    d = batch(16)
    r = run("cutmix", d)
    for b in range(16):
        rows, cols = np.nonzero(r.mask[b].numpy() == 0)
        side = math.sqrt(1 - float(d["lam"][b]))
        full = (min(GRID[0], round(GRID[0] * side)), min(GRID[1], round(GRID[1] * side)))
        if rows.size:  # the partner region is one full rectangle, at most the unclipped box
            h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
            assert rows.size == h * w and h <= full[0] and w <= full[1]
            inside = rows.min() > 0 and cols.min() > 0 and rows.max() < GRID[0] - 1 and cols.max() < GRID[1] - 1
            if inside:  # a box that does not reach the border was not clipped
                assert (h, w) == full
    assert torch.equal(r.lam, r.kept)  # the recorded lam is the area kept after clipping, as CutMix adjusts it


def many_losers(method: str, pixel_seed: int, n: int = 500, grid=(24, 24)):
    """(lam, losers) of `method` for n random 24 x 24 images with 1-pixel patches: enough draws
    for the statistics of where boxes land."""
    keys = [f"{i:06d}" for i in range(n)]
    pixels = torch.from_numpy(np.random.default_rng(pixel_seed).integers(0, 256, (n, *grid, 3), dtype=np.uint8))
    lam = torch.from_numpy(ratios.sample_lams(ratios.LamSpec("beta", 1.0), SEED, keys))
    return lam, masks.make_losers(method, pixels, torch.from_numpy(ratios.derangement(keys, SEED)), lam, grid=grid,
                                patch=(1, 1), keys=keys, seed=SEED)


def test_cutmix_centres_are_uniform_so_boxes_reach_the_border_and_are_clipped():
    """Standard CutMix: the box centre is uniform over the image and the box is clipped at the
    border, so boxes reach the edges and corners; the kept area is still exact on the grid."""
    lam, r = many_losers("cutmix", pixel_seed=1)
    box = r.mask == 0
    touches = [box[:, 0].any(1), box[:, -1].any(1), box[:, :, 0].any(1), box[:, :, -1].any(1)]
    assert all(int(t.sum()) > 50 for t in touches)  # every edge is reached (a box kept inside never would be)
    assert int((box[:, 0, 0] | box[:, 0, -1] | box[:, -1, 0] | box[:, -1, -1]).sum()) > 20  # corners too
    unclipped = torch.tensor([round(24 * math.sqrt(1 - float(v))) ** 2 for v in lam], dtype=torch.float64)
    pasted = box.sum((1, 2)).double()
    assert bool((pasted <= unclipped).all()) and int((pasted < unclipped).sum()) > 100  # clipped, not shifted inside
    assert torch.allclose(r.kept, 1 - pasted / 576, rtol=0, atol=1e-12)
    assert torch.equal(r.lam, r.kept)
    centres = torch.stack([torch.nonzero(m).float().mean(0) for m in box if m.any()])
    assert abs(float(centres.mean()) - 11.5) < 1.0  # centred over the whole grid on average


def test_resizemix_puts_resized_partner_in_box():
    d = batch(6)
    r = run("resizemix", d)
    x_i, x_j = d["pixels"], d["pixels"][d["partner"]]
    for b in range(6):
        box = r.mask[b].numpy() == 0
        rows, cols = np.nonzero(box)
        assert rows.size == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)  # one rectangle
        side_h, side_w = (rows.max() - rows.min() + 1) / GRID[0], (cols.max() - cols.min() + 1) / GRID[1]
        assert 0.1 - 0.5 / GRID[0] <= side_h <= 0.8 + 0.5 / GRID[0] and 0.1 - 0.5 / GRID[1] <= side_w <= 0.8 + 0.5 / GRID[1]
        outside = ~np_upsample(box)
        assert np.array_equal(r.loser[b].numpy()[outside], x_i[b].numpy()[outside])
        t, l = rows.min() * PATCH[0], cols.min() * PATCH[1]
        bh, bw = (rows.max() - rows.min() + 1) * PATCH[0], (cols.max() - cols.min() + 1) * PATCH[1]
        # Pillow's own bilinear resize, which the loser reproduces exactly
        ref = np.asarray(Image.fromarray(x_j[b].numpy()).resize((int(bw), int(bh)), Image.BILINEAR))
        assert np.array_equal(r.loser[b, t:t + bh, l:l + bw].numpy(), ref)
    assert np.allclose(r.kept.numpy(), 1 - (r.mask == 0).sum((1, 2)).numpy() / L)
    assert torch.equal(r.lam, r.kept)  # the recorded lam is the box actually pasted, not the unused draw


def test_resizemix_tau_is_the_side_scale_so_the_mean_pasted_area_is_e_tau_squared():
    """tau ~ U(0.1, 0.8) scales the partner's side (ResizeMix, openmixup): pasted area tau^2,
    E[tau^2] = (0.8^3 - 0.1^3) / (3 * 0.7) = 0.2433 (using tau as the area gave 0.44)."""
    _, r = many_losers("resizemix", pixel_seed=0)
    pasted = (r.mask == 0).double().mean((1, 2))
    expected = (0.8 ** 3 - 0.1 ** 3) / (3 * 0.7)
    assert abs(float(pasted.mean()) - expected) < 0.02
    assert torch.allclose(r.lam, 1 - pasted, rtol=0, atol=1e-12) and torch.equal(r.kept, r.lam)


def test_blur_keeps_salient_patches_and_blurs_the_rest_of_the_same_image():
    d = batch(6)
    r = run("blur", d)
    blurred = masks.gaussian_blur(d["pixels"], max(PATCH) / 2)
    m = np.stack([np_upsample(g == 255) for g in r.mask.numpy()])[..., None]
    assert np.array_equal(r.loser.numpy(), np.where(m, d["pixels"].numpy(), blurred.numpy()))
    assert torch.equal(r.mask == 255, masks.topk_patch_mask(d["saliency"], d["lam"]).view(6, *GRID))
    # the blur really smooths: total variation drops
    def tv(x):
        return (x[:, 1:].float() - x[:, :-1].float()).abs().mean()

    assert tv(blurred) < 0.7 * tv(d["pixels"])
    # a constant image stays constant
    flat = torch.full((1, H, W, 3), 77, dtype=torch.uint8)
    assert torch.equal(masks.gaussian_blur(flat, 2.0), flat)


def test_blur_strength_removes_patch_detail_and_keeps_coarse_structure():
    """The stated strength (sigma = half a patch side): a pattern repeating once per patch is
    wiped out, one four patches wide keeps most of its contrast (docs/METHOD.md)."""
    p = 14  # ViT-L/14
    x = torch.arange(16 * p, dtype=torch.float64)

    def contrast_after_blur(period: float) -> float:
        wave = (127.5 + 100 * torch.cos(2 * math.pi * x / period)).round().to(torch.uint8)
        img = wave.view(1, 1, -1, 1).expand(1, 16 * p, -1, 3).contiguous()
        out = masks.gaussian_blur(img, methods.BLUR_SIGMA_PATCHES * p)[0, :, 4 * p:12 * p, 0].double()  # away from the edges
        return float(out.max() - out.min()) / 200

    assert contrast_after_blur(p) < 0.03
    assert 0.6 < contrast_after_blur(4 * p) < 0.85


@pytest.mark.parametrize("method", methods.MIX_METHODS)
def test_results_do_not_depend_on_batch_split(method):
    """Masks, losers and ratios for a sample are the same whatever batch it is processed in."""
    n = 10
    d = batch(n)
    full = run(method, d)
    for part in (np.arange(0, 4), np.arange(4, n)[::-1].copy()):
        # the half-batch carries its samples' partners as extra rows
        rows = np.r_[part, d["partner"].numpy()[part]]
        sub = {k: d[k][torch.from_numpy(rows)] for k in ("pixels", "token_scores", "source", "saliency")}
        sub["keys"] = [d["keys"][i] for i in part] + [f"extra{i}" for i in range(len(part))]
        sub["lam"] = torch.from_numpy(ratios.sample_lams(ratios.LamSpec("beta", 1.0), SEED, [d["keys"][i] for i in part]))
        sub["lam"] = torch.cat([sub["lam"], torch.full((len(part),), 0.5, dtype=torch.float64)])
        sub["partner"] = torch.from_numpy(np.r_[np.arange(len(part)) + len(part), np.arange(len(part))])
        r = run(method, sub)
        idx = torch.from_numpy(part)
        assert torch.equal(losers(r, sub)[: len(part)], losers(full, d)[idx])
        assert torch.equal(r.mask[: len(part)], full.mask[idx])
        assert torch.equal(r.kept[: len(part)], full.kept[idx])


@pytest.mark.parametrize("method", ["random", "mergemix-r", "cutmix", "resizemix"])
def test_random_methods_depend_on_seed(method):
    d = batch(8)
    a = run(method, d).mask
    b = masks.make_losers(method, d["pixels"], d["partner"], d["lam"], grid=GRID, patch=PATCH, keys=d["keys"],
                        seed=SEED + 1, source=d["source"]).mask
    assert torch.equal(a, run(method, d).mask)
    assert not torch.equal(a, b)


def test_no_self_pairing_in_groups_of_two_or_more():
    for n in (2, 3, 8):
        d = batch(n)
        assert bool((d["partner"] != torch.arange(n)).all())
        r = run("mergemix", d)
        loser = losers(r, d)
        # every loser that mixes anything in really differs from its own image
        for b in range(n):
            if 0 < r.kept[b] < 1:
                assert not torch.equal(loser[b], d["pixels"][b])


# ----------------------------------------------------------------------------- bad arguments

def test_bad_arguments_raise_value_error():
    d = batch(4)

    def call(**over):
        args = dict(method="mergemix", pixels=d["pixels"], partner=d["partner"], lam=d["lam"], grid=GRID,
                    patch=PATCH, keys=d["keys"], seed=SEED, saliency=d["saliency"],
                    token_scores=d["token_scores"], source=d["source"])
        args.update(over)
        method, pixels, partner, lam = (args.pop(k) for k in ("method", "pixels", "partner", "lam"))
        return masks.make_losers(method, pixels, partner, lam, **args)

    cases = [
        (dict(lam=torch.tensor([0.5, 1.2, 0.1, 0.3], dtype=torch.float64)), "lam"),
        (dict(lam=torch.tensor([0.5, -0.1, 0.1, 0.3], dtype=torch.float64)), "lam"),
        (dict(lam=torch.tensor([0.5, float("nan"), 0.1, 0.3], dtype=torch.float64)), "lam"),
        (dict(lam=d["lam"][:3]), "lam"),
        (dict(pixels=d["pixels"][:0], partner=d["partner"][:0], lam=d["lam"][:0], keys=[]), "empty"),
        (dict(pixels=d["pixels"].float()), "uint8"),
        (dict(pixels=d["pixels"][:, :-1]), "pixels must be"),
        (dict(grid=(GRID[0] + 1, GRID[1])), "pixels must be"),
        (dict(keys=d["keys"][:3]), "keys"),
        (dict(keys=["a", "a", "b", "c"]), "unique"),
        (dict(partner=torch.tensor([1, 2, 3, 4])), "partner"),
        (dict(partner=torch.tensor([1, 0])), "partner"),
        (dict(saliency=None, token_scores=None), "saliency"),
        (dict(saliency=d["saliency"][:, :-1]), "saliency"),
        (dict(method="mergemix-official", source=None), "source"),
        (dict(method="mergemix-official", source=d["source"] + 100), "source"),
        (dict(method="mergemix-r", source=None), "source"),
        (dict(method="mixmerge"), "unknown mixing method"),
    ]
    for over, msg in cases:
        with pytest.raises(ValueError, match=msg):
            call(**over)
    with pytest.raises(ValueError, match="lam"):
        masks.topk_patch_mask(d["saliency"], torch.tensor([2.0, 0.1, 0.1, 0.1]))
    with pytest.raises(ValueError, match="empty"):
        masks.topk_patch_mask(d["saliency"][:0], torch.zeros(0))
    with pytest.raises(ValueError, match="shape"):
        masks.mix_pixels(d["pixels"], d["pixels"][:2], torch.ones(4, H, W, dtype=torch.bool))
    with pytest.raises(ValueError, match="pixel_mask"):
        masks.mix_pixels(d["pixels"], d["pixels"], torch.ones(4, H, W, dtype=torch.uint8))
    with pytest.raises(ValueError, match="empty"):
        ratios.derangement([], SEED)
    with pytest.raises(ValueError, match="empty"):
        ratios.sample_lams(ratios.LamSpec("beta", 1.0), SEED, [])


def test_works_on_cuda_like_cpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    d = batch(8)
    dc = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in d.items()}
    for method in methods.MIX_METHODS:
        a, b = run(method, d), run(method, dc)
        assert torch.equal(a.mask, b.mask.cpu()) and torch.equal(a.kept, b.kept.cpu())
        if method != "blur":  # resizemix's resize is exact (integer sums); blur's float64 convolution may round
            # a value at .5 the other way (about 1e-13 of them)
            assert torch.equal(losers(a, d), losers(b, dc).cpu())


def test_topk_margin_is_the_gap_at_each_rows_boundary():
    scores = torch.tensor([[5.0, 4.0, 3.0, 2.0]] * 3 + [[5.0, 4.0, 4.0, 2.0]])
    counts = torch.tensor([2, 0, 4, 2])
    assert masks.topk_margin(scores, counts).tolist() == [0.25, math.inf, math.inf, 0.0]  # row 3: a tie across the boundary
    # merged tokens: score 4 stands for 2 patches; k = 2 cuts through it, so 5 vs 4 counts too
    sizes = torch.tensor([[1.0, 2.0, 1.0, 1.0]])
    near = torch.tensor([[4.001, 4.0, 3.0, 2.0]], dtype=torch.float64)
    assert masks.topk_margin(near, torch.tensor([2]), sizes)[0] == pytest.approx(0.001 / 4.0)
    assert masks.topk_margin(near, torch.tensor([3]), sizes)[0] == pytest.approx(1.0 / 4.0)  # boundary after the token
    # the boundary inside the last token: only the token above it can swap with it
    assert masks.topk_margin(near, torch.tensor([4]), torch.tensor([[1.0, 1.0, 1.0, 2.0]]))[0] == pytest.approx(1.0 / 2.0)
