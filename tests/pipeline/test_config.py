"""Config precedence (defaults < YAML < flags), validation and the resume fingerprint."""
from __future__ import annotations

import pytest

from pipeline.config import GenerateConfig
from stages.errors import UserError


def test_yaml_then_flags(tmp_path):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("merge: 100\nlam-mode: fixed\nseed: 5\nimage_format: png\n")
    cfg = GenerateConfig.build({"input": "x.json", "output": "out", "config": str(cfg_file), "seed": 9, "merge": None})
    assert (cfg.merge, cfg.lam_mode, cfg.seed, cfg.image_format) == (100, "fixed", 9, "png")
    assert cfg.model == "ViT-L-14-336" and cfg.pretrained == "openai" and cfg.attn_layer == -2


@pytest.mark.parametrize("text, needle", [
    ("merge: [1, 2\n", "not valid YAML"),
    ("- a\n- b\n", "mapping"),
    ("mergee: 3\n", "unknown config key"),
    ("method: mixmix\n", "--method"),
    ("lam: beta:0\n", "--lam"),
    ("samples_per_shard: 0\n", "--samples-per-shard"),
])
def test_bad_config_is_one_clear_error(tmp_path, text, needle):
    cfg_file = tmp_path / "bad.yaml"
    cfg_file.write_text(text)
    with pytest.raises(UserError, match=needle):
        GenerateConfig.build({"input": "x.json", "output": "out", "config": str(cfg_file)})


def test_fingerprint_tracks_only_what_changes_the_output():
    base = {"input": "x.json", "output": "out"}
    fp = GenerateConfig.build(base).fingerprint()
    same = [{"workers": 3}, {"batch_size": 7}, {"output": "elsewhere"}, {"address": "ray://h:10001"}, {"overwrite": True},
            {"unit_timeout": 5}, {"storage_options": {"key": "k"}},
            {"input": "s3://bucket/x.json"}]  # where the records are: their digest says what they are
    for change in same:
        assert GenerateConfig.build(base | change).fingerprint() == fp, change
    for change in [{"seed": 1}, {"merge": 100}, {"method": "cutmix"}, {"image_format": "png"}, {"resize": "squash"},
                   {"lam": "uniform:0.2,0.8"}, {"pretrained": "none"}, {"samples_per_shard": 10}]:
        assert GenerateConfig.build(base | change).fingerprint() != fp, change
    assert GenerateConfig.build(base).fingerprint("digest-a") != GenerateConfig.build(base).fingerprint("digest-b")
    assert "storage_options" not in GenerateConfig.build(base | {"storage_options": {"secret": "s"}}).record()
    # topk runs the un-merged tower: --merge does not matter for it.
    topk = GenerateConfig.build(base | {"method": "topk"})
    assert topk.effective_merge == 0
    assert topk.fingerprint() == GenerateConfig.build(base | {"method": "topk", "merge": 7}).fingerprint()


def test_how_a_checkpoint_was_trained_is_config_and_shapes_the_fingerprint(tmp_path):
    base = {"input": "x.json", "output": "out", "pretrained": "/ckpt.pt"}
    cfg = GenerateConfig.build(base | {"quick_gelu": True, "mean": "0.5, 0.5,0.5", "std": [0.5, 0.5, 0.5]})
    assert cfg.quick_gelu is True and cfg.mean == cfg.std == [0.5, 0.5, 0.5]
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("quick-gelu: false\nmean: [0.485, 0.456, 0.406]\n")
    from_yaml = GenerateConfig.build(base | {"config": str(cfg_file)})
    assert from_yaml.quick_gelu is False and from_yaml.mean == [0.485, 0.456, 0.406]
    for bad, needle in [({"mean": "1,2"}, "--mean needs three numbers"), ({"std": "0.2,0,0.2"}, "--std needs three positive")]:
        with pytest.raises(UserError, match=needle):
            GenerateConfig.build(base | bad)
    # The resolved tower settings are part of the fingerprint: the same flags with another activation differ.
    plain = GenerateConfig.build(base)
    gelu = {"activation": "GELU", "norm_mean": [0.5] * 3, "norm_std": [0.5] * 3, "interpolation": "bicubic"}
    assert plain.fingerprint("d", gelu) != plain.fingerprint("d", gelu | {"activation": "QuickGELU"})
    assert plain.fingerprint("d", gelu) != plain.fingerprint("d", gelu | {"norm_mean": [0.4] * 3})
    assert plain.fingerprint() != cfg.fingerprint()
    # An hf-hub model brings its own weights unless --pretrained says otherwise.
    hub = GenerateConfig.build({"input": "x.json", "output": "out", "model": "hf-hub:org/repo"})
    assert hub.pretrained == "hf-hub:org/repo"
    assert GenerateConfig.build({"input": "x.json", "output": "out", "model": "hf-hub:org/repo",
                                 "pretrained": "none"}).pretrained == "none"


