"""Model adapters for the training stage: images + prompt/answer text -> (logits, labels).

Every adapter is an `nn.Module` whose forward takes a batch of images (B x 3 x H x W floats in
[0, 1], as the shard loader yields them) with the prompts and answers as strings, and returns
the logits over its own full input sequence plus labels aligned with it (-100 everywhere but
the answer tokens, Hugging Face convention, unshifted). The losses in `stages.losses` need
nothing else, so a new model family only has to implement this one method.

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
from stages.loader import NORMALIZE
from stages.losses import IGNORE_INDEX

MODELS = ("toy", "llava-hf")


class VLMAdapter(Protocol):
    """What the training loop needs from a model."""

    image_size: int | None  # square side the adapter wants; None: it resizes itself

    def __call__(self, images: torch.Tensor, prompts: list[str], answers: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits B x T x V, labels B x T) for the batch."""
        ...


def pad_right(rows: list[torch.Tensor], value: int) -> torch.Tensor:
    """Stack 1-D tensors of different lengths, padding on the right."""
    out = torch.full((len(rows), max(len(r) for r in rows)), value, dtype=rows[0].dtype)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


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

    Sequence: [image tokens][BOS] prompt bytes [newline] answer bytes [EOS]; only answer bytes
    and EOS are labelled."""

    def __init__(self, vision_config: str | Path | dict | None = None, d_model: int = 64, layers: int = 2, heads: int = 4, max_len: int = 256):
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
        self.max_len = max_len
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    def _text(self, prompts: list[str], answers: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, labels = [], []
        tok = self.tokenizer
        for prompt, answer in zip(prompts, answers):
            head = [tok.BOS, *tok.encode(prompt), ord("\n")]
            tail = [*tok.encode(answer), tok.EOS]
            ids.append(torch.tensor(head + tail))
            labels.append(torch.tensor([IGNORE_INDEX] * len(head) + tail))
        return pad_right(ids, tok.PAD), pad_right(labels, IGNORE_INDEX)

    def forward(self, images: torch.Tensor, prompts: list[str], answers: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.pos.device
        images = images.to(device, torch.float32)
        if images.shape[-2:] != (self.image_size, self.image_size):
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear", antialias=True, align_corners=False)
        _, patches = self.visual((images - self.mean) / self.std)
        image_tokens = self.projector(patches)
        ids, text_labels = self._text(prompts, answers)
        n_image = image_tokens.shape[1]
        keep = self.max_len - n_image
        ids, text_labels = ids[:, :keep].to(device), text_labels[:, :keep].to(device)  # too long: cut the tail
        x = torch.cat([image_tokens, self.embed(ids)], dim=1)
        x = x + self.pos[: x.shape[1]]
        causal = nn.Transformer.generate_square_subsequent_mask(x.shape[1], device=device)
        logits = self.head(self.norm(self.blocks(x, mask=causal, is_causal=True)))
        labels = torch.cat([torch.full((len(ids), n_image), IGNORE_INDEX, device=device), text_labels], dim=1)
        return logits, labels


# --- llava-hf ----------------------------------------------------------------------------

# LLaVA-1.5 conversation format, used when a processor ships no chat template.
LLAVA15_CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}USER: "
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %} "
    "{% else %}ASSISTANT: {{ m['content'][0]['text'] }}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


class LlavaHF(nn.Module):
    """Hugging Face LLaVA behind the adapter interface.

    The prompt is rendered with the processor's chat template (user turn: image + prompt) and
    expanded by the processor; the answer is the text the template adds for the assistant
    turn (answer plus its end-of-turn marker), tokenized on its own and appended, so the
    boundary between prompt and answer tokens is exact. Vision tower frozen by default, as in
    LLaVA-1.5 stage 2."""

    image_size = None  # the processor resizes

    def __init__(self, model: nn.Module, processor, *, freeze_vision: bool = True):
        super().__init__()
        self.model = model
        self.processor = processor
        if getattr(processor, "chat_template", None) is None:
            processor.chat_template = LLAVA15_CHAT_TEMPLATE
        tok = processor.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        if freeze_vision:
            self.vision_tower().requires_grad_(False)

    def vision_tower(self) -> nn.Module:
        inner = getattr(self.model, "model", self.model)  # transformers >= 4.52 nests it in .model
        tower = getattr(inner, "vision_tower", None)
        return tower if tower is not None else self.model.vision_tower

    @classmethod
    def from_pretrained(cls, path: str, *, dtype: torch.dtype = torch.float32, freeze_vision: bool = True, gradient_checkpointing: bool = False) -> "LlavaHF":
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
        return cls(model, processor, freeze_vision=freeze_vision)

    def _texts(self, prompt: str, answer: str) -> tuple[str, str]:
        prompt = prompt.replace(self.processor.image_token, "").strip()  # the template places the one image
        user = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        assistant = [{"role": "assistant", "content": [{"type": "text", "text": answer}]}]
        head = self.processor.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
        full = self.processor.apply_chat_template(user + assistant, tokenize=False)
        if not full.startswith(head):
            raise UserError("the chat template does not render the user turn as a prefix of the conversation; set processor.chat_template")
        return head, full[len(head) :]

    def encode(self, images: torch.Tensor, prompts: list[str], answers: list[str]) -> dict[str, torch.Tensor]:
        """Model inputs (input_ids, attention_mask, pixel_values; right-padded) and labels."""
        heads, tails = zip(*(self._texts(p, a) for p, a in zip(prompts, answers)))
        enc = self.processor(images=list(images.float().cpu()), text=list(heads), return_tensors="pt", padding=True, do_rescale=False)
        tok = self.processor.tokenizer
        ids, labels = [], []
        for row, mask, tail in zip(enc["input_ids"], enc["attention_mask"], tails):
            head_ids = row[mask.bool()]  # the expanded prompt, padding removed
            tail_ids = torch.tensor(tok(tail, add_special_tokens=False)["input_ids"], dtype=head_ids.dtype)
            ids.append(torch.cat([head_ids, tail_ids]))
            labels.append(torch.cat([torch.full_like(head_ids, IGNORE_INDEX), tail_ids]))
        return {
            "input_ids": pad_right(ids, self.pad_id),
            "attention_mask": pad_right([torch.ones_like(i) for i in ids], 0),
            "pixel_values": enc["pixel_values"],
            "labels": pad_right(labels, IGNORE_INDEX),
        }

    def forward(self, images: torch.Tensor, prompts: list[str], answers: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.encode(images, prompts, answers)
        device = next(self.model.parameters()).device
        out = self.model(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
            pixel_values=batch["pixel_values"].to(device, self.vision_tower().dtype),
        )
        return out.logits, batch["labels"].to(device)

    def save_pretrained(self, folder: str | Path) -> None:
        self.model.save_pretrained(folder)
        self.processor.save_pretrained(folder)


def build_adapter(name: str, model_path: str | None = None, *, dtype: str = "fp32", gradient_checkpointing: bool = False) -> nn.Module:
    """`toy` (model_path: optional open_clip model-config JSON for the vision tower) or
    `llava-hf` (model_path: a local folder or hub id with model and processor)."""
    if name == "toy":
        return ToyVLM(model_path)
    if name == "llava-hf":
        if not model_path:
            raise UserError("--model llava-hf needs --model-path (a LLaVA folder with model and processor, e.g. llava-hf/llava-1.5-7b-hf)")
        dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
        if dtype not in dtypes:
            raise UserError(f"unknown --model-dtype {dtype!r}; choose fp32 or bf16")
        return LlavaHF.from_pretrained(model_path, dtype=dtypes[dtype], gradient_checkpointing=gradient_checkpointing)
    raise UserError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
