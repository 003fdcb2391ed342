"""The ToMe algorithm (stages.tome.merge) on plain tensors: bipartite merging keeps CLS first, never
merges it, conserves the size-weighted mass and tracks every patch; the schedule rules."""
from __future__ import annotations

import pytest
import torch

from stages.tome.merge import MergeState, bipartite_merge, matching_margin
from stages.tome.schedule import max_merge, merge_schedule


def test_merge_keeps_cls_first_and_conserves_mass():
    torch.manual_seed(1)
    x = torch.randn(2, 17, 8)
    state = MergeState.start(x)
    for r in (5, 3, 2):
        before = (state.x * state.size).sum(1)
        metric = torch.randn(*state.x.shape[:2], 4)
        metric[:, 0] = metric[:, 1]  # CLS looks exactly like a patch: it must still never merge
        state = bipartite_merge(state, metric, r)
        torch.testing.assert_close((state.x * state.size).sum(1), before, atol=1e-5, rtol=1e-5)
        assert torch.equal(state.x[:, 0], x[:, 0]) and (state.size[:, 0] == 1).all()
    assert state.x.shape[1] == 17 - 10
    assert (state.size.sum(1).squeeze(-1) == 17).all()
    sizes_from_source = torch.stack([torch.bincount(s, minlength=7) for s in state.source])
    assert torch.equal(sizes_from_source[:, 1:], state.size[:, 1:, 0].long())


def test_schedule_rules():
    assert merge_schedule(98, 10, 197) == [10] * 8 + [9] * 2
    ramp = merge_schedule(98, 10, 197, "decreasing")
    assert sum(ramp) == 98 and ramp == sorted(ramp, reverse=True) and ramp[0] > ramp[-1]
    assert merge_schedule(288, 22, 577) == [14, 14] + [13] * 20
    assert merge_schedule(0, 5, 65) == [0] * 5
    assert max_merge(65) == 32 and max_merge(2) == 0
    capped = merge_schedule(40, 2, 65)  # 20 + 20 wanted, first block can do 32: fine as is
    assert capped == [20, 20]
    with pytest.raises(ValueError, match="cannot merge"):
        merge_schedule(60, 2, 65)
    with pytest.raises(ValueError, match="schedule"):
        merge_schedule(10, 2, 65, "sideways")


def test_source_map_follows_every_merge():
    """Every original patch maps to exactly one token, and the tokens' sizes count their patches."""
    torch.manual_seed(2)
    state = MergeState.start(torch.randn(3, 65, 16))
    for r in merge_schedule(40, 3, 65):
        state = bipartite_merge(state, torch.randn(*state.x.shape[:2], 8), r)
    assert state.x.shape[1] == 65 - 40
    assert state.source.shape == (3, 64) and int(state.source.min()) >= 1 and int(state.source.max()) < 25
    counts = torch.stack([torch.bincount(s, minlength=25) for s in state.source])
    assert torch.equal(counts[:, 1:], state.size[:, 1:, 0].long()) and bool((counts[:, 0] == 0).all())


def test_exact_ties_merge_into_the_first_partner_and_the_margin_says_so():
    """Two B tokens that look exactly alike: each A token picks the first (lower index) on any
    kernel, and matching_margin reports the tie as 0; distinct tokens give a positive margin."""
    torch.manual_seed(3)
    metric = torch.randn(1, 9, 4)
    metric[0, 3] = metric[0, 1]  # B tokens 0 and 1 (positions 1 and 3) are the same
    metric[0, 2] = metric[0, 1] + 1e-3 * torch.randn(4)  # A token 1 is nearly them: it merges first
    state = bipartite_merge(MergeState.start(torch.randn(1, 9, 4)), metric, 1)
    # A token 1 (position 2) merged into B token 0 (position 1): its new index is num_unm (4) + 0
    assert int(state.source[0, 1]) == 4 and int(state.source[0, 0]) == 4
    assert float(matching_margin(metric, 1)[0]) == 0.0
    assert float(matching_margin(torch.randn(2, 9, 4), 2).min()) > 0
    assert torch.isinf(matching_margin(metric, 0)).all()
