"""The tower is the network open_clip builds for the weights, with their settings applied.

No download anywhere: tags are pointed at local files through open_clip's own pretrained
config (a "file" entry, which `download_pretrained` returns as is), hub repos are read
from a hub cache laid out in a temporary folder, and most builds happen on the meta device
(structure only, no weights), so every pretrained tag open_clip lists is checked in seconds.
"""
from __future__ import annotations

import copy
import json
import logging

import numpy as np
import open_clip
import pytest
import torch
from open_clip.pretrained import get_pretrained_cfg
from torch import nn

from stages.model.encoder import MergingEncoder
from stages.model.factory import build_clip, load_encoder
from stages.errors import UserError
from stages.model.constants import OPENAI_MEAN
from stages.model.hub import parse_hf_hub
from stages.model.weights import resolve_pretrained
from stages.model.tower import resolve_tower, unsupported_reason
from tests.conftest import TINY_MODEL_CONFIG, direct_cls_attention

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
REFUSED_BECAUSE = ("timm model", "ModifiedResNet", "attentional pooler", "pool_type=")


def activations(visual: nn.Module) -> set[type]:
    return {type(block.mlp.gelu) for block in visual.transformer.resblocks}


def point_tag_at(monkeypatch, model: str, tag: str, path) -> None:
    """Make open_clip's own download of (model, tag) return `path` (its config's "file" entry)."""
    monkeypatch.setitem(get_pretrained_cfg(model, tag), "file", str(path))


@pytest.fixture(autouse=True)
def quiet_open_clip():
    logging.disable(logging.WARNING)  # "No pretrained weights loaded" for every meta build
    yield
    logging.disable(logging.NOTSET)


def test_every_pretrained_tag_builds_the_network_open_clip_builds_for_it(monkeypatch, tmp_path):
    """For every (model, tag) open_clip lists: either refused for a stated reason, or built
    (without weights) with the activation, mean/std and image size of open_clip's own model
    for that tag with the tag's settings applied (force_quick_gelu = the tag's quick_gelu)."""
    dummy = tmp_path / "never-read.bin"
    dummy.write_bytes(b"")
    supported, refused, text_from_hub = [], [], []
    for model, tag in open_clip.list_pretrained():
        tag_cfg = get_pretrained_cfg(model, tag)
        point_tag_at(monkeypatch, model, tag, dummy)
        try:
            tower = resolve_tower(model, tag)
        except UserError as exc:
            assert any(reason in str(exc) for reason in REFUSED_BECAUSE), str(exc)
            refused.append((model, tag))
            continue
        supported.append((model, tag))
        model_cfg = open_clip.get_model_config(model)
        assert tower.mean == tuple(tag_cfg["mean"]) and tower.std == tuple(tag_cfg["std"]), (model, tag)
        assert tower.interpolation == tag_cfg["interpolation"]
        assert tower.pad_rgb == tuple(int(255 * m) for m in tag_cfg["mean"])
        force = bool(tag_cfg.get("quick_gelu", False))
        if "hf_model_name" in model_cfg["text_cfg"]:
            # open_clip builds these text towers from a config on the Hugging Face hub, so neither
            # side can build the whole model offline: compare with the vision tower open_clip's
            # CLIP builds for that config and activation.
            text_from_hub.append((model, tag))
            quick = force or bool(model_cfg.get("quick_gelu", False))
            with torch.device("meta"):
                ref_visual = open_clip.model._build_vision_tower(model_cfg["embed_dim"], model_cfg["vision_cfg"], quick)
            assert activations(ref_visual) == {open_clip.transformer.QuickGELU if tower.quick_gelu else nn.GELU}
            assert tuple(ref_visual.image_size) == tower.image_size
            MergingEncoder(ref_visual)
            continue
        with torch.device("meta"):
            ref = open_clip.create_model(model, pretrained=tag, force_quick_gelu=force, load_weights=False, device="meta")
        ours = build_clip(tower, None, device="meta")
        assert activations(ours.visual) == activations(ref.visual) and len(activations(ours.visual)) == 1, (model, tag)
        ref_pre, our_pre = open_clip.get_model_preprocess_cfg(ref), open_clip.get_model_preprocess_cfg(ours)
        assert tuple(ref_pre["mean"]) == tuple(our_pre["mean"]) == tower.mean, (model, tag)
        assert tuple(ref_pre["std"]) == tuple(our_pre["std"]) == tower.std, (model, tag)
        assert ref_pre["interpolation"] == our_pre["interpolation"] == tower.interpolation
        assert tuple(ref.visual.image_size) == tuple(ours.visual.image_size) == tower.image_size
        assert MergingEncoder(ours.visual).grid == tuple(ref.visual.grid_size)  # passes the encoder's own check
    # The numbers the README quotes; a new open_clip release that lists more tags changes them.
    print(f"\n{len(supported)} tags supported ({len(text_from_hub)} compared on the vision tower), {len(refused)} refused")
    assert ("ViT-L-14-336", "openai") in supported and ("ViT-L-14", "laion2b_s32b_b82k") in supported
    assert ("ViT-L-14-CLIPA", "datacomp1b") in refused and ("coca_ViT-B-32", "laion2b_s13b_b90k") in refused
    assert ("RN50", "openai") in refused and ("ViT-B-16-SigLIP", "webli") in refused
    assert len(supported) + len(refused) == len(open_clip.list_pretrained())


