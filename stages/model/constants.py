"""Constants of the towers, without importing torch or open_clip: the driver, the CPU tasks and the
readers use them."""
from __future__ import annotations

# open_clip's default constants (OPENAI_DATASET_MEAN/STD), without importing open_clip here.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_MEAN_RGB = tuple(int(255 * m) for m in OPENAI_MEAN)  # (122, 116, 104), as LLaVA pads: the default fill
INTERPOLATIONS = ("bicubic", "bilinear")  # what open_clip's tags use; our resize supports both
HF_HUB_PREFIX = "hf-hub:"  # open_clip's syntax for a model whose config and weights live in a hub repo
PRECISIONS = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # autocast dtype names in torch
