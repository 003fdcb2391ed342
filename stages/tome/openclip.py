"""Token merging inside open_clip's ViT blocks: the adaptation of the algorithm (stages.tome.merge)
to one library's modules.

Both open_clip block types (nn.MultiheadAttention and open_clip's own Attention) keep the
same parameter names (ln_1, attn.in_proj_weight/bias, attn.out_proj, ls_1, ln_2, mlp, ls_2,
optional ln_q/ln_k/ln_inner/ln_attn/head_scale), which is all these functions use. A block
runs attention on the (possibly merged) tokens with the fused kernel, merges `r` tokens by
the attention keys, then runs its MLP on the shorter sequence. At the saliency block only
the CLS query's row is computed (O(tokens) per head), never the whole N x N map.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from stages.errors import UserError
from stages.tome.merge import MergeState, bipartite_merge, matching_margin


def check_supported(visual: nn.Module) -> None:
    """Refuse, in one line, a vision tower whose class-token attention is no saliency or whose
    attention these functions cannot run."""
    blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    if blocks is None or not hasattr(visual, "conv1"):
        raise UserError(f"{type(visual).__name__} is not an open_clip VisionTransformer; token merging needs a ViT tower")
    if getattr(visual, "attn_pool", None) is not None:
        raise UserError("vision towers with attentional pooling are not supported: class-token attention is no saliency there")
    if getattr(visual, "pool_type", "tok") != "tok":
        raise UserError(f"vision towers pooled by {visual.pool_type!r} are not supported: their class token is never read out")
    attn = blocks[0].attn
    if getattr(attn, "logit_scale", None) is not None:
        raise UserError("scaled-cosine attention towers are not supported")
    if isinstance(attn, nn.MultiheadAttention) and not attn._qkv_same_embed_dim:
        raise UserError("attention with separate q/k/v projections is not supported")


def merged_block(block: nn.Module, state: MergeState, r: int, prop_attn: bool,
                 margins: list | None = None) -> MergeState:
    """One residual block on merged tokens, removing `r` tokens between attention and MLP.
    `margins`, when given, collects how close the block's merge decisions came to a tie."""
    o, k = _attention(block, state, prop_attn)
    state = MergeState(state.x + block.ls_1(o), state.size, state.source)
    metric = k.mean(dim=1)  # keys averaged over heads, per image
    if margins is not None:
        margins.append(matching_margin(metric, r))
    state = bipartite_merge(state, metric, r)
    x = state.x + block.ls_2(block.mlp(block.ln_2(state.x)))
    return MergeState(x, state.size, state.source)


def cls_attention(block: nn.Module, state: MergeState, prop_attn: bool) -> torch.Tensor:
    """CLS query against all keys at `block`, softmax, heads summed: (B, N), fp32."""
    attn = block.attn
    h = block.ln_1(state.x)
    width = h.shape[-1]
    w_q, w_k = attn.in_proj_weight[:width], attn.in_proj_weight[width : 2 * width]
    b = attn.in_proj_bias
    b_q, b_k = (None, None) if b is None else (b[:width], b[width : 2 * width])
    batch, n, _ = h.shape
    heads = attn.num_heads
    q = F.linear(h[:, :1], w_q, b_q).reshape(batch, 1, heads, -1).transpose(1, 2)
    k = F.linear(h, w_k, b_k).reshape(batch, n, heads, -1).transpose(1, 2)
    q, k = _apply(attn, "ln_q", q), _apply(attn, "ln_k", k)
    logits = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])  # (B, H, 1, N)
    if prop_attn:
        logits = logits + state.size.float().log().transpose(1, 2).unsqueeze(1)
    return logits.softmax(dim=-1).sum(dim=1).squeeze(1)


def _attention(block: nn.Module, state: MergeState, prop_attn: bool):
    """Attention sub-block on the (possibly merged) tokens; returns output and keys."""
    attn = block.attn
    q, k, v = _qkv(block, block.ln_1(state.x))
    # Proportional attention: a token standing for s patches gets log(s) added to its logits.
    bias = state.size.log().to(q.dtype).transpose(1, 2).unsqueeze(1) if prop_attn else None  # (B, 1, 1, N)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    if getattr(attn, "head_scale", None) is not None:
        o = o * attn.head_scale
    o = o.transpose(1, 2).flatten(2)
    o = attn.out_proj(_apply(attn, "ln_inner", o))
    o = _apply(block, "ln_attn", o)
    return o, k


def _qkv(block: nn.Module, h: torch.Tensor):
    attn = block.attn
    batch, n, width = h.shape
    heads = attn.num_heads
    q, k, v = F.linear(h, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t.reshape(batch, n, heads, width // heads).transpose(1, 2) for t in (q, k, v))
    q, k = _apply(attn, "ln_q", q), _apply(attn, "ln_k", k)
    return q, k, v


def _apply(module: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    """Apply an optional sub-module (open_clip uses nn.Identity or omits it when unused)."""
    sub = getattr(module, name, None)
    return x if sub is None else sub(x)
