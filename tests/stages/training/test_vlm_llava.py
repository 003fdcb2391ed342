"""The llava-hf adapter on a tiny LLaVA-1.5 with a real Llama SentencePiece tokenizer trained here
(tests/tiny_llava.py), with the chat template llava-hf ships and with none (then LLaVA-1.5's
own training format, Vicuna v1). Nothing is downloaded (HF_HUB_OFFLINE=1). Skipped when
transformers (extra `llava`) is not installed."""
from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

transformers = pytest.importorskip("transformers")
pytest.importorskip("sentencepiece")

from stages.errors import UserError  # noqa: E402
from stages.training.losses import IGNORE_INDEX, mergemix_loss, sequence_logps, sft_loss  # noqa: E402
from stages.training.train import CHECKPOINT, TrainConfig, train  # noqa: E402
from stages.training.vlm import LlavaHF  # noqa: E402
from tests.stages.training.test_train import Interrupted, read_log, stop_at  # noqa: E402
from tests.tiny_llava import IMAGE_TOKENS, LLAVA_HF_CHAT_TEMPLATE, llama_tokenizer, tiny_llava  # noqa: E402

# LLaVA-1.5's system prompt (conv_vicuna_v1), written out here rather than imported.
SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the human's questions.")
MULTI = [("What colour is the picture?", "The picture is red."), ("How many objects are there?", "There are 12 objects."),
         ("Describe it in one word.", "Plain.")]
SINGLE = [("Is it bright or dark?", "It is bright, like a white wall.")]
# Tokenizer classes of transformers (name -> class name, legacy). In transformers 5 the Llama
# tokenizer is built on `tokenizers` and LlamaTokenizerFast is another name for it; `legacy`
# decides whether text after a special token gets the SentencePiece prefix space.
TOKENIZERS = {"auto": ("AutoTokenizer", False), "llama-legacy": ("LlamaTokenizer", True),
              "llama-fast": ("LlamaTokenizerFast", False), "llama-fast-legacy": ("LlamaTokenizerFast", True)}
TEMPLATES = {"llava-hf-template": LLAVA_HF_CHAT_TEMPLATE, "no-template": None}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def make_adapter(tmp_path_factory):
    made = {}

    def make(tokenizer: str, template: str) -> LlavaHF:
        if (tokenizer, template) not in made:
            cls_name, legacy = TOKENIZERS[tokenizer]
            tok = llama_tokenizer(tmp_path_factory.mktemp(tokenizer), legacy=legacy, cls=getattr(transformers, cls_name))
            assert tok.legacy == legacy
            made[tokenizer, template] = LlavaHF(*tiny_llava(tok, TEMPLATES[template]))
        return made[tokenizer, template]

    return make


def expected_text(template: str, turns, with_image: bool) -> str:
    """The conversation as the model must see it, written out by hand."""
    image = "<image>\n" if with_image else ""
    if template == "no-template":  # LLaVA-1.5 training: system, sep " ", "</s>" after each answer
        return SYSTEM + " " + "".join(f"USER: {image if i == 0 else ''}{q} ASSISTANT: {a}</s>" for i, (q, a) in enumerate(turns))
    # llava-hf's template, plus the EOS the adapter puts after each answer
    return "".join(f"USER: {image if i == 0 else ''}{q} ASSISTANT: {a}</s> " for i, (q, a) in enumerate(turns))


