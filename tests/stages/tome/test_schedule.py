"""largest_merge: the R the check and --attn-layer auto give each block is one merge_schedule accepts,
and one more is refused."""
from __future__ import annotations

import pytest

from stages.tome.schedule import SCHEDULES, largest_merge, merge_schedule


@pytest.mark.parametrize("kind", SCHEDULES)
@pytest.mark.parametrize("tokens", [50, 65, 197, 577])
def test_largest_merge_is_the_schedules_limit(kind, tokens):
    assert largest_merge(0, tokens, kind) == 0
    for layers in range(1, 8):
        top = largest_merge(layers, tokens, kind)
        assert sum(merge_schedule(top, layers, tokens, kind)) == top
        with pytest.raises(ValueError):
            merge_schedule(top + 1, layers, tokens, kind)


def test_constant_shares_reach_less_than_greedy():
    # 64 patches + CLS in 2 blocks: greedy 32 + 16 = 48, but equal shares of 24 leave 41 tokens,
    # of which the second block can merge 20: the constant schedule tops out at 43.
    assert largest_merge(2, 65, "constant") == 43 and largest_merge(2, 65, "decreasing") == 48
