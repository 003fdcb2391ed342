"""Per-sample draws and ratios, in numpy: the lam distribution, generators seeded per sample,
the partner derangement inside a group, and lam_hat. Torch-free (the driver validates --lam
with it; stages.mixing.masks does the tensor work).

Determinism. Every per-sample random draw (lam, random masks, mergemix-r token scores,
cutmix/resizemix boxes, paper-mode z) comes from `sample_rng(seed, key, purpose)`, a
generator seeded by a SHA-256 of (seed, sample key, purpose). Results therefore do not
depend on batch composition, batch order or the number of workers. Only the partner
derangement and paper-mode normalisation depend on the group, by definition.
"""
from __future__ import annotations

import hashlib
import json
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from stages.errors import UserError
from stages.mixing.methods import LAM_MODES

PAPER_TAU = 1e-5  # min-max normalisation guard for lam_hat mode "paper"


class MixArgumentError(UserError, ValueError):
    """A bad mixing argument. A ValueError for library users, a one-line UserError for the CLI."""


@dataclass(frozen=True)
class LamSpec:
    """Distribution of lam: beta(a) = Beta(a, a), uniform(a, b), or fixed(a)."""

    kind: str
    a: float
    b: float = 0.0

    def __post_init__(self):
        if self.kind not in ("beta", "uniform", "fixed"):
            raise MixArgumentError(f"unknown lam distribution {self.kind!r}: use beta, uniform or fixed")
        if not (math.isfinite(self.a) and math.isfinite(self.b)):
            raise MixArgumentError("lam distribution parameters must be finite numbers")
        if self.kind == "beta" and self.a <= 0:
            raise MixArgumentError(f"beta alpha must be > 0, got {self.a}")
        if self.kind == "uniform" and not (0.0 <= self.a <= self.b <= 1.0):
            raise MixArgumentError(f"uniform bounds must satisfy 0 <= a <= b <= 1, got {self.a},{self.b}")
        if self.kind == "fixed" and not (0.0 <= self.a <= 1.0):
            raise MixArgumentError(f"fixed lam must be in [0, 1], got {self.a}")

    def __str__(self) -> str:
        return f"uniform:{self.a:g},{self.b:g}" if self.kind == "uniform" else f"{self.kind}:{self.a:g}"


_LAM_HELP = "use beta:ALPHA, uniform:A,B or fixed:V (e.g. beta:1.0, uniform:0.2,0.8, fixed:0.5)"


def parse_lam_spec(text: str) -> LamSpec:
    """Parse "beta:1.0", "uniform:0.2,0.8" or "fixed:0.5"."""
    if not isinstance(text, str) or ":" not in text:
        raise MixArgumentError(f"bad lam distribution {text!r}: {_LAM_HELP}")
    kind, _, args = text.strip().partition(":")
    kind = kind.strip().lower()
    try:
        values = [float(v) for v in args.split(",")]
    except ValueError:
        raise MixArgumentError(f"bad lam distribution {text!r}: {_LAM_HELP}") from None
    expected = {"beta": 1, "uniform": 2, "fixed": 1}.get(kind)
    if expected is None or len(values) != expected:
        raise MixArgumentError(f"bad lam distribution {text!r}: {_LAM_HELP}")
    return LamSpec(kind, values[0], values[1] if expected == 2 else 0.0)


def sample_rng(seed: int, key: str, purpose: str = "lam") -> np.random.Generator:
    """A generator private to one sample and one purpose.

    Seeded from SHA-256 of (seed, key, purpose), so it is the same in every process and on
    every platform (PCG64 + SeedSequence are stable bit streams for `random`/`integers`).
    """
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
        raise MixArgumentError(f"seed must be an integer, got {seed!r}")
    msg = json.dumps([int(seed), str(key), str(purpose)], separators=(",", ":")).encode()
    entropy = int.from_bytes(hashlib.sha256(msg).digest(), "little")
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy)))


