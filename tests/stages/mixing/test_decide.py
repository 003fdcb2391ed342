"""The encoder actor's decisions (stages.mixing.decide) on a tiny tower, without Ray: rows filled with
the decision fields, masks consistent with them, and a lone image skipped, not self-paired."""
from __future__ import annotations

import numpy as np

from stages.mixing.decide import UnitDecider
from stages.units import PreparedUnit
from stages.model.factory import load_encoder
from schemas.shard import empty_row, sample_key
from tests.conftest import make_image


def unit(n_ok: int, extra_failed: int = 1) -> PreparedUnit:
    rows = [empty_row(key=sample_key(0, i), unit=0, index=i, status="ok", source_id=f"s{i}") for i in range(n_ok)]
    rows += [empty_row(key=sample_key(0, n_ok + i), unit=0, index=n_ok + i, status="failed", error="missing_file: x")
             for i in range(extra_failed)]
    pixels = np.stack([make_image(i, (64, 64)) for i in range(n_ok)]) if n_ok else np.zeros((0, 64, 64, 3), np.uint8)
    return PreparedUnit(0, rows, pixels)


def test_decisions_fill_the_rows_and_match_the_masks(tiny_model_config):
    encoder = load_encoder(str(tiny_model_config), "none", merge=16)
    decider = UnitDecider(encoder, method="mergemix", lam="beta:1.0", lam_mode="area", seed=3, batch_size=2,
                          describe={"method": "mergemix", "lam_mode": "area", **encoder.describe()})
    decided = decider.decide(unit(5))
    ok = [r for r in decided.rows if r["status"] == "ok"]
    assert decided.ok_keys == [r["key"] for r in ok] and decided.masks.shape == (5, 8, 8) and decided.losers is None
    for i, row in enumerate(ok):
        kept = int((decided.masks[i] == 255).sum())
        assert row["kept_patches"] == kept == int(row["lam"] * 64) and row["lam_hat"] == kept / 64
        assert row["partner_key"] == ok[int(decided.partners[i])]["key"] != row["key"]
        assert row["grid"] == [8, 8] and row["image_size"] == [64, 64] and len(row["saliency"]) == 64
    assert decided.rows[-1]["status"] == "failed" and decided.rows[-1]["lam"] is None


def test_a_lone_image_is_skipped_not_paired_with_itself(tiny_model_config):
    encoder = load_encoder(str(tiny_model_config), "none", merge=0)
    decider = UnitDecider(encoder, method="random", lam="fixed:0.5", lam_mode="area", seed=0, batch_size=4, describe={})
    decided = decider.decide(unit(1))
    assert decided.rows[0]["status"] == "skipped" and decided.rows[0]["error"].startswith("no_partner")
    assert decided.ok_keys == [] and decided.masks.shape == (0, 8, 8)
