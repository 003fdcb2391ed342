"""The encoder actor of `generate`: one model load per actor; turns prepared units into the
unit's decisions (saliency, lam, partner, mask; stages.pairs.PairMaker).

torch and the encoder are imported inside the actor only, so the driver that defines and
schedules it stays light.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import ray


@ray.remote
class UnitWorker:
    def __init__(self, cfg: dict, device: str, threads: int):
        import torch

        from pipeline.config import GenerateConfig
        from stages.encoder import load_encoder
        from stages.pairs import PairMaker

        torch.set_num_threads(threads)
        c = GenerateConfig(**cfg)
        # Each actor resolves the weights itself: a tag downloads into its own node's cache.
        encoder = load_encoder(c.model, c.pretrained, merge=c.effective_merge, attn_layer=c.attn_layer,
                               prop_attn=c.prop_attn, schedule=c.merge_schedule, device=device, precision=c.precision)
        describe = {"model": c.model, "pretrained": None if c.pretrained in ("", "none") else c.pretrained, "seed": c.seed,
                    "method": c.method, "lam_mode": c.lam_mode, **encoder.describe()}
        describe.pop("patch_size")
        self.maker = PairMaker(encoder, method=c.method, lam=c.lam, lam_mode=c.lam_mode, seed=c.seed,
                               batch_size=c.batch_size, describe=describe)

    def make(self, unit):
        injected_fault(unit.unit_id)
        return self.maker.make(unit)


# TEST-ONLY fault injection for tests/test_faults.py; inert unless the variable is set.
# MERGEMIX_TEST_FAULTS names a directory; for unit N a file there named "raise-N" makes every
# attempt raise, "kill-N" makes the actor SIGKILL itself once (the file is claimed by rename),
# "hold-N" parks every attempt while the file exists (at most 120 s), "stall-N" parks the
# first attempt for 300 s (claimed by rename, so the retry goes through). Each attempt
# appends "N pid" to attempts.log.
FAULTS_ENV = "MERGEMIX_TEST_FAULTS"


def injected_fault(unit_id: int) -> None:
    faults = os.environ.get(FAULTS_ENV)
    if not faults:
        return
    import signal

    folder = Path(faults)
    with open(folder / "attempts.log", "a") as log:
        log.write(f"{unit_id} {os.getpid()}\n")
    deadline = time.monotonic() + 120
    while (folder / f"hold-{unit_id}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    if _claim(folder, "stall", unit_id):
        time.sleep(300)
    if (folder / f"raise-{unit_id}").exists():
        raise RuntimeError(f"injected fault in unit {unit_id}")
    if _claim(folder, "kill", unit_id):
        os.kill(os.getpid(), signal.SIGKILL)


def _claim(folder: Path, what: str, unit_id: int) -> bool:
    try:
        os.rename(folder / f"{what}-{unit_id}", folder / f"{what}ed-{unit_id}")
        return True
    except FileNotFoundError:
        return False
