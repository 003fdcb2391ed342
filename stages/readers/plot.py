"""`inspect --plot FILE.png`: an output as pictures. Six panels: lam, lam_hat and margin
histograms; inputs that are not ok, by reason; the area kept from the winner against lam;
and the mean saliency map over the run (each map scaled so that 1 = uniform attention, so
images with sharper attention do not outweigh the rest).

Reads the Parquet files unit by unit (never the tars) and keeps running sums, so an output of
any size fits in memory; the scatter shows at most SCATTER_MAX pairs, an even sample.
matplotlib is an optional extra (`mergemix-pipeline[plot]`); its object API is used, not
pyplot, so nothing global (backends, open figures) is touched.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from schemas.layout import SHARDS_DIR
from stages.errors import UserError
from stages.readers.output_state import committed_units
from stages.readers.shards import output_store, read_parquet
from schemas.shard import error_reason

COLUMNS = ["status", "error", "lam", "lam_hat", "margin", "method", "kept_patches", "grid", "saliency"]
SCATTER_MAX = 20_000
BINS = 20


class RunData:
    """What the panels need, summed over the units."""

    def __init__(self):
        self.inputs = 0
        self.values = {"lam": [], "lam_hat": [], "margin": []}
        self.kept = []  # (lam, kept area) of the pairs that select patches
        self.not_ok = Counter()  # (status, reason) -> inputs
        self.methods = Counter()
        self.grid = None
        self.saliency_sum, self.saliency_n = None, 0

    def add(self, table: pa.Table) -> None:
        self.inputs += len(table)
        bad = table.filter(pc.not_equal(table["status"], "ok"))
        self.not_ok.update(zip(bad["status"].to_pylist(), map(error_reason, bad["error"].to_pylist())))
        ok = table.filter(pc.equal(table["status"], "ok"))
        if not len(ok):
            return
        self.methods.update(ok["method"].to_pylist())
        for name in self.values:
            self.values[name].append(ok[name].to_numpy(zero_copy_only=False).astype(float))
        grids = ok["grid"].to_pylist()
        self.grid = self.grid or grids[0]
        patches = np.array([g[0] * g[1] for g in grids], float)
        kept = ok["kept_patches"].to_numpy(zero_copy_only=False).astype(float)  # null (mixup) -> nan
        lam = ok["lam"].to_numpy(zero_copy_only=False).astype(float)
        selected = ~np.isnan(kept)
        self.kept.append(np.stack([lam[selected], kept[selected] / patches[selected]], 1))
        self._add_saliency(ok)

    def _add_saliency(self, ok: pa.Table) -> None:
        size = self.grid[0] * self.grid[1]
        rows = ok.filter(pc.and_(pc.is_valid(ok["saliency"]), pc.equal(pc.list_value_length(ok["saliency"]), size)))
        if not len(rows):
            return
        maps = pc.list_flatten(rows["saliency"]).to_numpy().astype(np.float64).reshape(-1, size)
        total = maps.sum(1, keepdims=True)
        maps = np.divide(maps * size, total, out=np.ones_like(maps), where=total > 0)  # 1 = uniform attention
        summed = maps.sum(0)
        self.saliency_sum = summed if self.saliency_sum is None else self.saliency_sum + summed
        self.saliency_n += len(maps)

    def array(self, name: str) -> np.ndarray:
        parts = self.values[name]
        values = np.concatenate(parts) if parts else np.zeros(0)
        return values[~np.isnan(values)]


def collect(store) -> RunData:
    data = RunData()
    for stats in committed_units(store).values():
        data.add(read_parquet(store, f"{SHARDS_DIR}/{stats['parquet']['file']}", columns=COLUMNS))
    return data


def _histogram(ax, values: np.ndarray, name: str, colour: str) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.hist(values, bins=BINS, range=(0.0, 1.0), color=colour, edgecolor="white")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts of pairs
    ax.set_xlim(0, 1)
    ax.set_xlabel(name)
    ax.set_ylabel("pairs")
    if len(values):
        mean = float(values.mean())
        ax.axvline(mean, color="black", linestyle="--", linewidth=1)
        ax.set_title(f"{name}: mean {mean:.3f}, std {values.std():.3f}")
    else:
        ax.set_title(f"{name}: no values")


def _failures(ax, data: RunData) -> None:
    from matplotlib.ticker import MaxNLocator

    if not data.not_ok:
        ax.text(0.5, 0.5, "every input is ok", ha="center", va="center", fontsize=13, transform=ax.transAxes)
        ax.set_axis_off()
        ax.set_title(f"not ok: 0 of {data.inputs} inputs")
        return
    items = data.not_ok.most_common(12)[::-1]  # the biggest reason on top
    labels = [f"{status}: {reason}" for (status, reason), _ in items]
    counts = [n for _, n in items]
    colours = ["#d62728" if status == "failed" else "#7f7f7f" for (status, _), _ in items]
    bars = ax.barh(range(len(items)), counts, color=colours, height=0.6)
    ax.bar_label(bars, padding=3)
    ax.set_yticks(range(len(items)), labels)
    ax.set_xlabel("inputs")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(0, max(counts) * 1.15)
    shown = "" if len(data.not_ok) <= 12 else f", top 12 of {len(data.not_ok)} reasons"
    ax.set_title(f"not ok: {sum(data.not_ok.values())} of {data.inputs} inputs{shown}")


def _kept(ax, data: RunData) -> None:
    points = np.concatenate(data.kept) if data.kept else np.zeros((0, 2))
    if not len(points):
        ax.text(0.5, 0.5, "no pair selects patches\n(blends and image-side negatives\nhave pixel masks, not patches)", ha="center", va="center",
                fontsize=12, transform=ax.transAxes)
        ax.set_title("kept area against lam")
        return
    step = max(1, len(points) // SCATTER_MAX)
    shown = points[::step]
    ax.plot([0, 1], [0, 1], color="black", linewidth=1, linestyle="--", label="kept area = lam")
    ax.scatter(shown[:, 0], shown[:, 1], s=8, alpha=0.5, color="#1f77b4", label="pairs")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("lam (sampled)")
    ax.set_ylabel("kept area (patches from the winner)")
    ax.legend(loc="upper left", fontsize=9)
    gap = np.abs(points[:, 1] - points[:, 0]).mean()
    sample = f", {len(shown)} shown" if step > 1 else ""
    ax.set_title(f"kept area against lam: mean |gap| {gap:.3f}{sample}")


def _saliency(ax, fig, data: RunData) -> None:
    if data.saliency_sum is None:
        ax.text(0.5, 0.5, "no saliency stored", ha="center", va="center", fontsize=13, transform=ax.transAxes)
        ax.set_axis_off()
        ax.set_title("mean saliency")
        return
    gh, gw = data.grid
    image = ax.imshow((data.saliency_sum / data.saliency_n).reshape(gh, gw), cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="x uniform attention")
    ax.set_title(f"mean saliency over {data.saliency_n} pairs ({gh}x{gw} patches)")
    ax.set_xticks([])
    ax.set_yticks([])


def plot_output(out_dir, path, storage_options: dict | None = None) -> Path:
    """Draw the panels of an output (a folder or an object-store prefix) into the PNG `path`."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError("inspect --plot needs matplotlib: pip install 'mergemix-pipeline[plot]'") from None
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise UserError(f"--plot {path}: give a .png file name")
    if not path.parent.is_dir():
        raise UserError(f"folder {path.parent} does not exist: create it or choose another --plot path")
    store = output_store(out_dir, storage_options)
    data = collect(store)
    if not data.inputs:
        raise UserError(f"{out_dir} has no committed units to plot: run or resume `mergemix-pipeline generate`")
    figure(data, str(out_dir)).savefig(path, format="png")
    return path


def figure(data: RunData, name: str):
    """The six panels as a matplotlib Figure (row 1: histograms; row 2: not ok, kept area, saliency)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(16, 9.5), dpi=100, layout="constrained")
    axes = fig.subplots(2, 3)
    for ax, (column, colour) in zip(axes[0], (("lam", "#1f77b4"), ("lam_hat", "#2ca02c"), ("margin", "#ff7f0e"))):
        _histogram(ax, data.array(column), column, colour)
    _failures(axes[1, 0], data)
    _kept(axes[1, 1], data)
    _saliency(axes[1, 2], fig, data)
    pairs = len(data.array("lam"))
    methods = ", ".join(f"{m} {n}" for m, n in data.methods.most_common()) or "-"
    fig.suptitle(f"{name}: {pairs} pairs of {data.inputs} inputs (methods: {methods})", fontsize=14)
    return fig
