"""Train the small open_clip ViT checked in under tests/data/scene-tower/ on synthetic scenes.

A real (tiny) CLIP: the image tower is trained contrastively against the 12 class captions
("a photo of a red circle", stages.samples.scenes.CLASSES), i.e. cross-entropy over the
cosine similarities of an image to the 12 caption embeddings, text tower trained with it.
Training scenes are drawn on the fly from the scene set --data-seed (scene i of that set
for sample i); accuracy is measured on the held-out set --eval-seed. Other seeds (the
benchmark's and the tests' held-out sets) must differ from --data-seed.

Deterministic on one machine: a fixed seed, a fixed thread count and
torch.use_deterministic_algorithms(True). Writes the model config (with its
preprocess_cfg), the checkpoint (open_clip's full CLIP state dict), SHA256SUMS and a README.

    python bench/train_scene_tower.py                  # 7 minutes on one core of a busy 2-core machine
    python bench/train_scene_tower.py --steps 100 --out /tmp/scene-tower   # a quick try
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from common import ROOT, machine  # also puts the repository first on sys.path
from stages.samples.scenes import CLASSES, scene  # noqa: E402
from stages.samples.scoring import auc, object_patches  # noqa: E402
from stages.model.factory import build_clip, load_encoder  # noqa: E402
from stages.model.configs import register_model
from stages.model.tower import resolve_tower

NAME = "scene-vit"
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 112, "patch_size": 14, "width": 128, "layers": 4, "head_width": 32},
    # open_clip's own tokenizer (49408 tokens), so open_clip.get_tokenizer serves this model;
    # the narrow width keeps the vocabulary's embedding small.
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
    "preprocess_cfg": {"mean": list(MEAN), "std": list(STD), "interpolation": "bicubic"},
}


def captions() -> list[str]:
    return [f"a photo of a {label}" for label in CLASSES]


def batch(seed: int, start: int, n: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scenes start..start+n-1 of set `seed`: normalised images (n, 3, H, W) and class ids."""
    scenes = [scene(seed, i, size) for i in range(start, start + n)]
    pixels = torch.from_numpy(np.stack([s.image for s in scenes])).permute(0, 3, 1, 2).float() / 255
    images = (pixels - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    return images, torch.tensor([s.class_index for s in scenes])


def class_logits(model, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    image = model.encode_image(images, normalize=True)
    text = model.encode_text(tokens, normalize=True)
    return model.logit_scale.exp() * image @ text.T


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.5 * peak * (1 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1)))


@torch.no_grad()
def accuracy(model, tokens: torch.Tensor, seed: int, n: int, size: int) -> float:
    model.eval()
    right = 0
    for start in range(0, n, 128):
        images, labels = batch(seed, start, min(128, n - start), size)
        right += int((class_logits(model, images, tokens).argmax(dim=1) == labels).sum())
    return right / n


