"""The training stage on generated shards: the toy model learns, resume is exact, the CLI works.

The shards are written by the project's writer and read by its loader. Winner: a flat colour
with noise; loser: its left half replaced by a partner of another colour; answer: the colour
name. The answer depends on the clean image, so a model can learn to prefer winners.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from schemas.shard import empty_row, sample_key
from stages.errors import UserError
from stages.training.train import CHECKPOINT, LOG, TrainConfig, cosine_with_warmup, evaluate, load_trained, train
from stages.training.vlm import ToyVLM, build_adapter
from stages.imaging.compose import PairImages
from stages.output.runfiles import write_run_files
from stages.output.writer import write_unit

ROOT = Path(__file__).resolve().parents[3]
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 50, 220), "yellow": (230, 220, 40), "white": (240, 240, 240), "black": (15, 15, 15)}
PROMPT = "What colour is the picture?"


def colour_shards(out: Path, units: int = 4, per_unit: int = 16, size: int = 32, patch: int = 8, seed: int = 0) -> Path:
    """Shards of colour pairs; loser = winner with its left half from a partner of another colour."""
    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    grid = size // patch
    mask = np.full((grid, grid), 255, np.uint8)
    mask[:, : grid // 2] = 0
    keep = np.kron(mask // 255, np.ones((patch, patch), np.uint8))[..., None]
    for unit in range(units):
        picks = rng.integers(0, len(names), per_unit)
        imgs = [np.clip(np.array(COLOURS[names[c]]) + rng.integers(-25, 26, (size, size, 3)), 0, 255).astype(np.uint8) for c in picks]
        rows, images = [], {}
        for i in range(per_unit):
            j = (i + 1) % per_unit
            while picks[j] == picks[i]:
                j = (j + 1) % per_unit
            key = sample_key(unit, i)
            rows.append(empty_row(
                key=key, source_id=f"colours/{unit}/{i}", status="ok", unit=unit, index=i, partner_key=sample_key(unit, j),
                lam=0.5, lam_hat=0.5, margin=0.5, method="half", prompt=PROMPT, answer=names[picks[i]],
            ))
            images[key] = PairImages(imgs[i], (imgs[i] * keep + imgs[j] * (1 - keep)).astype(np.uint8), mask)
        write_unit(out, unit, rows, images, image_format="png", fingerprint="colours")
    write_run_files(out, {"fingerprint": "colours", "units_planned": units})  # a finished output
    return out


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return colour_shards(tmp_path_factory.mktemp("colours"))


@pytest.fixture(scope="module")
def heldout(tmp_path_factory) -> Path:
    return colour_shards(tmp_path_factory.mktemp("heldout"), units=2, seed=1)


def read_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / LOG).read_text().splitlines()]


def test_toy_labels_cover_answer_bytes_only():
    model = ToyVLM()
    logits, labels = model(torch.rand(2, 3, 40, 40), [[("Q?", "red")], [("Which?", "blue!")]])
    assert logits.shape[:2] == labels.shape and logits.shape[-1] == 259
    n_image = 16  # 32 px / patch 8 -> 4 x 4 tokens, images resized to the tower's size
    for row, answer in zip(labels, ["red", "blue!"]):
        picked = row[row != -100].tolist()
        assert picked == list(answer.encode()) + [model.tokenizer.EOS]
        assert (row[:n_image] == -100).all()


def test_toy_labels_every_turn_on_one_sequence_and_text_only_rows_have_no_image():
    """The toy follows the llava-hf rule: one sequence per conversation, every answer and its
    EOS labelled; a text-only row has no image tokens; max_length cuts winner and loser alike."""
    model = ToyVLM()
    tok = model.tokenizer
    turns = [("What colour?", "red"), ("Sure?", "yes, red")]
    images = torch.rand(2, 3, 32, 32)
    _, labels = model(images, [turns, turns], torch.tensor([True, False]))
    first, second = b"USER: What colour? ASSISTANT: ", b"USER: Sure? ASSISTANT: "
    expected = [-100] * (1 + len(first)) + [*b"red", tok.EOS] + [-100] * len(second) + [*b"yes, red", tok.EOS]
    assert labels[0].tolist() == [-100] * 16 + expected  # 16 image tokens first
    assert labels[1].tolist() == expected + [-100] * 16  # no image tokens; right padding
    short = ToyVLM(max_length=16 + 40)
    _, w = short(images[:1], [turns])
    _, l = short(torch.rand(1, 3, 32, 32), [turns])
    assert w.shape[1] == 56 and torch.equal(w, l) and [i for i in w[0].tolist() if i != -100] == [*b"red", tok.EOS]


def test_cosine_schedule_warms_up_then_decays_to_zero():
    f = cosine_with_warmup(4, 20)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(12) == pytest.approx(0.5)
    assert f(20) == pytest.approx(0.0, abs=1e-12)
    assert all(f(s) >= f(s + 1) for s in range(4, 20))


def test_toy_learns_to_prefer_winners(shards, heldout, tmp_path):
    """A few hundred steps: held-out accuracy and loss move from chance to a clear preference."""
    torch.manual_seed(0)
    before = evaluate(build_adapter("toy"), heldout)  # same seed: the run's initial weights
    run = tmp_path / "run"
    result = train(TrainConfig(shards=str(shards), output=str(run), steps=150, batch_size=16, lr=1e-3, warmup=10, log_every=50))
    after = evaluate(load_trained(run), heldout)
    log = read_log(run)
    print("before", before, "\nafter", after, "\nfirst", log[0], "\nlast", log[-1])
    assert result["step"] == 150 and [r["step"] for r in log] == [1, 50, 100, 150]
    assert before["rewards/accuracies"] < 0.75
    assert after["rewards/accuracies"] > 0.9
    assert after["loss"] < 0.5 * before["loss"]
    assert after["rewards/margins"] > before["rewards/margins"] + 0.3
    # stop-gradient on the loser: the preference comes from the winner's likelihood rising
    assert after["rewards/chosen"] > before["rewards/chosen"] + 1.0
    assert log[-1]["loss"] < log[0]["loss"]
    for key in ("loss", "sft", "simpo", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "lr"):
        assert key in log[-1]


class Interrupted(Exception):
    pass


def stop_at(step: int):
    """An echo that kills the run when it logs `step`: like a job preempted mid-run."""

    def echo(line: str) -> None:
        if line.startswith(f"step={step} "):
            raise Interrupted

    return echo


def test_resume_continues_exactly(shards, tmp_path):
    """A run stopped after step 4 (last checkpoint: step 3) and resumed gives the same weights,
    data position and log as the same run done in one go."""
    common = dict(shards=str(shards), steps=6, batch_size=8, grad_accum=2, lr=1e-3, warmup=2, log_every=1, save_every=3)
    train(TrainConfig(output=str(tmp_path / "once"), **common))
    with pytest.raises(Interrupted):
        train(TrainConfig(output=str(tmp_path / "split"), **common), echo=stop_at(4))
    assert torch.load(tmp_path / "split" / CHECKPOINT, weights_only=False)["step"] == 3
    with pytest.raises(UserError, match="--resume"):
        train(TrainConfig(output=str(tmp_path / "split"), **common))
    with pytest.raises(UserError, match="batch_size"):
        train(TrainConfig(output=str(tmp_path / "split"), resume=True, **{**common, "batch_size": 4}))
    train(TrainConfig(output=str(tmp_path / "split"), resume=True, **common))
    once = torch.load(tmp_path / "once" / CHECKPOINT, weights_only=False)
    split = torch.load(tmp_path / "split" / CHECKPOINT, weights_only=False)
    assert split["step"] == once["step"] == 6
    assert (split["epoch"], split["offset"]) == (once["epoch"], once["offset"])
    for name, tensor in once["model"].items():
        torch.testing.assert_close(split["model"][name], tensor, rtol=0, atol=1e-6)
    log_once, log_split = read_log(tmp_path / "once"), read_log(tmp_path / "split")
    assert [r["step"] for r in log_split] == [1, 2, 3, 4, 5, 6]  # step 4 was logged, dropped, redone
    assert [r["loss"] for r in log_split] == pytest.approx([r["loss"] for r in log_once], abs=1e-5)


def test_resume_refuses_an_old_checkpoint_whose_batch_order_depended_on_workers(shards, tmp_path):
    common = dict(shards=str(shards), output=str(tmp_path / "run"), steps=2, batch_size=8, warmup=1, log_every=1)
    train(TrainConfig(**common), echo=lambda line: None)
    state = torch.load(tmp_path / "run" / CHECKPOINT, weights_only=True)
    del state["batch_order"]  # as an older version wrote it, with 2 loader workers
    state["config"]["num_workers"] = 2
    del state["config"]["text_only_rows"]  # a setting older runs did not have: its default
    torch.save(state, tmp_path / "run" / CHECKPOINT)
    with pytest.raises(UserError, match="older version with --num-workers 2"):
        train(TrainConfig(resume=True, **{**common, "steps": 3}), echo=lambda line: None)
    state["config"]["num_workers"] = 0  # with none, its batches were ShardBatches' batches
    torch.save(state, tmp_path / "run" / CHECKPOINT)
    assert train(TrainConfig(resume=True, **{**common, "steps": 3}), echo=lambda line: None)["step"] == 3


def test_two_sided_moves_the_loser_too(shards, tmp_path):
    """With gradients through the loser, the rejected reward falls faster than with stop-gradient."""
    common = dict(shards=str(shards), steps=20, batch_size=8, lr=1e-3, warmup=5, log_every=20, sft_weight=0.0, pref_weight=1.0)
    one = train(TrainConfig(output=str(tmp_path / "one"), **common))["last"]
    two = train(TrainConfig(output=str(tmp_path / "two"), two_sided=True, **common))["last"]
    assert two["rewards/rejected"] < one["rewards/rejected"] - 0.5


def test_bad_settings_are_user_errors(shards, tmp_path):
    with pytest.raises(UserError, match="--steps"):
        train(TrainConfig(shards=str(shards), output=str(tmp_path / "a"), steps=0))
    with pytest.raises(UserError, match="unknown model"):
        train(TrainConfig(shards=str(shards), output=str(tmp_path / "b"), model="gpt"))
    with pytest.raises(UserError):
        train(TrainConfig(shards=str(tmp_path / "missing"), output=str(tmp_path / "c"), steps=1))


def test_cli_train_and_resume(shards, tmp_path):
    run = tmp_path / "cli-run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "pipeline.cli", "train", str(shards), "--model", "toy", "--batch-size", "8", "--grad-accum", "2",
            "--lr", "1e-3", "--warmup", "2", "--log-every", "2", "--text-only-rows", "--max-length", "0", "--output", str(run)]
    first = subprocess.run(base + ["--steps", "4"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert first.returncode == 0, first.stderr
    assert "rewards/accuracies" in first.stdout
    assert [r["step"] for r in read_log(run)] == [1, 2, 4]
    again = subprocess.run(base + ["--steps", "4"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert again.returncode == 2 and again.stderr.startswith("error:") and "--resume" in again.stderr
    assert "Traceback" not in again.stderr
    resumed = subprocess.run(base + ["--steps", "6", "--resume"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed" in resumed.stdout
    assert [r["step"] for r in read_log(run)] == [1, 2, 4, 6]
    assert json.loads((run / "train_config.json").read_text())["steps"] == 6