def test_the_default_tower_is_quickgelu_with_openai_constants():
    tower = resolve_tower("ViT-L-14-336", "openai")
    assert tower.activation == "QuickGELU" and tower.quick_gelu
    assert tower.mean == OPENAI_MEAN and tower.pad_rgb == (122, 116, 104) and tower.interpolation == "bicubic"
    assert tower.image_size == (336, 336) and tower.patch_size == (14, 14)
    assert "tag openai" in tower.summary() and "QuickGELU" in tower.summary()
    half = resolve_tower("ViT-L-14", "laion2b_s32b_b82k")
    assert half.activation == "GELU" and half.mean == half.std == (0.5, 0.5, 0.5) and half.pad_rgb == (127, 127, 127)
    assert resolve_tower("ViT-B-16-quickgelu", "none").activation == "QuickGELU"  # the -quickgelu names set it


def _same_network(ours, ref, pixels: torch.Tensor, layer: int = -2):
    """Our R = 0 encoder against open_clip's model: the embedding, and the saliency from pixels
    against nn.MultiheadAttention's own attention weights on pixels normalised by the model's
    own preprocess config."""
    pre = open_clip.get_model_preprocess_cfg(ref)
    mean, std = (torch.tensor(pre[k], dtype=torch.float64).view(1, 3, 1, 1) for k in ("mean", "std"))
    x = ((pixels.permute(0, 3, 1, 2).double() / 255.0 - mean) / std).float()
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_image(x), ref.encode_image(x), atol=1e-5, rtol=0)
    expected = direct_cls_attention(ref.visual, x, layer % len(ref.visual.transformer.resblocks))
    torch.testing.assert_close(ours.saliency_from_pixels(pixels).grid.flatten(1), expected, atol=1e-5, rtol=0)
    assert activations(ours.visual) == activations(ref.visual)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("model, tag", [("ViT-B-32", "openai"), ("ViT-L-14", "laion2b_s32b_b82k")])
