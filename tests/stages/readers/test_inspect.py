"""`inspect` (stages.readers.inspect): the human report of an output."""
from __future__ import annotations

import numpy as np
import pytest

from stages.readers.inspect import inspect_output, text_histogram
from tests.shard_fixtures import make_output


@pytest.fixture
def out(tmp_path):
    return make_output(tmp_path / "out", units=(0, 1), image_format="png")


def test_inspect_report(out):
    report = inspect_output(out)
    assert "units        2 committed, 0 uncommitted" in report
    assert "inputs       12: ok 8 (66.7%), failed 2, skipped 2" in report
    assert "failed   decode" in report and "skipped  filter" in report
    assert "methods      mergemix 8" in report and "model        mm-tiny-vit 8" in report
    assert "png 8   32x48 px, grid 4x6" in report
    for name in ("lam", "lam_hat", "margin"):
        assert f"\n{name:<12} mean" in report
    assert "[0.9, 1.0]" in report and "fingerprint  fp-test" in report


def test_text_histogram_counts_and_scales():
    lines = text_histogram(np.array([0.05, 0.05, 0.95, 1.0]), bins=2, width=4)
    assert lines == ["  [0.0, 0.5)  ####  2", "  [0.5, 1.0]  ####  2"]
