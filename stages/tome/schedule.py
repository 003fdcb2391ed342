"""How many tokens each block merges: the schedule of R merges over the blocks before the
saliency layer. Plain Python (no torch), so the driver checks --merge against the tower's
geometry before any worker starts (stages.tome.merge runs it)."""
from __future__ import annotations

SCHEDULES = ("constant", "decreasing")


def max_merge(num_tokens: int) -> int:
    """Most tokens one bipartite step can remove: every non-CLS A token, at most one per B token."""
    num_a = (num_tokens + 1) // 2
    return min(num_a - 1, num_tokens // 2)


def merge_schedule(total: int, layers: int, num_tokens: int, kind: str = "constant") -> list[int]:
    """Spread `total` merges over `layers` blocks; returns merges per block (sums to `total`).

    constant: equal shares (the remainder goes to the earliest blocks); decreasing: shares
    proportional to layers-l, so early blocks merge most. A block never merges more than
    `max_merge` of the tokens entering it; any excess moves on to the next blocks.
    """
    if kind not in SCHEDULES:
        raise ValueError(f"unknown merge schedule {kind!r}; choose one of {', '.join(SCHEDULES)}")
    if total < 0:
        raise ValueError(f"merge total must be >= 0, got {total}")
    if total == 0:
        return [0] * layers
    if layers <= 0:
        raise ValueError(f"merge {total} needs at least one block before the saliency layer")
    weights = [1.0] * layers if kind == "constant" else [float(layers - i) for i in range(layers)]
    wanted = _apportion(total, weights)
    schedule, tokens, carry = [], num_tokens, 0
    for r in wanted:
        take = min(r + carry, max_merge(tokens))
        carry += r - take
        schedule.append(take)
        tokens -= take
    if carry:
        raise ValueError(
            f"cannot merge {total} of {num_tokens - 1} patch tokens in {layers} blocks "
            f"(each block removes at most half of its tokens); lower --merge or use a later --attn-layer"
        )
    return schedule


def _apportion(total: int, weights: list[float]) -> list[int]:
    """Integer shares of `total` proportional to `weights` (largest remainder, ties to earlier)."""
    norm = sum(weights)
    exact = [total * w / norm for w in weights]
    shares = [int(e) for e in exact]
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - shares[i]), i))
    for i in order[: total - sum(shares)]:
        shares[i] += 1
    return shares


def largest_merge(layers: int, num_tokens: int, kind: str = "constant") -> int:
    """The largest R that merge_schedule(R, layers, num_tokens, kind) accepts: 0 before the first
    block. Found downwards from the greedy bound (every block taking what max_merge allows), which
    the schedule's shares may not reach: its carry only moves on to later blocks."""
    bound, tokens = 0, num_tokens
    for _ in range(layers):
        take = max_merge(tokens)
        bound, tokens = bound + take, tokens - take
    for total in range(bound, 0, -1):
        try:
            merge_schedule(total, layers, num_tokens, kind)
            return total
        except ValueError:
            continue
    return 0