def expected_labels(tok, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of `text` and the token range of every answer + </s>: from the end of
    "ASSISTANT:" to the end of its "</s>". Both ends are places where the tokens of a prefix
    of the text are a prefix of the whole text's tokens (a ":" never merges with the next
    space; "</s>" is a special token), so tokenising the prefixes finds them."""
    ids = tok(text)["input_ids"]
    ranges, at = [], 0
    while (found := text.find("ASSISTANT:", at)) >= 0:
        head_end = found + len("ASSISTANT:")
        turn_end = text.index("</s>", head_end) + len("</s>")
        head, turn = tok(text[:head_end])["input_ids"], tok(text[:turn_end])["input_ids"]
        assert ids[: len(turn)] == turn
        ranges.append((len(head), len(turn)))
        at = turn_end
    return ids, ranges


@pytest.mark.parametrize("template", list(TEMPLATES))
@pytest.mark.parametrize("tokenizer", list(TOKENIZERS))
def test_labels_are_every_answer_of_the_full_sequence_with_eos(make_adapter, tokenizer, template):
    adapter = make_adapter(tokenizer, template)
    tok = adapter.processor.tokenizer
    turns, has_image = [MULTI, SINGLE, MULTI], torch.tensor([True, True, False])  # the last row is text-only
    winner = adapter.encode(torch.rand(3, 3, 32, 32), turns, has_image)
    loser = adapter.encode(torch.rand(3, 3, 32, 32), turns, has_image)
    assert torch.equal(winner["labels"], loser["labels"]) and torch.equal(winner["input_ids"], loser["input_ids"])
    assert winner["pixel_values"].shape[0] == 2  # the text-only row sends no image
    image_id = tok.convert_tokens_to_ids("<image>")
    for row, (conv, with_image) in enumerate(zip(turns, has_image.tolist())):
        text = expected_text(template, conv, with_image).replace("<image>", "<image>" * IMAGE_TOKENS)
        ids, ranges = expected_labels(tok, text)
        assert ids[0] == tok.bos_token_id and len(ranges) == len(conv)
        got_ids, got_labels = winner["input_ids"][row], winner["labels"][row]
        n = int(winner["attention_mask"][row].sum())
        assert got_ids[:n].tolist() == ids  # the whole conversation, tokenised once
        labels = [IGNORE_INDEX] * len(ids)
        for (a, b), (_, answer) in zip(ranges, conv):
            labels[a:b] = ids[a:b]
            assert ids[b - 1] == tok.eos_token_id
            assert tok.decode(ids[a:b]) == answer + "</s>"
        assert got_labels[:n].tolist() == labels
        assert (got_labels[n:] == IGNORE_INDEX).all()  # padding
        assert (got_ids == image_id).sum() == (IMAGE_TOKENS if with_image else 0)
        assert (got_labels[got_ids == image_id] == IGNORE_INDEX).all()
        if template == "no-template":  # the system prompt is there, unlabelled
            assert tok.decode(ids[: ranges[0][0]]).startswith(f"<s> {SYSTEM} USER:")


def test_decoded_multi_turn_example(make_adapter):
    """The README's example: what the model reads and what it learns to write."""
    adapter = make_adapter("auto", "llava-hf-template")
    tok = adapter.processor.tokenizer
    batch = adapter.encode(torch.rand(1, 3, 32, 32), [MULTI[:2]])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    shown = tok.decode(ids).replace("<image>" * IMAGE_TOKENS, "<image>x16")
    assert shown == ("<s> USER: <image>x16\nWhat colour is the picture? ASSISTANT: The picture is red.</s> "
                     "USER: How many objects are there? ASSISTANT: There are 12 objects.</s> ")
    runs = "".join(tok.convert_ids_to_tokens(int(i)) if label != IGNORE_INDEX else "|" for i, label in zip(ids, labels))
    assert [r for r in runs.split("|") if r] == ["▁The▁picture▁is▁red.</s>", "▁There▁are▁12▁objects.</s>"]


def test_sft_loss_equals_the_models_own_loss(make_adapter):
    """The model's own causal-LM loss with our labels: same shift, same tokens."""
    adapter = make_adapter("auto", "llava-hf-template")
    images, turns = torch.rand(3, 3, 32, 32), [MULTI, SINGLE, MULTI[1:]]
    batch = adapter.encode(images, turns)
    with torch.no_grad():
        out = adapter.model(**batch)
        logits, labels = adapter(images, turns)
    assert sft_loss(logits, labels).item() == pytest.approx(out.loss.item(), abs=1e-5)


def test_answer_logps_do_not_depend_on_batch_padding(make_adapter):
    adapter = make_adapter("llama-legacy", "no-template")
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        alone = sequence_logps(*adapter(images[:1], [SINGLE]))
        batched = sequence_logps(*adapter(images, [SINGLE, MULTI]))
    assert batched.tokens[0].item() == alone.tokens[0].item() > len(SINGLE[0][1].split())
    assert batched.mean[0].item() == pytest.approx(alone.mean[0].item(), abs=1e-5)


