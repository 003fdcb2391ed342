"""The llava-hf adapter on a tiny random LLaVA built here: tiny CLIP vision + tiny Llama text,
a word-level tokenizer made with `tokenizers`, a CLIP image processor. Nothing is downloaded
(HF_HUB_OFFLINE=1). Skipped when transformers (extra `llava`) is not installed."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

transformers = pytest.importorskip("transformers")
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402  (ships with transformers)

from stages.losses import IGNORE_INDEX, sequence_logps, sft_loss  # noqa: E402
from stages.train import CHECKPOINT, LOG, TrainConfig, train  # noqa: E402
from stages.vlm import LlavaHF  # noqa: E402
from tests.test_train import colour_shards  # noqa: E402

WORDS = ["<unk>", "<pad>", "<s>", "</s>", "<image>", "USER", "ASSISTANT", ":", "?", "!", "What", "colour", "is", "the",
         "picture", "red", "green", "blue", "yellow", "white", "black", "Describe", "it", "a", "plain", "image"]
IMAGE_TOKENS = 16  # 32 px, patch 8 -> 4 x 4 patch features (CLS dropped: strategy "default")


def tiny_llava():
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast)

    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                       image_size=32, patch_size=8),
        text_config=LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                num_key_value_heads=2, vocab_size=len(WORDS), max_position_embeddings=128,
                                pad_token_id=1, bos_token_id=2, eos_token_id=3),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
    )
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(config).eval(), processor


@pytest.fixture(scope="module")
def adapter():
    model, processor = tiny_llava()
    return LlavaHF(model, processor)  # no chat template: the LLaVA-1.5 format is used


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llava")
    LlavaHF(*tiny_llava()).save_pretrained(path)
    return path


def test_labels_are_the_answer_on_the_expanded_sequence(adapter):
    images = torch.rand(2, 3, 32, 32)
    batch = adapter.encode(images, ["What colour is the picture?", "Describe it!"], ["red", "a plain white image!"])
    tok = adapter.processor.tokenizer
    image_id = tok.convert_tokens_to_ids("<image>")
    for row, labels, answer in zip(batch["input_ids"], batch["labels"], ["red", "a plain white image!"]):
        assert (row == image_id).sum().item() == IMAGE_TOKENS  # the processor's expansion
        expected = tok(f" {answer}</s>", add_special_tokens=False)["input_ids"]
        assert labels[labels != IGNORE_INDEX].tolist() == expected
        answer_at = (labels != IGNORE_INDEX).nonzero()[0].item()
        assert row[answer_at - 2 : answer_at].tolist() == tok.convert_tokens_to_ids(["ASSISTANT", ":"])
        assert row[answer_at : answer_at + len(expected)].tolist() == expected  # labels unshifted, on input ids
    assert batch["attention_mask"][0].sum() < batch["attention_mask"][1].sum()  # right padding on the short row
    logits, labels = adapter(images, ["What colour is the picture?", "Describe it!"], ["red", "a plain white image"])
    assert logits.shape[:2] == labels.shape


def test_sft_loss_equals_the_models_own_loss(adapter):
    """The model's own causal-LM loss with our labels: same shift, same tokens."""
    images = torch.rand(3, 3, 32, 32)
    prompts, answers = ["What colour is the picture?"] * 3, ["red", "blue", "a plain black image"]
    batch = adapter.encode(images, prompts, answers)
    with torch.no_grad():
        out = adapter.model(**batch)
        logits, labels = adapter(images, prompts, answers)
    assert sft_loss(logits, labels).item() == pytest.approx(out.loss.item(), abs=1e-5)


def test_answer_logps_do_not_depend_on_batch_padding(adapter):
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        alone = sequence_logps(*adapter(images[:1], ["What colour is the picture?"], ["red"]))
        batched = sequence_logps(*adapter(images, ["What colour is the picture?", "Describe it!"], ["red", "a plain white image"]))
    assert batched.tokens[0].item() == alone.tokens[0].item() == 2  # "red" and "</s>"
    assert batched.mean[0].item() == pytest.approx(alone.mean[0].item(), abs=1e-5)


def test_llava_hf_trains_on_shards_with_frozen_vision(model_dir, tmp_path):
    from transformers import LlavaForConditionalGeneration

    shards = colour_shards(tmp_path / "shards", units=2, per_unit=8)
    run = tmp_path / "run"
    result = train(TrainConfig(shards=str(shards), output=str(run), model="llava-hf", model_path=str(model_dir),
                               steps=12, batch_size=8, lr=3e-3, warmup=2, log_every=4), echo=lambda line: None)
    assert result["step"] == 12 and (run / LOG).exists()
    assert result["last"]["sft"] < result["first"]["sft"]
    saved = torch.load(run / CHECKPOINT, weights_only=False)["model"]
    assert saved and not any("vision_tower" in name for name in saved)  # frozen, as LLaVA-1.5 stage 2
    before = LlavaForConditionalGeneration.from_pretrained(model_dir).state_dict()
    after = LlavaForConditionalGeneration.from_pretrained(run / "model").state_dict()
    vision = [n for n in before if "vision_tower" in n]
    assert vision and all(torch.equal(before[n], after[n]) for n in vision)
    assert any(not torch.equal(before[n], after[n]) for n in before if "language_model" in n)


def test_missing_model_path_is_a_user_error(tmp_path):
    from stages.errors import UserError
    from stages.vlm import build_adapter

    with pytest.raises(UserError, match="--model-path"):
        build_adapter("llava-hf")
    with pytest.raises(UserError, match="could not load"):
        build_adapter("llava-hf", str(tmp_path / "nowhere"))
