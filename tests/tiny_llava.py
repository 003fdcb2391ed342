"""A tiny LLaVA-1.5 built offline, with a real Llama SentencePiece tokenizer.

`sentencepiece` trains a small BPE model with LLaMA's settings (byte fallback, split digits, a
dummy-prefix space, no normalisation; unk/bos/eos = 0/1/2) on a corpus written here. Transformers
builds its Llama tokenizer from that `tokenizer.model` the way it loads a hub folder; `<image>`
and `<pad>` are added as llava-hf's tokenizer adds them. The model is a tiny CLIP vision tower +
projector + Llama, random weights. Nothing is downloaded.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import torch

# The chat template llava-hf ships for LLaVA-1.5 (llava-hf/llava-1.5-7b-hf, chat_template.json;
# transformers' own LLaVA processor tests use the same string). It renders
# "USER: <image>\n{question} ASSISTANT: {answer} " per turn: no system prompt and no EOS.
LLAVA_HF_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

CORPUS = [
    "A chat between a curious human and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    "USER: What colour is the picture? ASSISTANT: The picture is red.",
    "USER: Is it bright or dark? ASSISTANT: It is bright, like a white wall.",
    "USER: How many objects are there? ASSISTANT: There are 12 objects, or 3 groups of 4.",
    "USER: Describe it in one word. ASSISTANT: Plain.",
    "red green blue yellow white black colour color picture image photo answer question",
    "Write a short poem about the sea. The sea is wide and blue; it sings to me and you.",
]
VOCAB_SIZE = 400  # 3 specials + 256 byte pieces + ~140 merges
IMAGE_TOKENS = 16  # 32 px, patch 8: 4 x 4 patch features (CLS dropped, strategy "default")


def sentencepiece_model() -> bytes:
    """A LLaMA-style SentencePiece BPE model trained on CORPUS (about 10 ms)."""
    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 8), model_writer=out, vocab_size=VOCAB_SIZE, model_type="bpe",
        byte_fallback=True, split_digits=True, add_dummy_prefix=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=1, minloglevel=2,
    )
    return out.getvalue()


def tokenizer_folder(path: Path, *, legacy: bool) -> Path:
    """A folder as a hub Llama tokenizer has it: tokenizer.model + tokenizer_config.json."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.model").write_bytes(sentencepiece_model())
    config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": legacy,
              "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def llama_tokenizer(path: Path, *, legacy: bool, cls=None):
    """The Llama tokenizer of `tokenizer_folder`, loaded by `cls` (default AutoTokenizer), with
    llava-hf's added tokens `<image>` and `<pad>`."""
    from transformers import AutoTokenizer

    folder = tokenizer_folder(path, legacy=legacy)
    tok = (cls or AutoTokenizer).from_pretrained(folder, legacy=legacy, add_bos_token=True)
    assert tok.vocab_size == VOCAB_SIZE, f"{type(tok).__name__} read {tok.vocab_size} pieces from the model"
    tok.add_special_tokens({"pad_token": "<pad>", "additional_special_tokens": ["<image>"]})
    return tok


def tiny_llava(tokenizer, chat_template: str | None):
    """(LlavaForConditionalGeneration with random weights, LlavaProcessor) around `tokenizer`."""
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=chat_template)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                       image_size=32, patch_size=8),
        text_config=LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=512,
                                pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                                eos_token_id=tokenizer.eos_token_id),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
    )
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(config).eval(), processor