def test_help_shows_the_dataclass_defaults():
    from typer.testing import CliRunner

    from pipeline.cli import app

    text = " ".join(CliRunner().invoke(app, ["generate", "--help"], terminal_width=400).output.split())
    for flag, default in (("--merge", "288"), ("--samples-per-shard", "1000"), ("--unit-timeout", "3600.0"),
                          ("--method", "mergemix"), ("--prop-attn", "off")):
        assert flag in text and f"[{default}]" in text, (flag, default)


def test_train_help_shows_the_train_config_defaults():
    from dataclasses import fields

    from typer.testing import CliRunner

    from pipeline.cli import app
    from stages.training.config import TrainConfig

    text = " ".join(CliRunner().invoke(app, ["train", "--help"], terminal_width=400).output.split())
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    for flag, name in (("--steps", "steps"), ("--lr", "lr"), ("--max-length", "max_length"), ("--margin-from", "margin_from")):
        assert flag in text and f"[{defaults[name]}]" in text, flag
    assert "--text-only-rows" in text and "--no-text-only-rows" not in text


def test_the_image_path_as_resolved_is_in_the_fingerprint():
    """pil (whether asked for or chosen by auto) hashes as before --image-ops existed, so outputs of
    earlier versions still resume (the values below were computed before it); torch and actor-side
    encoding are other outputs; --compile is run-only."""
    base = {"input": "/data/x.json", "output": "out"}
    fp = GenerateConfig.build(base).fingerprint("d")
    assert fp == "cd8dedacd91a4498"
    assert GenerateConfig.build(base | {"image_format": "png"}).fingerprint("d") == "f07366c064cbf339"
    for same in ({"image_ops": "pil"}, {"compile": True}, {"image_ops": "auto", "device": "cuda"}):
        assert GenerateConfig.build(base | same).fingerprint("d", image_ops="pil") == fp, same
    torch_fp = GenerateConfig.build(base | {"image_ops": "torch"}).fingerprint("d")
    assert torch_fp != fp and GenerateConfig.build(base).fingerprint("d", image_ops="torch") == torch_fp
    encoded = GenerateConfig.build(base | {"image_ops": "torch", "device_encode": True}).fingerprint("d")
    assert encoded not in (fp, torch_fp)
    for bad, needle in (({"device_encode": True, "image_format": "png"}, "--image-format jpg"),
                        ({"device_encode": True, "image_ops": "pil"}, "--image-ops torch"),
                        ({"image_ops": "gpu"}, "--image-ops")):
        with pytest.raises(UserError, match=needle):
            GenerateConfig.build(base | bad)


def test_auto_image_ops_follow_the_device():
    from pipeline.distribute import resolve_image_ops

    assert resolve_image_ops("auto", "cuda", None) == "torch" and resolve_image_ops("auto", "cpu", None) == "pil"
    assert resolve_image_ops("pil", "cuda", None) == "pil" and resolve_image_ops("torch", "cpu", None) == "torch"
    with pytest.raises(UserError, match="--image-ops torch"):
        resolve_image_ops("auto", "cpu", None, device_encode=True)
