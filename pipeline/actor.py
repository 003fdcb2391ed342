"""The encoder actor of `generate`: one model load per actor; turns prepared units into the
unit's decisions (saliency, lam, partner, mask; stages.mixing.decide).

torch and the encoder are imported inside the actor only, so the driver that defines and
schedules it stays light.
"""
from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from pathlib import Path

import ray

from pipeline.faults import injected_fault
from schemas.shard import IMAGE_NEGATIVES


@ray.remote
class UnitWorker:
    def __init__(self, cfg: dict, device: str, threads: int, image_ops: str = "pil"):
        from pipeline.config import GenerateConfig

        c = GenerateConfig(**cfg)
        self.messages: list[str] = []
        if c.method in IMAGE_NEGATIVES:
            self.decider = _negative_decider(c)
            return
        import torch

        from stages.mixing.decide import UnitDecider
        from stages.model.factory import load_encoder

        torch.set_num_threads(threads)
        # Each actor resolves the weights itself: a tag downloads into its own node's cache.
        # Warnings of the load (random weights, open_clip's own) go to the driver (load_messages).
        with collect_messages(self.messages):
            encoder = load_encoder(c.model, c.pretrained, merge=c.effective_merge, attn_layer=c.attn_layer,
                                   prop_attn=c.prop_attn, schedule=c.merge_schedule, device=device,
                                   precision=c.precision, quick_gelu=c.quick_gelu, mean=c.mean, std=c.std,
                                   storage_options=c.storage_options)
        describe = {"model": c.model, "pretrained": None if c.pretrained in ("", "none") else c.pretrained, "seed": c.seed,
                    "method": c.method, "lam_mode": c.lam_mode, **encoder.describe()}
        describe.pop("patch_size")
        if c.compile:
            encoder.enable_compile()
        # The torch image path fits the JPEGs its units bring (and, with --device-encode, encodes pairs) here.
        self.decider = UnitDecider(encoder, method=c.method, lam=c.lam, lam_mode=c.lam_mode, seed=c.seed,
                                   batch_size=c.batch_size, describe=describe, resize=c.resize,
                                   encode_quality=c.jpeg_quality if c.device_encode and image_ops == "torch" else None)

    def make(self, unit):
        injected_fault(unit.unit_id)
        return self.decider.decide(unit)

    def load_messages(self) -> list[str]:
        return self.messages


def _negative_decider(c):
    """An image-side negative's decider: no tower is built, only its settings read (the image size,
    and the mean, std and pad colour that normalized noise, rotate and blank use)."""
    from stages.mixing.decide import NegativeDecider
    from stages.model.tower import resolve_tower

    tower = resolve_tower(c.model, c.pretrained, quick_gelu=c.quick_gelu, mean=c.mean, std=c.std)
    describe = {"model": c.model, "pretrained": None if c.pretrained in ("", "none") else c.pretrained, "seed": c.seed,
                "method": c.method, "lam_mode": c.lam_mode, "image_size": list(tower.image_size),
                "grid": list(tower.image_size), **tower.describe()}  # the mask's grid is the pixels
    settings = c.negative_settings(mean=tower.mean, std=tower.std, fill=tower.pad_rgb)
    return NegativeDecider(method=c.method, settings=settings, lam_mode=c.lam_mode, seed=c.seed, describe=describe)


@ray.remote(max_retries=1)
def check_blocks(cfg: dict, device: str, threads: int, n: int) -> dict:
    """`--attn-layer auto`: saliency-check's block scores (stages.model.saliency_check) on the first
    `n` images of the input, run where an encoder actor would run (its device and threads)."""
    import torch

    from pipeline.config import GenerateConfig
    from stages.model.saliency_check import run_check

    c = GenerateConfig(**cfg)
    torch.set_num_threads(threads)
    with collect_messages([]):  # the driver has printed the tower's line and warnings already
        result = run_check(c.model, c.pretrained, source=c.input, image_root=c.image_root,
                           folder_labels=c.folder_labels, resize=c.resize, storage_options=c.storage_options,
                           quick_gelu=c.quick_gelu, mean=c.mean, std=c.std, merge=c.effective_merge,
                           prop_attn=c.prop_attn, schedule=c.merge_schedule, n=n, seed=c.seed, device=device,
                           echo=lambda line: None)
    return result.to_json()


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


class ActorMessages:
    """Prints each actor's load messages on the driver's terminal (the only one the user sees),
    each distinct message once however many actors say it."""

    def __init__(self, refs: list):
        self.refs, self.seen = refs, set()

    def print_new(self, timeout: float = 0) -> None:
        if not self.refs:
            return
        ready, self.refs = ray.wait(self.refs, num_returns=len(self.refs), timeout=timeout)
        for ref in ready:
            try:
                messages = ray.get(ref)
            except Exception:  # the actor died loading: its units fail and say why
                continue
            for message in messages:
                if message not in self.seen:
                    self.seen.add(message)
                    print(f"worker: {message}", file=sys.stderr)
