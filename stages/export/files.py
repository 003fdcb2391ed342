"""What the JSON exports (swift, llava) share: the images as files under DEST, byte for byte
the tar members (no re-encoding), and the pair's numbers."""
from __future__ import annotations

from pathlib import Path

from stages.export.pairs import Pair


def save_images(dest: Path, pair: Pair) -> tuple[str, str]:
    """Write the winner and the loser under DEST/images/UNIT/; returns their paths relative to DEST."""
    paths = []
    for part, data in (("winner", pair.winner), ("loser", pair.loser)):
        rel = pair.image_path(part)
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        paths.append(rel)
    return paths[0], paths[1]


def ratios(pair: Pair) -> dict:
    """The numbers every export carries: margin (gamma = 1 - lam_hat), lam_hat, lam; and for the
    image-side negatives the method and its drawn parameters (JSON), which rebuild the loser."""
    numbers = {name: pair.record.get(name) for name in ("margin", "lam_hat", "lam")}
    if pair.record.get("method_params") is not None:
        numbers |= {"method": pair.record["method"], "method_params": pair.record["method_params"]}
    return numbers


class MarginStats:
    """Running mean / min / max of the margins written (the README's one global gamma)."""

    def __init__(self):
        self.n, self.total, self.low, self.high = 0, 0.0, None, None

    def add(self, margin) -> None:
        if margin is None:
            return
        self.n, self.total = self.n + 1, self.total + margin
        self.low = margin if self.low is None else min(self.low, margin)
        self.high = margin if self.high is None else max(self.high, margin)

    @property
    def mean(self) -> float:
        return self.total / self.n if self.n else 0.0

    def line(self) -> str:
        if not self.n:
            return "no margins recorded"
        return f"mean {self.mean:.4f}, min {self.low:.4f}, max {self.high:.4f} over {self.n} pairs"
