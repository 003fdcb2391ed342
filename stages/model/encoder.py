"""The pixel-to-saliency encoder: an open_clip ViT run block by block with token merging,
returning the CLS-row attention of one block recovered onto the patch grid.

`MergingEncoder` wraps a built vision tower (stages.model.factory builds it with the settings of its
weights): it embeds uint8 pixels with the normalisation folded into the patch embedding,
runs the blocks before the saliency layer with merging (stages.tome.openclip, the adapter of
the ToMe algorithm in stages.tome.merge), and at the saliency layer computes only the CLS query's
attention row. With R = 0 it reproduces the stock tower exactly (tests/test_encoder.py).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stages.errors import UserError
from stages.tome.merge import MergeState
from stages.tome.schedule import merge_schedule
from stages.tome.openclip import check_supported, cls_attention, merged_block
from stages.model.constants import OPENAI_MEAN, OPENAI_STD
from stages.model.tower import Tower

COMPILE_BACKEND_ENV = "MERGEMIX_COMPILE_BACKEND"  # torch.compile backend for --compile; default inductor


@dataclass
class Saliency:
    """Encoder output for a batch of B images.

    grid:          (B, gh, gw) float32, CLS attention (heads summed) recovered onto the patch grid.
    token_scores:  (B, K) float32, the same attention per merged patch token (K = L - R).
    source:        (B, L) int64, index in [0, K) of the merged token each patch belongs to,
                   as the map stood at the saliency layer's input.
    tokens_per_layer: tokens (CLS included) entering each block up to the saliency layer (the
                   schedule as it ran; the tests check it against the schedule).
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
        check_supported(visual)
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
        self._run = self._blocks  # torch.compile'd by enable_compile
        self.compiled = False
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

    def _autocast(self):
        dtype = self.autocast_dtype  # set by load_encoder on CUDA; tests set it on CPU to run the same path
        return torch.autocast(device_type=self.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)

    @torch.no_grad()
    def saliency(self, images: torch.Tensor) -> Saliency:
        """Saliency for normalised images (B, 3, H, W); stops at the saliency layer."""
        if images.ndim != 4 or tuple(images.shape[-2:]) != self.image_size:
            raise ValueError(f"expected images of shape (B, 3, {self.image_size[0]}, {self.image_size[1]}), got {tuple(images.shape)}")
        return self._saliency(images.to(self.device), from_pixels=False)

    def _saliency(self, images: torch.Tensor, from_pixels: bool) -> Saliency:
        with self._autocast():
            cls_row, source, counts = self._run(images, from_pixels)
        token_scores = cls_row[:, 1:].float()
        source = source - 1  # token index -> patch-token index in [0, K)
        grid = token_scores.gather(1, source).view(-1, *self.grid)
        return Saliency(grid=grid, token_scores=token_scores, source=source, tokens_per_layer=list(counts))

    def _blocks(self, images: torch.Tensor, from_pixels: bool):
        """Embedding, merged blocks and the CLS row: (CLS attention (B, N), source map, tokens per block).
        No host synchronisation inside (tests/test_encoder.py), so it can run ahead of the device."""
        state = MergeState.start(self._embed_pixels(images) if from_pixels else self._embed(images))
        counts = []
        for block, r in zip(self.blocks, self.schedule):
            counts.append(state.x.shape[1])
            state = merged_block(block, state, r, self.prop_attn)
        counts.append(state.x.shape[1])
        return cls_attention(self.blocks[self.attn_layer], state, self.prop_attn), state.source, counts

    def enable_compile(self) -> None:
        """Run the blocks through torch.compile (`--compile`): one graph per batch shape, so callers
        keep one (stages.mixing.decide pads the last batch). Results equal the eager ones to float rounding.
        MERGEMIX_COMPILE_BACKEND picks another backend than inductor (the tests use aot_eager: the same
        graph capture without half a minute of C++ compilation on a CI machine)."""
        self._run = torch.compile(self._blocks, dynamic=False, backend=os.environ.get(COMPILE_BACKEND_ENV, "inductor"))
        self.compiled = True

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
        return self._saliency(self._centred(pixels), from_pixels=True)

    def _centred(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) -> float pixels minus 128 on the device, (B, 3, H, W) channels-last."""
        if self.device.type == "cuda" and pixels.device.type == "cpu":
            pixels = pixels.pin_memory()
        pixels = pixels.to(self.device, non_blocking=True)
        # One pass uint8 -> float into a reused buffer (a fresh CPU buffer costs more in page
        # faults than the conversion itself); the channels-last view feeds the convolution as is.
        return self._staging(pixels.shape).copy_(pixels).sub_(128.0).permute(0, 3, 1, 2)

    @torch.no_grad()
    def merge_margins(self, pixels: torch.Tensor | np.ndarray) -> torch.Tensor:
        """(B,) the smallest gap of any merge decision before the saliency layer
        (stages.tome.matching_margin); inf without merging. Decisions within float noise of a tie
        may go another way on another CPU kernel or device: tests use this to prove their data
        has none."""
        pixels = torch.as_tensor(pixels)
        margins: list[torch.Tensor] = []
        with self._autocast():
            state = MergeState.start(self._embed_pixels(self._centred(pixels)))
            for block, r in zip(self.blocks, self.schedule):
                state = merged_block(block, state, r, self.prop_attn, margins)
        inf = torch.full((len(pixels),), torch.inf)
        return torch.stack(margins).min(dim=0).values if margins else inf

    def _staging(self, shape: torch.Size) -> torch.Tensor:
        """A float32 buffer of `shape` on the device, kept between calls and grown as needed."""
        buf = self._staging_buffer
        if buf is None or buf.device != self.device or buf.shape[1:] != shape[1:] or buf.shape[0] < shape[0]:
            buf = self._staging_buffer = torch.empty(shape, dtype=torch.float32, device=self.device)
        return buf[: shape[0]]

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Full tower (merging in the scheduled blocks) to the pooled, projected embedding."""
        with self._autocast():
            return self._embedding(self._embed(images.to(self.device)))

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor | np.ndarray) -> torch.Tensor:
        """encode_image for uint8 pixels (B, H, W, 3) at the encoder geometry (the folded normalisation)."""
        with self._autocast():
            return self._embedding(self._embed_pixels(self._centred(torch.as_tensor(pixels)))).float()

    def _embedding(self, tokens: torch.Tensor) -> torch.Tensor:
        v = self.visual
        state = MergeState.start(tokens)
        for i, block in enumerate(self.blocks):
            state = merged_block(block, state, self.schedule[i] if i < len(self.schedule) else 0, self.prop_attn)
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
