"""Token Merging (ToMe) for open_clip ViT blocks, written from the algorithm.

One merge step (per image, no gradient): split the tokens by position parity into A (even,
CLS at 0) and B (odd), score every A token against every B token by cosine similarity of
the attention keys (averaged over heads), let each A token pick its best B partner, and
merge the `r` A tokens with the highest best-score into their partners as a size-weighted
mean. The new order is [unmerged A tokens in their original order (so CLS stays first),
then B tokens]. Sizes add, and a source map (patch -> token index) follows every merge, so
attention on merged tokens can be recovered onto the original patch grid.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from stages.tome.schedule import max_merge


@dataclass
class MergeState:
    """Tokens plus what merging needs to remember about them.

    size:   (B, N, 1) how many original tokens each token stands for.
    source: (B, L) for every original patch, the index of the token that holds it now
            (CLS is token 0 and is never merged, so patches map to 1..N-1).
    """

    x: torch.Tensor
    size: torch.Tensor
    source: torch.Tensor

    @classmethod
    def start(cls, x: torch.Tensor) -> "MergeState":
        batch, num_tokens, _ = x.shape
        # fp32 even under autocast: bf16 stops counting exactly past 256 patches per token.
        size = torch.ones(batch, num_tokens, 1, device=x.device, dtype=torch.float32)
        source = torch.arange(1, num_tokens, device=x.device).expand(batch, -1).contiguous()
        return cls(x, size, source)


@torch.no_grad()
def bipartite_merge(state: MergeState, metric: torch.Tensor, r: int) -> MergeState:
    """Remove `r` tokens per image by bipartite soft matching on `metric` (B, N, d)."""
    if r <= 0:
        return state
    x, size = state.x, state.size
    batch, num_tokens, width = x.shape
    r = min(r, max_merge(num_tokens))

    scores = _similarity(metric)
    best, best_b = scores.max(dim=-1)  # each A token's best B partner (the first of equals)
    order = torch.sort(best, dim=-1, descending=True, stable=True).indices
    src = order[:, :r]  # A tokens that merge away
    unm = order[:, r:].sort(dim=-1).values  # A tokens that stay, original order: CLS first
    dst = best_b.gather(1, src)

    num_a, num_b = (num_tokens + 1) // 2, num_tokens // 2
    x_a, x_b = x[:, ::2], x[:, 1::2]
    s_a, s_b = size[:, ::2], size[:, 1::2]
    src_w = src.unsqueeze(-1).expand(-1, -1, width)
    dst_w = dst.unsqueeze(-1).expand(-1, -1, width)
    # Size-weighted mean: B tokens accumulate (x * size) of the A tokens merged into them.
    weighted = (x_b.float() * s_b).scatter_add(1, dst_w, (x_a.float() * s_a).gather(1, src_w))
    s_b_new = s_b.scatter_add(1, dst.unsqueeze(-1), s_a.gather(1, src.unsqueeze(-1)))
    x_b_new = (weighted / s_b_new).to(x.dtype)
    x_new = torch.cat([x_a.gather(1, unm.unsqueeze(-1).expand(-1, -1, width)), x_b_new], dim=1)
    size_new = torch.cat([s_a.gather(1, unm.unsqueeze(-1)), s_b_new], dim=1)

    # Where every old token went, then push the patch -> token map through it.
    num_unm = num_a - r
    device = x.device
    new_of_a = torch.empty(batch, num_a, dtype=torch.long, device=device)
    new_of_a.scatter_(1, unm, torch.arange(num_unm, device=device).expand(batch, -1))
    new_of_a.scatter_(1, src, num_unm + dst)
    new_of_old = torch.empty(batch, num_tokens, dtype=torch.long, device=device)
    new_of_old[:, ::2] = new_of_a
    new_of_old[:, 1::2] = num_unm + torch.arange(num_b, device=device)
    return MergeState(x_new, size_new, new_of_old.gather(1, state.source))


def _similarity(metric: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every A token (even positions) to every B token (odd), (B, Na, Nb);
    the CLS row is -inf, so it never merges. In fp32: the ranking decides which tokens merge and
    must not depend on autocast."""
    m = metric.float()
    m = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    scores = m[:, ::2] @ m[:, 1::2].transpose(1, 2)
    scores[:, 0, :] = -torch.inf
    return scores


@torch.no_grad()
def matching_margin(metric: torch.Tensor, r: int) -> torch.Tensor:
    """(B,) how close one merge step's decisions are to a tie: the smallest cosine gap between
    each merged A token's best and second-best B partner, and between the r-th and (r+1)-th best
    scores (which A tokens merge). A gap within float noise (~1e-6) means another kernel, thread
    count or device may merge differently; inf where nothing is decided. A diagnostic of
    determinism (tests/test_output_digest.py), not on the hot path."""
    batch = metric.shape[0]
    r = min(r, max_merge(metric.shape[1]))
    if r <= 0:
        return torch.full((batch,), torch.inf)
    scores = _similarity(metric)
    top2 = scores.topk(min(2, scores.shape[-1]), dim=-1).values  # (B, Na, 2)
    best = top2[..., 0]
    ranked, order = torch.sort(best, dim=-1, descending=True, stable=True)
    partner_gap = top2[..., 0] - top2[..., -1] if scores.shape[-1] > 1 else torch.full_like(best, torch.inf)
    margin = partner_gap.gather(1, order[:, :r]).min(dim=1).values
    if r < ranked.shape[1] - 1:  # the CLS row (-inf) always ranks last and is never a candidate
        margin = torch.minimum(margin, ranked[:, r - 1] - ranked[:, r])
    return margin.cpu()
