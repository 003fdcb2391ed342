"""Model adapters for the training stage: images + conversations -> (logits, labels).

Every adapter is an `nn.Module` whose forward takes a batch of images (B x 3 x H x W floats in
[0, 1], as the shard loader yields them), the conversations as lists of (question, answer)
turns (`stages.readers.conversation.sample_turns`) and optionally `has_image` (B bools; rows without an
image are text-only and their image is ignored). It returns the logits over its own full input
sequence plus labels aligned with it (Hugging Face convention, unshifted): the tokens of every
answer of every turn, each with its end-of-turn token, and -100 everywhere else. The losses in
`stages.training.losses` need nothing else, so a new model family only has to implement this one method.

The whole conversation is tokenised once; labels are never made by tokenising pieces on their
own, so the labelled ids are exactly the model's own tokens. With `max_length`, sequences are
cut to that many tokens (winner and loser alike: same text, same number of image tokens).

- `toy`: a tiny open_clip ViT (random weights) + projector + tiny causal transformer over
  bytes. Trains on a CPU in seconds; it exists to show and test that the loop learns.
- `llava-hf`: Hugging Face `LlavaForConditionalGeneration` with its processor and chat
  template (optional extra `llava`). The processor expands `<image>` into the model's image
  tokens, so labels are built on the exact sequence the model sees.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from stages.errors import UserError
from stages.training.loader import NORMALIZE
from stages.training.losses import IGNORE_INDEX

MODELS = ("toy", "llava-hf")
Turns = list[tuple[str, str]]  # (question, answer) exchanges of one conversation


class VLMAdapter(Protocol):
    """What the training loop needs from a model."""

    image_size: int | None  # square side the adapter wants; None: it resizes itself

    def __call__(self, images: torch.Tensor, turns: list[Turns], has_image: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits B x T x V, labels B x T) for the batch."""
        ...


def pad_right(rows: list[torch.Tensor], value: int) -> torch.Tensor:
    """Stack 1-D tensors of different lengths, padding on the right."""
    out = torch.full((len(rows), max(len(r) for r in rows)), value, dtype=rows[0].dtype, device=rows[0].device)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def image_rows(has_image, n: int) -> list[bool]:
    return [True] * n if has_image is None else [bool(h) for h in has_image]


# --- toy ---------------------------------------------------------------------------------

# open_clip model config of the toy vision tower: 32 px, patch 8 -> 16 patch tokens.
TOY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
}
CLIP_MEAN, CLIP_STD = NORMALIZE["clip"]


class ByteTokenizer:
    """UTF-8 bytes as tokens 0-255, plus BOS, EOS and PAD."""

    BOS, EOS, PAD = 256, 257, 258
    vocab_size = 259

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def _open_clip_visual(config: str | Path | dict) -> nn.Module:
    """The vision tower of an open_clip model built from a model-config JSON (random weights)."""
    import open_clip

    if isinstance(config, dict):  # open_clip reads configs from files: write it to a private one
        folder = Path(tempfile.mkdtemp(prefix="mergemix-toy-"))
        path = folder / "mergemix-toy-vit.json"
        path.write_text(json.dumps(config))
    else:
        path = Path(config)
        if path.suffix != ".json" or not path.is_file():
            raise UserError(f"toy model config {config} not found; pass an open_clip model-config .json file")
    open_clip.add_model_config(path)
    visual = open_clip.create_model(path.stem, pretrained=None).visual
    visual.output_tokens = True  # forward returns (pooled, patch tokens)
    return visual