def test_real_tag_equals_open_clips_own_model(monkeypatch, tmp_path, model, tag):
    """The same random weights as the tag's file: our R = 0 encoder equals open_clip's model for
    that tag with its settings (QuickGELU for openai, mean = std = 0.5 for laion2b_s32b_b82k)."""
    torch.manual_seed(1)
    weights = open_clip.create_model(model, pretrained=None).state_dict()
    path = tmp_path / f"{model}-{tag}.pt"
    torch.save({k: v.half() for k, v in weights.items()}, path)  # half the file; both sides load the same values
    del weights
    point_tag_at(monkeypatch, model, tag, path)
    force = bool(get_pretrained_cfg(model, tag).get("quick_gelu", False))
    ref = open_clip.create_model(model, pretrained=tag, force_quick_gelu=force).eval()
    ours = load_encoder(model, tag, merge=0)
    assert ours.tower.weights == tag and resolve_pretrained(model, tag) == str(path)
    path.unlink()  # up to 0.9 GB: not kept in pytest's temporary folders
    pixels = torch.randint(0, 256, (1, *ours.image_size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    _same_network(ours, ref, pixels)


def _tiny(tmp_path, name="mm-tower-tiny", **extra):
    cfg = copy.deepcopy(TINY_MODEL_CONFIG) | extra
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return path


def test_local_checkpoint_says_how_it_was_trained(tmp_path):
    """--pretrained PATH: the flags, or the config's preprocess_cfg, set activation and constants;
    open_clip's model with the same settings (force_quick_gelu, force_preprocess_cfg) is the reference."""
    config = _tiny(tmp_path)
    open_clip.add_model_config(config)
    torch.manual_seed(3)
    ckpt = tmp_path / "tiny.pt"
    torch.save(open_clip.create_model(str(config.stem), pretrained=None).state_dict(), ckpt)
    ours = load_encoder(str(config), str(ckpt), quick_gelu=True, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    assert ours.tower.activation == "QuickGELU" and ours.tower.pad_rgb == (123, 116, 103)
    assert "--quick-gelu, --mean, --std" in ours.tower.settings_from
    ref = open_clip.create_model(config.stem, pretrained=str(ckpt), force_quick_gelu=True,
                                 force_preprocess_cfg={"mean": IMAGENET_MEAN, "std": IMAGENET_STD}).eval()
    pixels = torch.randint(0, 256, (3, 64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    _same_network(ours, ref, pixels)

    # The same through the config: a model config with preprocess_cfg, and open_clip's own
    # open_clip_config.json layout (model_cfg + preprocess_cfg).
    pre = {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "interpolation": "bilinear"}
    flat = _tiny(tmp_path, "mm-tower-flat", preprocess_cfg=pre, quick_gelu=True)
    wrapped = tmp_path / "open_clip_config.json"
    wrapped.write_text(json.dumps({"model_cfg": TINY_MODEL_CONFIG | {"quick_gelu": True}, "preprocess_cfg": pre}))
    for path in (flat, wrapped):
        enc = load_encoder(str(path), str(ckpt))
        assert enc.tower.mean == IMAGENET_MEAN and enc.tower.interpolation == "bilinear"
        assert enc.activation == "QuickGELU" and "preprocess_cfg" in enc.tower.settings_from
        _same_network(enc, ref, pixels)

    # Nothing said: the model config's activation and open_clip's OpenAI constants, and the line says how to change them.
    plain = resolve_tower(str(config), str(ckpt))
    assert plain.activation == "GELU" and plain.mean == OPENAI_MEAN and "--quick-gelu" in plain.settings_from


def test_flags_that_contradict_the_weights_are_refused(tmp_path):
    with pytest.raises(UserError, match="--no-quick-gelu contradicts tag openai, whose weights were trained with QuickGELU"):
        resolve_tower("ViT-L-14-336", "openai", quick_gelu=False)
    with pytest.raises(UserError, match="--mean contradicts tag laion2b_s32b_b82k"):
        resolve_tower("ViT-L-14", "laion2b_s32b_b82k", mean=OPENAI_MEAN)
    assert resolve_tower("ViT-L-14-336", "openai", quick_gelu=True, mean=OPENAI_MEAN).quick_gelu  # agreeing is fine
    with pytest.raises(UserError, match="--no-quick-gelu contradicts ViT-B-16-quickgelu"):
        resolve_tower("ViT-B-16-quickgelu", "none", quick_gelu=False)
    for bad in ("1,2", "a,b,c", "0.5,0.5,nan"):
        with pytest.raises(UserError, match="--mean needs three numbers"):
            resolve_tower("ViT-B-16", "none", mean=bad)
    with pytest.raises(UserError, match="--std needs three positive numbers"):
        resolve_tower("ViT-B-16", "none", std="0.5,0,0.5")


def test_unsupported_towers_are_refused_from_their_config_in_one_line():
    for model, reason in [("ViT-B-16-SigLIP", "timm model"), ("RN50", "ModifiedResNet"),
                          ("coca_ViT-B-32", "attentional pooler"), ("ViT-L-14-CLIPA", "class token is never read out"),
                          ("PE-Core-B-16", "timm model")]:
        with pytest.raises(UserError, match=reason) as info:
            resolve_tower(model, "none")
        assert "\n" not in str(info.value) and str(info.value).startswith(f"{model} cannot give MergeMix saliency")
    assert unsupported_reason(TINY_MODEL_CONFIG) is None
    # The encoder refuses the same towers when handed a built module.
    with torch.device("meta"):
        clipa = open_clip.create_model("ViT-L-14-CLIPA", pretrained=None, device="meta")
    with pytest.raises(UserError, match="never read out"):
        MergingEncoder(clipa.visual)


def test_hf_hub_names():
    assert parse_hf_hub("hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K") == "laion/CLIP-ViT-B-32-laion2B-s34B-b79K"
    assert parse_hf_hub("hf-hub:timm/ViT-B-16-SigLIP.v2") == "timm/ViT-B-16-SigLIP.v2"
    assert parse_hf_hub("ViT-B-16") is None and parse_hf_hub("cfg/hf-hub.json") is None
    for bad in ("hf-hub:", "hf-hub:noslash", "hf-hub:a/b/c", "hf-hub:/repo", "hf-hub:org/../x", "hf-hub:org/re po"):
        with pytest.raises(UserError, match="hf-hub:ORG/REPO"):
            parse_hf_hub(bad)


def _hub_cache(root, repo: str, files: dict[str, bytes]) -> None:
    """A Hugging Face hub cache holding `files` of `repo` at revision main, as the hub client writes it."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    folder = root / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        (snapshot / name).write_bytes(data)


@pytest.mark.timeout(120)
def test_hf_hub_tower_from_the_hub_cache(monkeypatch, tmp_path):
    """hf-hub:ORG/REPO: the repo's config, preprocess_cfg and weights, as open_clip's own
    create_model("hf-hub:...") reads them; a repo whose tower the method cannot serve is refused
    from its config, and an unreachable repo fails in one line."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    torch.manual_seed(5)
    model_cfg = TINY_MODEL_CONFIG | {"quick_gelu": True}
    open_clip.add_model_config(_tiny(tmp_path, "mm-hub-src", quick_gelu=True))
    weights = tmp_path / "w.bin"
    torch.save(open_clip.create_model("mm-hub-src", pretrained=None).state_dict(), weights)
    pre = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bilinear", "resize_mode": "squash"}
    config = json.dumps({"model_cfg": model_cfg, "preprocess_cfg": pre}).encode()
    _hub_cache(tmp_path / "hub", "mm-org/tiny-clip",
               {"open_clip_config.json": config, "open_clip_pytorch_model.bin": weights.read_bytes()})
    model = "hf-hub:mm-org/tiny-clip"
    ours = load_encoder(model, model)
    assert ours.tower.mean == (0.5, 0.5, 0.5) and ours.tower.interpolation == "bilinear" and ours.activation == "QuickGELU"
    assert ours.tower.pad_rgb == (127, 127, 127) and "open_clip_config.json" in ours.tower.settings_from
    ref = open_clip.create_model(model).eval()
    pixels = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    _same_network(ours, ref, pixels)
    with pytest.raises(UserError, match="brings its own weights"):
        resolve_tower(model, "openai")
    assert resolve_tower(model, "none").weights is None  # the repo's architecture with random weights

    siglip = {"model_cfg": open_clip.get_model_config("ViT-B-16-SigLIP"), "preprocess_cfg": pre}
    _hub_cache(tmp_path / "hub", "mm-org/siglip", {"open_clip_config.json": json.dumps(siglip).encode()})
    with pytest.raises(UserError, match="hf-hub:mm-org/siglip cannot give MergeMix saliency: .*timm model"):
        resolve_tower("hf-hub:mm-org/siglip", "hf-hub:mm-org/siglip")
    with pytest.raises(UserError, match="could not get the open_clip_config.json of hf-hub:mm-org/missing"):
        resolve_tower("hf-hub:mm-org/missing", "hf-hub:mm-org/missing")


def test_pad_colour_follows_the_mean():
    from stages.model.tower import Tower

    def pad(mean):
        return Tower("m", "m", None, False, mean, (1.0, 1.0, 1.0), "bicubic", (224, 224), (16, 16), "").pad_rgb

    assert pad(OPENAI_MEAN) == (122, 116, 104)  # LLaVA's int(255 * mean) of the OpenAI mean
    assert pad((0.5, 0.5, 0.5)) == (127, 127, 127) and pad(IMAGENET_MEAN) == (123, 116, 103)
    assert pad((0.0, 0.0, 0.0)) == (0, 0, 0)
    assert np.array_equal(pad((0.999, 1.0, 0.001)), (254, 255, 0))