def saliency_aucs(config: Path, weights: Path, seed: int, n: int, size: int, depth: int) -> list[float]:
    """Mean per-image AUC of the un-merged CLS attention against the object patches, per block,
    through the project's own loader."""
    scenes = [scene(seed, i, size) for i in range(n)]
    pixels = torch.from_numpy(np.stack([s.image for s in scenes]))
    result = []
    for layer in range(depth):
        enc = load_encoder(str(config), str(weights), merge=0, attn_layer=layer)
        grid = enc.saliency_from_pixels(pixels).grid.numpy()
        scores = [auc(g, object_patches(s.mask, enc.patch[0])) for g, s in zip(grid, scenes)]
        result.append(float(np.mean([a for a in scores if a is not None])))
    return result


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0, help="torch seed: initial weights")
    ap.add_argument("--data-seed", type=int, default=100, help="scene set the training scenes come from")
    ap.add_argument("--eval-seed", type=int, default=101, help="held-out scene set for the accuracy")
    ap.add_argument("--eval-scenes", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=700)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (one: the same bytes however busy the machine)")
    ap.add_argument("--out", default=str(ROOT / "tests" / "data" / "scene-tower"))
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config_path, weights_path = out / f"{NAME}.json", out / f"{NAME}.pt"
    config_path.write_text(json.dumps(CONFIG, indent=2) + "\n")

    import open_clip

    name = register_model(str(config_path), open_clip)  # the project's way: preprocess_cfg stays out of open_clip
    model = open_clip.create_model(name)
    tokens = open_clip.get_tokenizer(name)(captions())
    size = CONFIG["vision_cfg"]["image_size"]
    optimiser = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)

    start = time.time()
    model.train()
    for step in range(args.steps):
        for group in optimiser.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr, args.warmup)
        images, labels = batch(args.data_seed, step * args.batch, args.batch, size)
        loss = F.cross_entropy(class_logits(model, images, tokens), labels)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}  {time.time() - start:6.1f} s", flush=True)
    train_s = time.time() - start
    # fp16 halves the file; open_clip's loader copies it into the fp32 model (measured below as loaded).
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}, weights_path)

    # Measure what was written, loaded back the project's way (open_clip's strict, weights-only loader).
    tower = resolve_tower(str(config_path), str(weights_path))
    loaded = build_clip(tower, str(weights_path))
    acc = accuracy(loaded, tokens, args.eval_seed, args.eval_scenes, size)
    aucs = saliency_aucs(config_path, weights_path, args.eval_seed, 256, size, CONFIG["vision_cfg"]["layers"])
    print(f"held-out accuracy {acc:.4f} on {args.eval_scenes} scenes of set {args.eval_seed}; "
          f"training {train_s:.0f} s; saliency AUC by block {[round(a, 3) for a in aucs]}")

    sums = "".join(f"{sha256(p)}  {p.name}\n" for p in (config_path, weights_path))
    (out / "SHA256SUMS").write_text(sums)
    command = "python bench/train_scene_tower.py" + "".join(f" {a}" for a in sys.argv[1:])
    (out / "README.md").write_text(readme(args, command, acc, aucs, train_s, weights_path, sums))
    print(f"wrote {out}")


def readme(args, command: str, acc: float, aucs: list[float], train_s: float, weights: Path, sums: str) -> str:
    v = CONFIG["vision_cfg"]
    blocks = ", ".join(f"{i}: {a:.3f}" for i, a in enumerate(aucs))
    return f"""# scene-vit: a small open_clip CLIP trained on synthetic scenes

A ViT ({v['image_size']} px, patch {v['patch_size']}, width {v['width']}, {v['layers']} blocks) whose CLS
attention has something to find: it was trained to tell the 12 classes of
`stages.samples.scenes` (3 shapes x 4 colours on grey clutter) apart, contrastively against the
captions "a photo of a <colour> <shape>" (open_clip's tokenizer; the text tower is 1 block of
width 16). Used by the saliency tests and `bench/saliency.py`.

- `{NAME}.json`: open_clip model config with its `preprocess_cfg` (mean {list(MEAN)}, std {list(STD)}).
  Load it the project's way, e.g. `stages.tower.load_encoder("{NAME}.json", "{NAME}.pt")` or
  `mergemix-pipeline generate --model {NAME}.json --pretrained {NAME}.pt`
  (`open_clip.add_model_config` refuses a config that carries `preprocess_cfg`; stages.tower registers it).
- `{NAME}.pt`: open_clip's full CLIP state dict, stored in fp16 ({weights.stat().st_size / 1e6:.1f} MB); open_clip's
  loader (`create_model(..., pretrained=PATH, weights_only=True)`, strict) copies it into the fp32 model.

Made by (from the repository root, on {machine()["cpu"]}, {machine()["cores"]} cores shared with other work,
torch {torch.__version__}):

    {command}

- torch seed {args.seed}; training scenes: set {args.data_seed}, scenes 0..{args.steps * args.batch - 1}
  ({args.steps} steps of batch {args.batch}, AdamW lr {args.lr:g} with {args.warmup} warm-up steps and
  cosine decay, weight decay {args.weight_decay:g}, torch threads: {args.threads}, deterministic algorithms).
- Training time: {train_s:.0f} s on one thread (the machine was shared: an idle one is faster).
- Held-out accuracy (zero-shot over the 12 captions, the checkpoint as loaded back): **{acc:.4f}**
  on {args.eval_scenes} scenes of set {args.eval_seed}.
- Saliency AUC (CLS attention vs object patches, un-merged, mean over 256 scenes of set
  {args.eval_seed}) by block: {blocks}. `bench/saliency.py` measures it through the pipeline.

Held-out sets used elsewhere must avoid set {args.data_seed}. The same command on another machine
(other CPU kernels) may give other bytes; on this one it gives these:

```
{sums}```
"""


if __name__ == "__main__":
    main()
