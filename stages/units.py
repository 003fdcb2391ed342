"""The messages between `generate`'s processes, and nothing else: the driver hands a prepare
task a `Unit`, the prepare task hands the encoder actor and the write task a `PreparedUnit`, the
actor hands the write task its `UnitDecisions`. Plain data (numpy, no torch), so every process
that unpickles them stays light: a CPU task worker never imports torch."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from stages.inputs.records import Slice


@dataclass
class Unit:
    """Work unit `unit_id` = output shard `unit_id`: the inputs of `slice`."""

    unit_id: int
    slice: Slice

    @property
    def size(self) -> int:
        return self.slice.count


@dataclass
class PreparedUnit:
    unit_id: int
    rows: list[dict]  # one per input, in input order
    pixels: np.ndarray  # (n_ok, H, W, 3) uint8, rows with status "ok" in order (torch path: the ones decoded here)
    timings: dict = field(default_factory=dict)
    # Torch image path only: per ok row, its JPEG bytes for the actor to decode, or None where the
    # next image of `pixels` is that row's. None on the pil path: `pixels` holds every ok row.
    jpegs: list[bytes | None] | None = None

    @property
    def ok_rows(self) -> list[dict]:
        return [r for r in self.rows if r["status"] == "ok"]


@dataclass
class UnitDecisions:
    """What the actor decided for one unit. Index i runs over the ok rows, in row order, and
    is also the image's index in the PreparedUnit's pixels."""

    unit_id: int
    rows: list[dict]  # every row; the ok ones carry the decisions
    masks: np.ndarray  # (n_ok, gh, gw) uint8, 255 = patch from the winner (mixup: its blend weight)
    partners: np.ndarray  # (n_ok,) index of each sample's partner x_j
    losers: np.ndarray | None = None  # (n_ok, H, W, 3), only for methods that are not a patch selection
    timings: dict = field(default_factory=dict)
    winners: np.ndarray | None = None  # torch image path: (n_ok, H, W, 3), the images the encoder saw
    encoded: list[tuple[bytes, bytes]] | None = None  # actor-encoded (winner, loser) JPEGs, per ok sample
    images: dict = field(default_factory=dict)  # torch image path: how the unit's images were decoded

    @property
    def ok_keys(self) -> list[str]:
        return [r["key"] for r in self.rows if r["status"] == "ok"]

    @property
    def extra_stats(self) -> dict:
        """What the unit's stats file records of the actor's work."""
        return {"timings": self.timings, **({"images": self.images} if self.images else {})}
