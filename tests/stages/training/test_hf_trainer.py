"""The transformers Trainer (stages.training.hf_trainer) on the tiny offline LLaVA, CPU: its loss is
`mergemix_loss` on the same batch, it trains a few steps from our shards and from the `hf`
export, logs the preference metrics and saves a checkpoint the model's library loads."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from stages.export.exporter import export  # noqa: E402
from stages.training.hf_trainer import MergeMixTrainer, MergeMixTrainingArguments, PairCollator, main  # noqa: E402
from stages.training.loader import ShardDataset  # noqa: E402
from stages.training.losses import mergemix_loss  # noqa: E402
from stages.training.vlm import LlavaHF  # noqa: E402
from tests.stages.training.test_train import colour_shards  # noqa: E402
from tests.tiny_llava import LLAVA_HF_CHAT_TEMPLATE, llama_tokenizer, tiny_llava  # noqa: E402


def tiny(tmp_path):
    """The tiny LLaVA with a SentencePiece Llama tokenizer and llava-hf's chat template."""
    return tiny_llava(llama_tokenizer(tmp_path / "tokenizer", legacy=False), LLAVA_HF_CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return colour_shards(tmp_path_factory.mktemp("colours") / "out", units=2, per_unit=6)


@pytest.fixture(scope="module")
def hf_export(shards, tmp_path_factory):
    dest = tmp_path_factory.mktemp("export") / "hf"
    export(shards, dest, "hf", progress=False)
    return dest


def arguments(tmp_path, **kw) -> MergeMixTrainingArguments:
    base = dict(output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, learning_rate=3e-3, logging_steps=1,
                save_strategy="no", report_to="none", use_cpu=True, dataloader_num_workers=0, seed=0)
    return MergeMixTrainingArguments(**(base | kw))


def test_compute_loss_is_mergemix_loss_on_the_same_batch(shards, tmp_path):
    model, processor = tiny(tmp_path)
    settings = dict(beta=2.0, sft_weight=0.3, pref_weight=0.7, margin_from="lam")
    trainer = MergeMixTrainer(model=model, args=arguments(tmp_path, max_steps=1, **settings), processor=processor)
    batch = PairCollator()(list(ShardDataset(shards))[:4])
    model.eval()
    with torch.no_grad():
        got = trainer.compute_loss(model, batch)
        adapter = LlavaHF(model, processor)
        winner = adapter(batch["winner"], batch["turns"], batch["has_image"])
        loser = adapter(batch["loser"], batch["turns"], batch["has_image"])
        want = mergemix_loss(*winner, *loser, 1.0 - batch["lam"], has_image=batch["has_image"],
                             beta=2.0, sft_weight=0.3, pref_weight=0.7)
    assert got.item() == pytest.approx(want.loss.item(), rel=1e-6)
    assert trainer._pair_metrics["eval"]["simpo"] == [pytest.approx(want.metrics["simpo"], rel=1e-6)]


def test_the_collator_reads_our_loader_and_the_hf_export_alike(shards, hf_export):
    from_loader = PairCollator()(list(ShardDataset(shards))[:5])
    from_export = PairCollator()([datasets.load_from_disk(str(hf_export))[i] for i in range(5)])
    for name in ("winner", "loser", "margin", "lam"):
        assert torch.equal(from_loader[name], from_export[name]), name
    assert from_loader["turns"] == from_export["turns"]
    assert [turns[0][0] for turns in from_loader["turns"]] == ["What colour is the picture?"] * 5


def test_trains_a_few_steps_on_shards_logs_and_saves(shards, tmp_path):
    from transformers import LlavaForConditionalGeneration

    model, processor = tiny(tmp_path)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = arguments(tmp_path, max_steps=3, save_strategy="steps", save_steps=3)
    trainer = MergeMixTrainer(model=model, args=args, processor=processor, train_dataset=ShardDataset(shards, shuffle_shards=True))
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "sft" in entry]
    assert len(logs) == 3 and {"loss", "simpo", "rewards/chosen", "rewards/rejected", "rewards/accuracies"} <= set(logs[0])
    saved = LlavaForConditionalGeneration.from_pretrained(tmp_path / "run" / "checkpoint-3")
    state = saved.state_dict()
    vision = [n for n in before if "vision_tower" in n]
    assert vision and all(torch.equal(before[n], state[n]) for n in vision)  # frozen, as LLaVA-1.5 stage 2
    assert any(not torch.equal(before[n], state[n]) for n in before if "language_model" in n)
    assert (tmp_path / "run" / "checkpoint-3" / "processor_config.json").exists() or \
        (tmp_path / "run" / "checkpoint-3" / "preprocessor_config.json").exists()