def test_max_length_cuts_winner_and_loser_alike_and_an_answerless_pair_leaves_simpo(make_adapter):
    adapter = make_adapter("auto", "no-template")
    long_question = [("Describe the picture, its colour, the objects and the wall in it in one word. " * 3, "Plain.")]
    turns = [long_question, SINGLE]
    first_label = [int((row != IGNORE_INDEX).nonzero()[0]) for row in adapter.encode(torch.rand(2, 3, 32, 32), turns)["labels"]]
    assert first_label[1] < first_label[0]
    adapter.max_length = first_label[0]  # the long row keeps none of its answer, the short row some
    try:
        with torch.no_grad():
            w_logits, w_labels = adapter(torch.rand(2, 3, 32, 32), turns)
            l_logits, l_labels = adapter(torch.rand(2, 3, 32, 32), turns)
        assert w_labels.shape[1] == adapter.max_length and torch.equal(w_labels, l_labels)
        assert (w_labels[0] == IGNORE_INDEX).all() and (w_labels[1] != IGNORE_INDEX).any()
        out = mergemix_loss(w_logits, w_labels, l_logits, l_labels, torch.tensor([0.3, 0.3]))
        assert torch.isfinite(out.loss)
        assert (out.metrics["counts/no_answer"], out.metrics["counts/pairs"]) == (1, 1)
        assert out.metrics["simpo"] == pytest.approx(float(-torch.nn.functional.logsigmoid(
            sequence_logps(w_logits, w_labels).mean[1] - sequence_logps(l_logits, l_labels).mean[1] - 0.3)), abs=1e-5)
        adapter.max_length = 20  # inside the image tokens
        with pytest.raises(UserError, match="--max-length 20 cuts into the image tokens"):
            adapter.encode(torch.rand(1, 3, 32, 32), [SINGLE])
    finally:
        adapter.max_length = None


def test_slow_tokenizers_and_templates_that_are_not_turn_by_turn_are_refused(tmp_path):
    from transformers import LlamaTokenizer, LlamaTokenizerFast

    fast = llama_tokenizer(tmp_path / "fast", legacy=True)
    if LlamaTokenizer is not LlamaTokenizerFast:
        slow_cls = LlamaTokenizer  # transformers 4: the SentencePiece class
    else:
        from transformers import SentencePieceBackend as slow_cls  # transformers 5: Llama's slow class is gone
    slow = slow_cls(vocab_file=str(tmp_path / "fast" / "tokenizer.model"), legacy=True, bos_token="<s>", eos_token="</s>",
                    unk_token="<unk>", pad_token="<pad>", additional_special_tokens=["<image>"])
    assert not slow.is_fast and slow.vocab_size == fast.vocab_size
    with pytest.raises(UserError, match="slow tokenizer without character offsets"):
        LlavaHF(*tiny_llava(slow, None))
    reversed_turns = LLAVA_HF_CHAT_TEMPLATE.replace("for message in messages", "for message in messages | reverse")
    with pytest.raises(UserError, match="turn by turn"):
        LlavaHF(*tiny_llava(fast, reversed_turns))


# --- training on shards -------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, make_adapter):
    path = tmp_path_factory.mktemp("tiny-llava")
    make_adapter("auto", "llava-hf-template").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def chats(tmp_path_factory, tiny_model_config):
    """Shards made by `generate` (real Ray, the tiny open_clip tower) from a LLaVA JSON of 12
    pictures, every other one with a second turn, and 3 text-only conversations of two turns
    among them (they become skipped rows, error no_image): 15 inputs in 3 units."""
    import ray

    from pipeline.config import GenerateConfig
    from pipeline.run import generate
    from stages.samples.demo import write_sample_data

    root = tmp_path_factory.mktemp("chat-input")
    rows = json.loads(write_sample_data(root, n=12, seed=5).read_text())[:-1]
    for i, row in enumerate(rows):
        if i % 2:
            row["conversations"] += [{"from": "human", "value": "Is it bright or dark?"}, {"from": "gpt", "value": "Bright."}]
    for at in (2, 7, 13):
        rows.insert(at, {"id": f"text-{at}", "conversations": [
            {"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "Red."},
            {"from": "human", "value": "Another one?"}, {"from": "gpt", "value": "Blue."}]})
    (root / "chats.json").write_text(json.dumps(rows))
    out = tmp_path_factory.mktemp("chats")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        result = generate(GenerateConfig.build(dict(
            input=str(root / "chats.json"), image_root=str(root), output=str(out), model=str(tiny_model_config),
            pretrained="none", merge=16, samples_per_shard=5, batch_size=4, image_format="png", progress=False, seed=1)))
    finally:
        ray.shutdown()
    assert result.ok and result.counts == {"ok": 12, "failed": 0, "skipped": 3}
    return out


def test_saved_model_folder_reads_conversations_the_same(make_adapter, model_dir):
    before = make_adapter("auto", "llava-hf-template")
    after = LlavaHF.from_pretrained(str(model_dir))
    images = torch.rand(2, 3, 32, 32)
    a, b = before.encode(images, [MULTI, SINGLE]), after.encode(images, [MULTI, SINGLE])
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])


