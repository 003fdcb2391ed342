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
    same = [{"workers": 3}, {"batch_size": 7}, {"output": "elsewhere"}, {"address": "ray://h:10001"}, {"overwrite": True}]
    for change in same:
        assert GenerateConfig.build(base | change).fingerprint() == fp, change
    for change in [{"seed": 1}, {"merge": 100}, {"method": "cutmix"}, {"image_format": "png"}, {"resize": "squash"},
                   {"lam": "uniform:0.2,0.8"}, {"pretrained": "none"}, {"samples_per_shard": 10}]:
        assert GenerateConfig.build(base | change).fingerprint() != fp, change
    # topk runs the un-merged tower: --merge does not matter for it.
    topk = GenerateConfig.build(base | {"method": "topk"})
    assert topk.effective_merge == 0
    assert topk.fingerprint() == GenerateConfig.build(base | {"method": "topk", "merge": 7}).fingerprint()
