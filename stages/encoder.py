"""A CLIP vision tower with token merging that returns CLS-attention saliency on the patch grid.

`load_encoder` builds any open_clip ViT (model name, model-config JSON or hf-hub:ORG/REPO;
pretrained tag, local checkpoint or none) as open_clip builds it for those weights, with
their activation and mean/std applied (stages.tower), and wraps its vision tower in
`MergingEncoder`. The encoder runs
the tower's own weights block by block, merging tokens (stages.tome) in the blocks before
the saliency layer, and at the saliency layer computes only the CLS query row of the
attention (O(tokens) per head) instead of the whole N x N map. Both open_clip block types
(nn.MultiheadAttention and open_clip's own Attention) keep the same parameter names
(ln_1, attn.in_proj_weight/bias, attn.out_proj, ls_1, ln_2, mlp, ls_2), which is all we use.
"""
from __future__ import annotations

import contextlib
import logging
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stages.errors import UserError
from stages.tome import MergeState, bipartite_merge, merge_schedule
from stages.tower import OPENAI_MEAN, OPENAI_STD, Tower, resolve_tower
from stages.tower import model_geometry, resolve_pretrained  # noqa: F401  (pipeline.run imports them from here)

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Saliency:
    """Encoder output for a batch of B images.

    grid:          (B, gh, gw) float32, CLS attention (heads summed) recovered onto the patch grid.
    token_scores:  (B, K) float32, the same attention per merged patch token (K = L - R).
    source:        (B, L) int64, index in [0, K) of the merged token each patch belongs to,
                   as the map stood at the saliency layer's input.
    tokens_per_layer: tokens (CLS included) entering each block up to the saliency layer.
    """

    grid: torch.Tensor
    token_scores: torch.Tensor
    source: torch.Tensor
    tokens_per_layer: list[int] = field(default_factory=list)