def test_llava_hf_trains_on_shards_with_text_only_rows_and_frozen_vision(model_dir, chats, tmp_path):
    from transformers import LlavaForConditionalGeneration

    run = tmp_path / "run"
    result = train(TrainConfig(shards=str(chats), output=str(run), model="llava-hf", model_path=str(model_dir), steps=8,
                               batch_size=8, lr=3e-3, warmup=2, log_every=4, text_only_rows=True), echo=lambda line: None)
    assert result["step"] == 8 and result["last"]["sft"] < result["first"]["sft"]
    log = read_log(run)
    assert sum(r["counts/sft_only"] for r in log) > 0 and sum(r["counts/pairs"] for r in log) > 0
    assert all(r["counts/no_answer"] == 0 for r in log)
    saved = torch.load(run / CHECKPOINT, weights_only=True)["model"]
    assert saved and not any("vision_tower" in name for name in saved)  # frozen, as LLaVA-1.5 stage 2
    before = LlavaForConditionalGeneration.from_pretrained(model_dir).state_dict()
    after = LlavaForConditionalGeneration.from_pretrained(run / "model").state_dict()
    vision = [n for n in before if "vision_tower" in n]
    assert vision and all(torch.equal(before[n], after[n]) for n in vision)
    assert any(not torch.equal(before[n], after[n]) for n in before if "language_model" in n)


def test_llava_hf_resume_with_other_workers_equals_one_run(model_dir, chats, tmp_path):
    """Stopped at step 4 (checkpoint: step 3) and resumed with 2 loader workers instead of none:
    the same weights and log as one uninterrupted run (6 steps of 4 samples: one epoch of 15,
    12 pairs and 3 text-only rows, in 4 batches, then half of the next)."""
    common = dict(shards=str(chats), model="llava-hf", model_path=str(model_dir), steps=6, batch_size=4, lr=3e-3,
                  warmup=2, log_every=1, save_every=3, text_only_rows=True)
    train(TrainConfig(output=str(tmp_path / "once"), **common), echo=lambda line: None)
    with pytest.raises(Interrupted):
        train(TrainConfig(output=str(tmp_path / "split"), **common), echo=stop_at(4))
    train(TrainConfig(output=str(tmp_path / "split"), resume=True, num_workers=2, **common), echo=lambda line: None)
    with pytest.raises(UserError, match="text_only_rows"):
        train(TrainConfig(output=str(tmp_path / "split"), resume=True, **{**common, "text_only_rows": False}))
    once = torch.load(tmp_path / "once" / CHECKPOINT, weights_only=True)
    split = torch.load(tmp_path / "split" / CHECKPOINT, weights_only=True)
    assert split["step"] == once["step"] == 6 and (split["epoch"], split["offset"]) == (once["epoch"], once["offset"]) == (1, 2)
    for name, tensor in once["model"].items():
        torch.testing.assert_close(split["model"][name], tensor, rtol=0, atol=1e-6)
    assert [r["loss"] for r in read_log(tmp_path / "split")] == pytest.approx([r["loss"] for r in read_log(tmp_path / "once")], abs=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bf16_step_on_cuda(model_dir, chats, tmp_path):
    result = train(TrainConfig(shards=str(chats), output=str(tmp_path / "gpu"), model="llava-hf", model_path=str(model_dir),
                               model_dtype="bf16", device="cuda", steps=2, batch_size=8, lr=1e-3, warmup=1, log_every=1,
                               text_only_rows=True), echo=lambda line: None)
    assert result["step"] == 2 and all(np.isfinite(result["last"][k]) for k in ("loss", "sft", "simpo"))


def test_missing_model_path_is_a_user_error(tmp_path):
    from stages.training.vlm import build_adapter

    with pytest.raises(UserError, match="--model-path"):
        build_adapter("llava-hf")
    with pytest.raises(UserError, match="could not load"):
        build_adapter("llava-hf", str(tmp_path / "nowhere"))
