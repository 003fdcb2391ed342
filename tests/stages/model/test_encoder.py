"""The ToMe encoder against stock open_clip, and the invariants of merging."""
from __future__ import annotations

import copy
import json

import open_clip
import pytest
import torch

from stages.model.encoder import MergingEncoder
from stages.model.factory import load_encoder
from stages.errors import UserError
from tests.conftest import TINY_MODEL_CONFIG, direct_cls_attention


def _clip(tmp_path, **vision_overrides):
    cfg = copy.deepcopy(TINY_MODEL_CONFIG)
    cfg["vision_cfg"].update(vision_overrides)
    name = "mm-test-" + "-".join(f"{k}{v}" for k, v in sorted(vision_overrides.items())) if vision_overrides else "mm-test"
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)
    torch.manual_seed(0)
    return open_clip.create_model(name, pretrained=None).eval(), path


def _images(n=3, seed=0):
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("block_type", ["default", "custom"])
def test_unmerged_embedding_matches_stock_open_clip(tmp_path, block_type):
    clip, _ = _clip(tmp_path, block_type=block_type, ls_init_value=0.5)
    enc = MergingEncoder(clip.visual, merge=0)
    x = _images()
    with torch.no_grad():
        expected = clip.encode_image(x)
    torch.testing.assert_close(enc.encode_image(x), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("layer", [-2, 0, 3])
def test_unmerged_saliency_matches_direct_attention(tmp_path, layer):
    clip, _ = _clip(tmp_path)
    enc = MergingEncoder(clip.visual, merge=0, attn_layer=layer)
    x = _images()
    sal = enc.saliency(x)
    expected = direct_cls_attention(clip.visual, x, layer % 4)
    assert sal.grid.shape == (3, 8, 8)
    torch.testing.assert_close(sal.grid.flatten(1), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(sal.token_scores, expected, atol=1e-5, rtol=0)
    assert torch.equal(sal.source, torch.arange(64).expand(3, -1))


@pytest.mark.parametrize("kind", ["constant", "decreasing"])
def test_merged_saliency_invariants(tmp_path, kind):
    clip, _ = _clip(tmp_path)
    enc = MergingEncoder(clip.visual, merge=40, attn_layer=-1, schedule=kind)
    sal = enc.saliency(_images(4))
    k = 64 - 40
    assert sum(enc.schedule) == 40 and len(enc.schedule) == 3
    expected_counts = [65]
    for r in enc.schedule:
        expected_counts.append(expected_counts[-1] - r)
    assert sal.tokens_per_layer == expected_counts
    assert sal.token_scores.shape == (4, k)
    # Every patch belongs to exactly one merged token and every merged token holds a patch.
    assert sal.source.min() >= 0 and sal.source.max() < k
    counts = torch.stack([torch.bincount(s, minlength=k) for s in sal.source])
    assert (counts >= 1).all() and (counts.sum(1) == 64).all()
    # Recovery: each patch carries its merged token's score.
    torch.testing.assert_close(sal.grid.flatten(1), sal.token_scores.gather(1, sal.source))
    # CLS attention over all tokens sums to the number of heads; patches get the rest.
    assert (sal.token_scores.sum(1) < 4.0 + 1e-4).all()


def test_merging_is_per_image(tmp_path):
    """The merge pattern of one image does not depend on the rest of the batch."""
    clip, _ = _clip(tmp_path)
    enc = MergingEncoder(clip.visual, merge=30)
    x = _images(4, seed=3)
    together = enc.saliency(x)
    alone = [enc.saliency(x[i : i + 1]) for i in range(4)]
    assert torch.equal(together.source, torch.cat([a.source for a in alone]))
    torch.testing.assert_close(together.grid, torch.cat([a.grid for a in alone]), atol=1e-6, rtol=0)


def test_proportional_attention_changes_only_merged_runs(tmp_path):
    clip, _ = _clip(tmp_path)
    x = _images()
    plain, prop = (MergingEncoder(clip.visual, merge=0, prop_attn=p).saliency(x).grid for p in (False, True))
    torch.testing.assert_close(plain, prop)  # log(size) = 0 when nothing merged
    plain, prop = (MergingEncoder(clip.visual, merge=30, prop_attn=p).saliency(x).grid for p in (False, True))
    assert not torch.allclose(plain, prop)


def test_load_from_config_json_and_local_checkpoint(tiny_model_config, tmp_path):
    enc = load_encoder(str(tiny_model_config), "none", merge=16)
    assert enc.grid == (8, 8) and enc.tokens_kept == 48 and enc.attn_layer == 2
    ckpt = tmp_path / "tiny.pt"
    torch.manual_seed(7)
    clip = open_clip.create_model(tiny_model_config.stem, pretrained=None)
    torch.save(clip.state_dict(), ckpt)
    loaded = load_encoder(str(tiny_model_config), str(ckpt))
    torch.testing.assert_close(loaded.visual.conv1.weight, clip.visual.conv1.weight)
    pixels = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    sal = loaded.saliency_from_pixels(pixels)
    assert sal.grid.shape == (2, 8, 8) and torch.isfinite(sal.grid).all()


def test_pixels_path_equals_normalised_path(tiny_model_config):
    """saliency_from_pixels folds the CLIP normalisation into the patch embedding and reuses a
    staging buffer; it must equal saliency() on explicitly normalised images, for any batch
    size in any order (a smaller batch after a larger one reads only its own slice)."""
    enc = load_encoder(str(tiny_model_config), "none", merge=0)
    gen = torch.Generator().manual_seed(3)
    for n in (5, 2, 7):
        pixels = torch.randint(0, 256, (n, 64, 64, 3), dtype=torch.uint8, generator=gen)
        normalised = (pixels.permute(0, 3, 1, 2).double() / 255.0 - enc.mean.double()) / enc.std.double()
        ref = enc.saliency(normalised.float())
        got = enc.saliency_from_pixels(pixels)
        torch.testing.assert_close(got.grid, ref.grid, atol=1e-6, rtol=1e-4)
        ref_embed = enc._embed(normalised.float())
        got_embed = enc._embed_pixels(pixels.permute(0, 3, 1, 2).float() - 128.0)
        torch.testing.assert_close(got_embed, ref_embed, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="shape"):
        enc.saliency_from_pixels(torch.zeros(1, 32, 32, 3, dtype=torch.uint8))


def test_user_mistakes_are_clear(tiny_model_config, tmp_path):
    with pytest.raises(UserError, match="unknown open_clip model"):
        load_encoder("ViT-Nope", "none")
    with pytest.raises(UserError, match="--pretrained PATH"):
        load_encoder(str(tiny_model_config), str(tmp_path / "missing.pt"))
    with pytest.raises(UserError, match="--pretrained none"):
        load_encoder(str(tiny_model_config), "laion2b")
    with pytest.raises(UserError, match="attn-layer"):
        load_encoder(str(tiny_model_config), "none", attn_layer=9)
    with pytest.raises(UserError, match="cannot merge"):
        load_encoder(str(tiny_model_config), "none", merge=63, attn_layer=1)
    enc = load_encoder(str(tiny_model_config), "none")
    with pytest.raises(ValueError, match="uint8"):
        enc.saliency_from_pixels(torch.zeros(1, 64, 64, 3))


def test_bf16_autocast_path_keeps_merge_invariants(tiny_model_config):
    """The mixed-precision path (CPU autocast here, CUDA in production): sizes stay exact
    counts, every patch keeps one token, and saliency stays close to fp32."""
    enc = load_encoder(str(tiny_model_config), "none", merge=40, attn_layer=-1, prop_attn=True)
    pixels = torch.randint(0, 256, (4, 64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    ref = enc.saliency_from_pixels(pixels)
    enc.autocast_dtype = torch.bfloat16
    low = enc.saliency_from_pixels(pixels)
    assert low.grid.dtype == torch.float32 and low.tokens_per_layer == ref.tokens_per_layer
    counts = torch.stack([torch.bincount(s, minlength=24) for s in low.source])
    assert (counts >= 1).all() and (counts.sum(1) == 64).all()
    # Merge choices may flip between bf16 and fp32; without merging the maps must agree closely.
    enc = load_encoder(str(tiny_model_config), "none", merge=0)
    ref = enc.saliency_from_pixels(pixels).grid
    enc.autocast_dtype = torch.bfloat16
    assert (enc.saliency_from_pixels(pixels).grid - ref).abs().max() < 0.02


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_autocast_close_to_fp32(tiny_model_config, precision):
    cpu = load_encoder(str(tiny_model_config), "none", merge=0)
    gpu = load_encoder(str(tiny_model_config), "none", merge=0, device="cuda", precision=precision)
    gpu.visual.load_state_dict(cpu.visual.state_dict())
    pixels = torch.randint(0, 256, (8, 64, 64, 3), dtype=torch.uint8)
    ref = cpu.saliency_from_pixels(pixels).grid
    got = gpu.saliency_from_pixels(pixels).grid.cpu()
    torch.testing.assert_close(got, ref, atol=2e-2, rtol=5e-2)


@pytest.mark.parametrize("prop_attn", [False, True])
def test_merged_blocks_use_fused_attention_and_never_wait_for_the_host(tiny_model_config, prop_attn):
    """Every block before the saliency layer runs its attention through scaled_dot_product_attention
    (no token x token map is materialised; only the saliency block's CLS row is computed by hand), and
    nothing in the forward reads a value back to the host (.item(), int(t), bool(t): the op
    aten._local_scalar_dense), which would stall a GPU once per block."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops, self.shapes = Counter(), []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.ops[str(func.overloadpacket)] += 1
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.shapes.append((str(func), tuple(t.shape)))
            return out

    enc = load_encoder(str(tiny_model_config), "none", merge=16, prop_attn=prop_attn)
    pixels = torch.randint(0, 256, (3, 64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with Record() as rec:
        sal = enc.saliency_from_pixels(pixels)
    tokens = set(sal.tokens_per_layer)  # 65, 57, 49: token counts entering each block
    assert rec.ops["aten._local_scalar_dense"] == 0
    fused = sum(n for op, n in rec.ops.items() if "scaled_dot_product" in op)
    assert fused == enc.attn_layer == 2  # one per merged block
    square = [(op, s) for op, s in rec.shapes if len(s) >= 2 and s[-1] == s[-2] and s[-1] in tokens]
    assert square == []


def test_compiled_blocks_give_the_eager_saliency(tiny_model_config, monkeypatch):
    """--compile: the same graph through torch.compile (aot_eager here: the capture without the C++
    build) gives the eager saliency and source map, and the decider keeps one batch shape."""
    from stages.mixing.decide import UnitDecider

    monkeypatch.setenv("MERGEMIX_COMPILE_BACKEND", "aot_eager")
    enc = load_encoder(str(tiny_model_config), "none", merge=16)
    pixels = torch.randint(0, 256, (5, 64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    decider = UnitDecider(enc, method="mergemix", lam="beta:1.0", lam_mode="area", seed=0, batch_size=4, describe={})
    eager = decider.saliency(pixels)
    enc.enable_compile()
    run, batches = enc._run, []
    enc._run = lambda images, from_pixels: batches.append(len(images)) or run(images, from_pixels)
    compiled = decider.saliency(pixels)
    assert batches == [4, 4]  # the last batch of 1 filled up with copies: no second graph
    torch.testing.assert_close(compiled[0], eager[0], atol=1e-6, rtol=1e-5)
    assert torch.equal(compiled[2], eager[2]) and compiled[0].shape == (5, 8, 8)


def test_merge_margins_report_the_closest_merge_decision(tiny_model_config):
    """merge_margins: the smallest matching_margin over the blocks that merge; inf without merging."""
    pixels = torch.randint(0, 256, (3, 64, 64, 3), generator=torch.Generator().manual_seed(4), dtype=torch.uint8)
    merged = load_encoder(str(tiny_model_config), "none", merge=16)
    margins = merged.merge_margins(pixels)
    assert margins.shape == (3,) and bool((margins > 0).all()) and bool(torch.isfinite(margins).all())
    assert torch.isinf(load_encoder(str(tiny_model_config), "none", merge=0).merge_margins(pixels)).all()