def check_keys(keys: Sequence[str], n: int | None = None) -> list[str]:
    keys = [str(k) for k in keys]
    if not keys:
        raise ValueError("empty batch: at least one sample key is needed")
    if n is not None and len(keys) != n:
        raise ValueError(f"got {len(keys)} keys for a batch of {n}")
    if len(set(keys)) != len(keys):
        raise ValueError("sample keys must be unique within a batch")
    return keys


def sample_lams(spec: LamSpec, seed: int, keys: Sequence[str]) -> np.ndarray:
    """One lam per key (float64), each from its own generator: independent of order and batching."""
    keys = check_keys(keys)
    if spec.kind == "fixed":
        return np.full(len(keys), float(spec.a))
    out = np.empty(len(keys))
    for i, key in enumerate(keys):
        rng = sample_rng(seed, key, "lam")
        out[i] = rng.beta(spec.a, spec.a) if spec.kind == "beta" else rng.uniform(spec.a, spec.b)
    return np.clip(out, 0.0, 1.0)


def derangement(keys: Sequence[str], seed: int) -> np.ndarray:
    """Partner index for every position: a seeded permutation without fixed points (n >= 2).

    The keys are put in a pseudo-random cyclic order (by hash of seed and key) and each
    sample takes the next one as partner. A single n-cycle has no fixed points, the result
    depends only on the set of keys (not their order), and adding or removing one key
    changes only its neighbours' partners. For n == 1 it returns [0]: the caller decides
    what a lone sample does.
    """
    keys = check_keys(keys)
    n = len(keys)
    if n == 1:
        return np.zeros(1, dtype=np.int64)

    def rank(i: int):
        msg = json.dumps([int(seed), keys[i], "partner"], separators=(",", ":")).encode()
        return hashlib.sha256(msg).digest(), keys[i]

    order = sorted(range(n), key=rank)
    partner = np.empty(n, dtype=np.int64)
    for t, i in enumerate(order):
        partner[i] = order[(t + 1) % n]
    return partner


def lam_hats(mode: str, lam: np.ndarray, kept: np.ndarray, *, tokens_kept: int, num_patches: int,
             seed: int, keys: Sequence[str]) -> np.ndarray:
    """The recorded ratio lam_hat per sample (the caller's margin is 1 - lam_hat).

    area: kept (fraction of the image from x_i); fixed: lam; paper (docs/METHOD.md section 3):
    z ~ Normal(mean K/L, std p/sum(M)) per sample, with p = floor(lam*L) and sum(M) the kept
    patch count (std 1 when sum(M) == 0), then min-max normalised over the group with
    tau = 1e-5 and clipped to [0, 1]. Paper mode therefore depends on the group.
    """
    if mode not in LAM_MODES:
        raise MixArgumentError(f"unknown lam_hat mode {mode!r}: use one of {', '.join(LAM_MODES)}")
    lam = np.asarray(lam, dtype=np.float64).reshape(-1)
    kept = np.asarray(kept, dtype=np.float64).reshape(-1)
    keys = check_keys(keys, len(lam))
    if kept.shape != lam.shape:
        raise ValueError(f"lam has {lam.size} values but kept has {kept.size}")
    _check_unit_interval(lam, "lam")
    _check_unit_interval(kept, "kept")
    if mode == "area":
        return kept.copy()
    if mode == "fixed":
        return lam.copy()
    if not (0 < num_patches and 0 <= tokens_kept <= num_patches):
        raise ValueError(f"need 0 <= tokens_kept <= num_patches and num_patches > 0, got {tokens_kept}, {num_patches}")
    p = np.floor(lam * num_patches)
    sum_m = np.rint(kept * num_patches)
    std = np.where(sum_m > 0, p / np.maximum(sum_m, 1), 1.0)
    z = np.array([sample_rng(seed, k, "paper").normal(tokens_kept / num_patches, s) for k, s in zip(keys, std)])
    z = (z - z.min()) / (z.max() - z.min() + PAPER_TAU)
    return np.clip(z, 0.0, 1.0)


def _check_unit_interval(values: np.ndarray, name: str) -> None:
    if not np.all(np.isfinite(values)) or np.any(values < 0) or np.any(values > 1):
        raise ValueError(f"{name} must be finite and in [0, 1]")