class ToyVLM(nn.Module):
    """LLaVA in miniature: ViT patch tokens -> MLP projector -> prefix of a causal transformer.

    Sequence: [image tokens][BOS] then per turn "USER: {question} ASSISTANT: " {answer} [EOS]
    (text-only rows: no image tokens). Answer bytes and each EOS are labelled. Bytes are their
    own tokens, so the ids of the parts joined are the ids of the whole text."""

    def __init__(self, vision_config: str | Path | dict | None = None, d_model: int = 64, layers: int = 2, heads: int = 4,
                 max_len: int = 256, max_length: int | None = None):
        super().__init__()
        self.tokenizer = ByteTokenizer()
        self.visual = _open_clip_visual(vision_config or TOY_CLIP_CONFIG)
        size = self.visual.image_size
        self.image_size = size[0] if isinstance(size, (tuple, list)) else int(size)
        width = self.visual.conv1.out_channels
        self.projector = nn.Sequential(nn.Linear(width, d_model), nn.GELU(), nn.Linear(d_model, d_model))
        self.embed = nn.Embedding(self.tokenizer.vocab_size, d_model)
        self.pos = nn.Parameter(torch.randn(max_len, d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(d_model, heads, 4 * d_model, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, self.tokenizer.vocab_size)
        self.max_len = min(max_len, max_length or max_len)  # positions the model has, or fewer
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    def _text(self, turns: Turns) -> tuple[list[int], list[int]]:
        tok = self.tokenizer
        ids, labels = [tok.BOS], [IGNORE_INDEX]
        for question, answer in turns:
            head = tok.encode(f"USER: {question} ASSISTANT: ")
            tail = [*tok.encode(answer), tok.EOS]
            ids += head + tail
            labels += [IGNORE_INDEX] * len(head) + tail
        return ids, labels

    def forward(self, images: torch.Tensor, turns: list[Turns], has_image: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.pos.device
        images = images.to(device, torch.float32)
        if images.shape[-2:] != (self.image_size, self.image_size):
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear", antialias=True, align_corners=False)
        _, patches = self.visual((images - self.mean) / self.std)
        image_tokens = self.projector(patches)
        rows, row_labels = [], []
        for i, (conv, with_image) in enumerate(zip(turns, image_rows(has_image, len(turns)))):
            ids, labels = self._text(conv)
            x = self.embed(torch.tensor(ids, device=device))
            labels = torch.tensor(labels, device=device)
            if with_image:
                x = torch.cat([image_tokens[i], x])
                labels = torch.cat([torch.full((len(image_tokens[i]),), IGNORE_INDEX, device=device), labels])
            rows.append(x[: self.max_len])  # too long: cut the tail
            row_labels.append(labels[: self.max_len])
        length = max(len(r) for r in rows)
        x = torch.stack([F.pad(r, (0, 0, 0, length - len(r))) for r in rows])  # right padding: causal, never attended
        x = x + self.pos[:length]
        causal = nn.Transformer.generate_square_subsequent_mask(length, device=device)
        logits = self.head(self.norm(self.blocks(x, mask=causal, is_causal=True)))
        return logits, pad_right(row_labels, IGNORE_INDEX)


# --- llava-hf ----------------------------------------------------------------------------

# LLaVA-1.5's own training format (LLaVA's `conv_vicuna_v1`: system prompt, sep " ", sep2 "</s>"),
# used when a processor ships no chat template:
#   "{system} USER: <image>\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>..."
LLAVA15_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                  "The assistant gives helpful, detailed, and polite answers to the human's questions.")
LLAVA15_CHAT_TEMPLATE = (
    LLAVA15_SYSTEM + " "
    "{% for m in messages %}{% if m['role'] == 'user' %}USER: "
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %} "
    "{% else %}ASSISTANT: {{ m['content'][0]['text'] }}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def chat_messages(turns: Turns, with_image: bool) -> list[dict]:
    """Chat-template messages of a conversation; the image opens the first user turn, where
    LLaVA puts it."""
    messages = []
    for i, (question, answer) in enumerate(turns):
        content = [{"type": "image"}] if with_image and i == 0 else []
        messages.append({"role": "user", "content": content + [{"type": "text", "text": question}]})
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


class LlavaHF(nn.Module):
    """Hugging Face LLaVA behind the adapter interface.

    The conversation is rendered with the processor's chat template (LLAVA15_CHAT_TEMPLATE when
    it has none), every turn, and the processor tokenises it once, expanding `<image>` into the
    model's image tokens. An assistant turn is the text the template adds after the generation
    prompt of that turn, up to the end of the turn, trailing whitespace excluded; its tokens are
    those whose character offsets overlap it (fast tokenizers report offsets). A template that
    ends assistant turns with no special token (llava-hf's own: "{answer} ") gets the EOS token
    after each answer, so the model learns to stop, as LLaVA-1.5 was trained. Vision tower
    frozen by default, as in LLaVA-1.5 stage 2."""

    image_size = None  # the processor resizes

    def __init__(self, model: nn.Module, processor, *, freeze_vision: bool = True, max_length: int | None = None):
        super().__init__()
        self.model = model
        self.processor = processor
        self.max_length = max_length
        tok = processor.tokenizer
        if not getattr(tok, "is_fast", False):
            raise UserError(f"the processor's tokenizer ({type(tok).__name__}) is a slow tokenizer without character offsets; "
                            "load the processor with a fast tokenizer (a folder with tokenizer.json, or the default of AutoProcessor)")
        if getattr(processor, "chat_template", None) is None:
            processor.chat_template = LLAVA15_CHAT_TEMPLATE
        self.image_token = processor.image_token
        self.image_token_id = tok.convert_tokens_to_ids(self.image_token)
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        self.eos_after_answer = False
        text, [(start, end)] = self.render([("q", "a")], with_image=False)  # does the template close a turn?
        ends = {t for t in tok.all_special_tokens if t != self.image_token}
        self.eos_after_answer = not any(text[start:end].endswith(t) for t in ends)
        if self.eos_after_answer and tok.eos_token is None:
            raise UserError("the chat template ends answers with no special token and the tokenizer has no EOS token: the model could not learn to stop")
        if freeze_vision:
            self.vision_tower().requires_grad_(False)

    def vision_tower(self) -> nn.Module:
        inner = getattr(self.model, "model", self.model)  # transformers >= 4.52 nests it in .model
        tower = getattr(inner, "vision_tower", None)
        return tower if tower is not None else self.model.vision_tower

    @classmethod
    def from_pretrained(cls, path: str, *, dtype: torch.dtype = torch.float32, freeze_vision: bool = True,
                        gradient_checkpointing: bool = False, max_length: int | None = None) -> "LlavaHF":
        try:
            from transformers import AutoProcessor, LlavaForConditionalGeneration
        except ImportError:
            raise UserError("--model llava-hf needs transformers: pip install 'mergemix-pipeline[llava]'") from None
        try:
            model = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype)
            processor = AutoProcessor.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise UserError(f"could not load a LLaVA model and processor from {path!r} ({type(exc).__name__}); pass --model-path to a local model folder or a hub id you can reach") from None
        if gradient_checkpointing:
            model.gradient_checkpointing_enable()
        return cls(model, processor, freeze_vision=freeze_vision, max_length=max_length)

    def _chat(self, messages: list[dict], generation_prompt: bool = False) -> str:
        return self.processor.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)

    def render(self, turns: Turns, with_image: bool = True) -> tuple[str, list[tuple[int, int]]]:
        """The conversation as the template renders it, and the character span of each
        assistant turn in it: from the end of the turn's generation prompt to the end of the
        turn, trailing whitespace excluded (the answer, its end-of-turn token included)."""
        eos = self.processor.tokenizer.eos_token if self.eos_after_answer else ""
        messages = chat_messages([(q, a + eos) for q, a in turns], with_image)
        text = self._chat(messages)
        spans = []
        for i in range(1, len(messages), 2):
            head = self._chat(messages[:i], generation_prompt=True)
            upto = self._chat(messages[: i + 1])
            if not (upto.startswith(head) and text.startswith(upto)):
                raise UserError("the chat template does not render a conversation turn by turn (each turn a prefix of the "
                                "next, the generation prompt a prefix of the answer); set processor.chat_template")
            spans.append((len(head), len(upto.rstrip())))
        return text, spans

    def encode(self, images: torch.Tensor, turns: list[Turns], has_image: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Model inputs (input_ids, attention_mask, right-padded; pixel_values of the rows with
        an image, or None) and labels."""
        with_image = image_rows(has_image, len(turns))
        texts, spans = zip(*(self.render(conv, w) for conv, w in zip(turns, with_image)))
        pictures = [img for img, w in zip(images.float().cpu(), with_image) if w]
        enc = self.processor(images=pictures or None, text=list(texts), return_tensors="pt", padding=True,
                             return_offsets_mapping=True, do_rescale=False)
        if "offset_mapping" not in enc:
            raise UserError(f"{type(self.processor).__name__} does not pass character offsets through; labels need them")
        ids, labels = [], []
        for row in range(len(texts)):
            keep = enc["attention_mask"][row].bool()  # padding removed (Llama tokenizers pad on the left)
            row_ids, offsets = enc["input_ids"][row][keep], enc["offset_mapping"][row][keep]
            image_at = (row_ids == self.image_token_id).nonzero().flatten()
            # The processor repeated the one <image> of the text n times: answer spans come after
            # it, so they moved by the characters added.
            grown = (len(image_at) - 1) * len(self.image_token) if with_image[row] else 0
            row_labels = torch.full_like(row_ids, IGNORE_INDEX)
            for start, end in spans[row]:
                inside = (offsets[:, 0] < end + grown) & (offsets[:, 1] > start + grown)
                row_labels[inside] = row_ids[inside]
            if self.max_length is not None and len(row_ids) > self.max_length:
                if len(image_at) and image_at[-1] >= self.max_length:
                    raise UserError(f"--max-length {self.max_length} cuts into the image tokens (they end at token "
                                    f"{int(image_at[-1]) + 1}); raise it")
                row_ids, row_labels = row_ids[: self.max_length], row_labels[: self.max_length]
            ids.append(row_ids)
            labels.append(row_labels)
        return {
            "input_ids": pad_right(ids, self.pad_id),
            "attention_mask": pad_right([torch.ones_like(i) for i in ids], 0),
            "pixel_values": enc.get("pixel_values"),
            "labels": pad_right(labels, IGNORE_INDEX),
        }

    def forward(self, images: torch.Tensor, turns: list[Turns], has_image: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.encode(images, turns, has_image)
        device = next(self.model.parameters()).device
        inputs = {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}
        if batch["pixel_values"] is not None:
            inputs["pixel_values"] = batch["pixel_values"].to(device, self.vision_tower().dtype)
        return self.model(**inputs).logits, batch["labels"].to(device)

    def save_pretrained(self, folder: str | Path) -> None:
        self.model.save_pretrained(folder)
        self.processor.save_pretrained(folder)


def build_adapter(name: str, model_path: str | None = None, *, dtype: str = "fp32", gradient_checkpointing: bool = False,
                  max_length: int | None = None) -> nn.Module:
    """`toy` (model_path: optional open_clip model-config JSON for the vision tower) or
    `llava-hf` (model_path: a local folder or hub id with model and processor). `max_length`:
    tokens kept per sequence (image tokens included); None keeps all (the toy keeps 256)."""
    if name == "toy":
        return ToyVLM(model_path, max_length=max_length)
    if name == "llava-hf":
        if not model_path:
            raise UserError("--model llava-hf needs --model-path (a LLaVA folder with model and processor, e.g. llava-hf/llava-1.5-7b-hf)")
        dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
        if dtype not in dtypes:
            raise UserError(f"unknown --model-dtype {dtype!r}; choose fp32 or bf16")
        return LlavaHF.from_pretrained(model_path, dtype=dtypes[dtype], gradient_checkpointing=gradient_checkpointing,
                                       max_length=max_length)
    raise UserError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