class MergingEncoder(nn.Module):
    """open_clip VisionTransformer + token merging + CLS-row saliency at one block."""

    def __init__(
        self,
        visual: nn.Module,
        merge: int = 0,
        attn_layer: int = -2,
        prop_attn: bool = False,
        schedule: str = "constant",
        mean: Sequence[float] = OPENAI_MEAN,
        std: Sequence[float] = OPENAI_STD,
    ):
        super().__init__()
        _check_supported(visual)
        self.visual = visual.eval()
        self.blocks = visual.transformer.resblocks
        depth = len(self.blocks)
        if not -depth <= attn_layer < depth:
            raise UserError(f"--attn-layer {attn_layer} is outside the tower's {depth} blocks (use 0..{depth - 1} or -1..-{depth})")
        self.attn_layer = attn_layer % depth
        self.image_size = tuple(visual.image_size)
        self.patch = tuple(visual.patch_size)
        self.grid = tuple(visual.grid_size)
        self.num_patches = self.grid[0] * self.grid[1]
        self.prop_attn = prop_attn
        self.merge_total = merge
        try:
            self.schedule = merge_schedule(merge, self.attn_layer, self.num_patches + 1, schedule)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        self.norm_mean, self.norm_std = [float(v) for v in mean], [float(v) for v in std]  # as given, for the rows
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.autocast_dtype: torch.dtype | None = None
        self.tower: Tower | None = None  # set by load_encoder: what was built, with which settings
        self._staging_buffer: torch.Tensor | None = None
        for p in self.parameters():
            p.requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return self.visual.conv1.weight.device

    @property
    def activation(self) -> str:
        """The MLP activation the blocks really run ("QuickGELU" or "GELU")."""
        return type(self.blocks[0].mlp.gelu).__name__

    @property
    def tokens_kept(self) -> int:
        return self.num_patches - self.merge_total

    # --- the forward pass, one block at a time ------------------------------------------

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images (B, 3, H, W) -> tokens entering the first block."""
        return self._tokens(self.visual.conv1(images))

    def _embed_pixels(self, centred: torch.Tensor) -> torch.Tensor:
        """Pixels minus 128 (B, 3, H, W, any layout) -> the same tokens as `_embed`.

        The CLIP normalisation (x / 255 - mean) / std is affine per channel, so it folds into
        the patch convolution: weights scaled by 1 / (255 std), plus a constant per output
        channel. That saves three full passes over the batch in float. Pixels are centred on
        128 (exact in bf16/fp16 too) so the constant stays small and nothing cancels. The folded
        weights are derived per call (tiny next to the convolution), so they follow any change
        to the tower's weights."""
        conv = self.visual.conv1
        weight = conv.weight / (255.0 * self.std)  # std, mean: (1, 3, 1, 1)
        bias = (conv.weight * ((128.0 / 255.0 - self.mean) / self.std)).sum(dim=(1, 2, 3))
        if conv.bias is not None:
            bias = bias + conv.bias
        return self._tokens(F.conv2d(centred, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups))

    def _tokens(self, patches: torch.Tensor) -> torch.Tensor:
        v = self.visual
        x = patches.flatten(2).transpose(1, 2)  # (B, L, C)
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
        return v.ln_pre(x)  # patch dropout is the identity in eval

    def _qkv(self, block: nn.Module, h: torch.Tensor):
        attn = block.attn
        batch, n, width = h.shape
        heads = attn.num_heads
        q, k, v = F.linear(h, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.reshape(batch, n, heads, width // heads).transpose(1, 2) for t in (q, k, v))
        q, k = _apply(attn, "ln_q", q), _apply(attn, "ln_k", k)
        return q, k, v

    def _attention(self, block: nn.Module, state: MergeState):
        """Attention sub-block on the (possibly merged) tokens; returns output and keys."""
        attn = block.attn
        q, k, v = self._qkv(block, block.ln_1(state.x))
        bias = self._size_bias(state, q.dtype)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        if getattr(attn, "head_scale", None) is not None:
            o = o * attn.head_scale
        o = o.transpose(1, 2).flatten(2)
        o = attn.out_proj(_apply(attn, "ln_inner", o))
        o = _apply(block, "ln_attn", o)
        return o, k

    def _size_bias(self, state: MergeState, dtype: torch.dtype) -> torch.Tensor | None:
        """Proportional attention: a token standing for s patches gets log(s) added to its logits."""
        if not self.prop_attn:
            return None
        return state.size.log().to(dtype).transpose(1, 2).unsqueeze(1)  # (B, 1, 1, N)

    def _cls_attention(self, block: nn.Module, state: MergeState) -> torch.Tensor:
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
        if self.prop_attn:
            logits = logits + state.size.float().log().transpose(1, 2).unsqueeze(1)
        return logits.softmax(dim=-1).sum(dim=1).squeeze(1)

    def _block(self, block: nn.Module, state: MergeState, r: int) -> MergeState:
        o, k = self._attention(block, state)
        state = MergeState(state.x + block.ls_1(o), state.size, state.source)
        state = bipartite_merge(state, k.mean(dim=1), r)  # keys averaged over heads, per image
        x = state.x + block.ls_2(block.mlp(block.ln_2(state.x)))
        return MergeState(x, state.size, state.source)

    def _autocast(self):
        dtype = self.autocast_dtype  # set by load_encoder on CUDA; tests set it on CPU to run the same path
        return torch.autocast(device_type=self.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)

    @torch.no_grad()
    def saliency(self, images: torch.Tensor) -> Saliency:
        """Saliency for normalised images (B, 3, H, W); stops at the saliency layer."""
        if images.ndim != 4 or tuple(images.shape[-2:]) != self.image_size:
            raise ValueError(f"expected images of shape (B, 3, {self.image_size[0]}, {self.image_size[1]}), got {tuple(images.shape)}")
        return self._saliency(images.to(self.device), self._embed)

    def _saliency(self, images: torch.Tensor, embed) -> Saliency:
        with self._autocast():
            state = MergeState.start(embed(images))
            counts = []
            for block, r in zip(self.blocks, self.schedule):
                counts.append(state.x.shape[1])
                state = self._block(block, state, r)
            counts.append(state.x.shape[1])
            cls_row = self._cls_attention(self.blocks[self.attn_layer], state)
        token_scores = cls_row[:, 1:].float()
        source = state.source - 1  # token index -> patch-token index in [0, K)
        grid = token_scores.gather(1, source).view(-1, *self.grid)
        return Saliency(grid=grid, token_scores=token_scores, source=source, tokens_per_layer=counts)

    @torch.no_grad()
    def saliency_from_pixels(self, pixels: torch.Tensor | np.ndarray) -> Saliency:
        """Saliency for uint8 pixels (B, H, W, 3) at the encoder geometry.

        uint8 goes to the device (4x less traffic than fp32); the normalisation is folded into
        the patch embedding (`_embed_pixels`).
        """
        pixels = torch.as_tensor(pixels)
        if pixels.dtype != torch.uint8 or pixels.ndim != 4 or pixels.shape[-1] != 3:
            raise ValueError(f"expected uint8 pixels (B, H, W, 3), got {pixels.dtype} {tuple(pixels.shape)}")
        if tuple(pixels.shape[1:3]) != self.image_size:
            raise ValueError(f"expected pixels of shape (B, {self.image_size[0]}, {self.image_size[1]}, 3), got {tuple(pixels.shape)}")
        if self.device.type == "cuda" and pixels.device.type == "cpu":
            pixels = pixels.pin_memory()
        pixels = pixels.to(self.device, non_blocking=True)
        # One pass uint8 -> float into a reused buffer (a fresh CPU buffer costs more in page
        # faults than the conversion itself); the channels-last view feeds the convolution as is.
        x = self._staging(pixels.shape).copy_(pixels).sub_(128.0).permute(0, 3, 1, 2)
        return self._saliency(x, self._embed_pixels)

    def _staging(self, shape: torch.Size) -> torch.Tensor:
        """A float32 buffer of `shape` on the device, kept between calls and grown as needed."""
        buf = self._staging_buffer
        if buf is None or buf.device != self.device or buf.shape[1:] != shape[1:] or buf.shape[0] < shape[0]:
            buf = self._staging_buffer = torch.empty(shape, dtype=torch.float32, device=self.device)
        return buf[: shape[0]]

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Full tower (merging in the scheduled blocks) to the pooled, projected embedding."""
        v = self.visual
        with self._autocast():
            state = MergeState.start(self._embed(images.to(self.device)))
            for i, block in enumerate(self.blocks):
                state = self._block(block, state, self.schedule[i] if i < len(self.schedule) else 0)
            pooled, _ = v._pool(state.x)
            return pooled @ v.proj if v.proj is not None else pooled

    def describe(self) -> dict:
        """What a shard records about the encoder."""
        return {
            "merge_total": self.merge_total,
            "merge_schedule": list(self.schedule),
            "attn_layer": self.attn_layer,
            "prop_attn": self.prop_attn,
            "grid": list(self.grid),
            "image_size": list(self.image_size),
            "patch_size": list(self.patch),
            "activation": self.activation,
            "norm_mean": list(self.norm_mean),
            "norm_std": list(self.norm_std),
            "interpolation": self.tower.interpolation if self.tower is not None else None,
        }


def _apply(module: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    """Apply an optional sub-module (open_clip uses nn.Identity or omits it when unused)."""
    sub = getattr(module, name, None)
    return x if sub is None else sub(x)


def _check_supported(visual: nn.Module) -> None:
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


# --- loading ---------------------------------------------------------------------------


def load_encoder(
    model: str = "ViT-L-14-336",
    pretrained: str | None = "openai",
    *,
    merge: int = 0,
    attn_layer: int = -2,
    prop_attn: bool = False,
    schedule: str = "constant",
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    quick_gelu: bool | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> MergingEncoder:
    """Build the encoder. `model`: open_clip name, path to a model-config JSON, or
    hf-hub:ORG/REPO; `pretrained`: open_clip tag, local checkpoint path, None/"none" for
    random weights (for hf-hub: the model string itself for its repo's weights).

    The tower is the network open_clip builds for these weights with their settings applied
    (stages.tower): a tag's or hub repo's activation and mean/std; for a local checkpoint or
    random weights `quick_gelu`, `mean`, `std` say how it was trained (default: the configs)."""
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    tower = resolve_tower(model, pretrained, quick_gelu=quick_gelu, mean=mean, std=std)
    checkpoint = resolve_pretrained(model, tower.weights)
    if checkpoint is None:
        log.warning("RANDOM WEIGHTS: %s built with --pretrained none; saliency is meaningless for real data", model)
    clip = build_clip(tower, checkpoint)
    visual = clip.visual
    del clip  # the text tower is not needed
    encoder = MergingEncoder(visual, merge, attn_layer, prop_attn, schedule, tower.mean, tower.std)
    encoder.tower = tower
    encoder.to(device)
    if torch.device(device).type == "cuda" and precision != "fp32":
        encoder.autocast_dtype = PRECISIONS[precision]
    return encoder


def build_clip(tower: Tower, checkpoint: str | None, device: str | torch.device = "cpu") -> nn.Module:
    """open_clip's model for `tower`: its config, its activation, `checkpoint` (None: seeded
    random weights) and its mean/std/interpolation as the model's preprocess config.
    device="meta" builds the structure only, without allocating or initialising weights."""
    import open_clip

    settings = {"mean": tower.mean, "std": tower.std, "interpolation": tower.interpolation}
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(0)  # random weights are the same in every process: runs stay reproducible
        return open_clip.create_model(tower.name, pretrained=checkpoint, weights_only=True, device=device,
                                      force_preprocess_cfg=settings, quick_gelu=tower.quick_gelu)


@contextlib.contextmanager
def collect_messages(into: list[str]):
    """Collect the warnings and WARNING+ log records raised in the block (ours, open_clip's)
    into `into` as one-line strings instead of printing them. Inside a Ray actor they would
    never reach the user: the actor hands them to the driver, which prints each once."""

    def origin(name: str, path: str) -> str:  # open_clip logs to the root logger: name its package instead
        return name if name not in ("root", "") else Path(path).parent.name

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            into.append(f"{origin(record.name, record.pathname)}: {record.getMessage()}")

    handler = Collect(level=logging.WARNING)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield into
    finally:
        root.removeHandler(handler)
        into.extend(f"{origin('', w.filename)}: {w.category.__name__}: {w.message}" for w in caught)