def test_the_script_trains_on_the_hf_export(hf_export, tmp_path):
    """`python -m stages.training.hf_trainer` (what accelerate launch / torchrun run), in-process."""
    model_dir = tmp_path / "tiny-llava"
    LlavaHF(*tiny(tmp_path)).save_pretrained(model_dir)
    trainer = main(["--model_path", str(model_dir), "--data", str(hf_export), "--output_dir", str(tmp_path / "run"),
                    "--max_steps", "2", "--per_device_train_batch_size", "4", "--learning_rate", "3e-3",
                    "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none", "--use_cpu", "true",
                    "--beta", "1.5"])
    assert trainer.state.global_step == 2 and trainer.loss_args["beta"] == 1.5
    assert isinstance(trainer.train_dataset, datasets.Dataset) and len(trainer.train_dataset) == 12
    assert (tmp_path / "run" / "model.safetensors").exists()


@pytest.mark.timeout(300)
def test_two_processes_under_torchrun(shards, tmp_path):
    """The documented multi-GPU launch, on two CPU processes (gloo): each rank reads its own shards."""
    import subprocess
    import sys
    from pathlib import Path

    model_dir = tmp_path / "tiny-llava"
    LlavaHF(*tiny(tmp_path)).save_pretrained(model_dir)
    torchrun = Path(sys.executable).with_name("torchrun")
    run = subprocess.run(
        [str(torchrun), "--nproc_per_node", "2", "-m", "stages.training.hf_trainer", "--model_path", str(model_dir), "--data", str(shards),
         "--output_dir", str(tmp_path / "run"), "--max_steps", "2", "--per_device_train_batch_size", "3",
         "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none", "--use_cpu", "true", "--ddp_backend", "gloo"],
        capture_output=True, text=True, timeout=240, cwd=Path(__file__).resolve().parents[3])
    assert run.returncode == 0, run.stderr[-3000:]
    assert "rewards/accuracies" in run.stdout + run.stderr and (tmp_path / "run" / "model.safetensors").exists()


def test_text_only_rows_train_sft_only_through_the_trainer(tmp_path):
    """ShardDataset(text_only=True) through PairCollator: text-only rows carry every turn, no image,
    and a batch of them alone scores SFT only (no SimPO pair), as `train --text-only-rows` does."""
    from tests.stages.training.test_loader import text_only_output

    samples = list(ShardDataset(text_only_output(tmp_path / "out"), text_only=True))
    batch = PairCollator()(samples[:3])
    assert batch["has_image"].tolist() == [False, True, True]
    assert batch["turns"][0] == [("Tell me 0.", "First."), ("And then?", "Second.")]
    assert batch["winner"][0].abs().sum() == 0
    model, processor = tiny(tmp_path)
    trainer = MergeMixTrainer(model=model, args=arguments(tmp_path, max_steps=1), processor=processor)
    model.eval()
    with torch.no_grad():
        mixed = trainer.compute_loss(model, batch)
        text_only = trainer.compute_loss(model, PairCollator()(samples[:1]))
    assert torch.isfinite(mixed) and torch.isfinite(text_only)
    assert trainer._pair_metrics["eval"]["counts/pairs"] == [2, 0]
    assert trainer._pair_metrics["eval"]["counts/sft_only"] == [1, 1]
