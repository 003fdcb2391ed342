"""A small LLaVA-format demo set: generated images of coloured shapes, with questions whose
answers depend on the image, so the quickstart (and the training stage) run offline."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40),
           "purple": (140, 60, 180), "orange": (240, 140, 30)}
SHAPES = ("square", "circle", "triangle")


def draw_sample(rng: np.random.Generator) -> tuple[Image.Image, str, str]:
    """One image with a coloured shape on a textured background, its shape and colour."""
    w, h = int(rng.integers(160, 320)), int(rng.integers(160, 320))
    background = rng.integers(0, 256, size=3)
    noise = rng.integers(-25, 26, size=(h, w, 3))
    img = Image.fromarray(np.clip(background + noise, 0, 255).astype(np.uint8))
    colour = str(rng.choice(list(COLOURS)))
    shape = str(rng.choice(SHAPES))
    side = int(min(w, h) * rng.uniform(0.3, 0.6))
    x0, y0 = int(rng.integers(0, w - side)), int(rng.integers(0, h - side))
    box = (x0, y0, x0 + side, y0 + side)
    draw = ImageDraw.Draw(img)
    if shape == "square":
        draw.rectangle(box, fill=COLOURS[colour])
    elif shape == "circle":
        draw.ellipse(box, fill=COLOURS[colour])
    else:
        draw.polygon([(x0, y0 + side), (x0 + side, y0 + side), (x0 + side // 2, y0)], fill=COLOURS[colour])
    return img, shape, colour


def write_sample_data(directory: str | Path, n: int = 64, seed: int = 0) -> Path:
    """Write DIR/images/*.jpg and DIR/llava.json; returns the JSON path. One text-only row
    is included, as in real LLaVA data (it becomes a `skipped` row)."""
    root = Path(directory)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        img, shape, colour = draw_sample(rng)
        name = f"images/{i:05d}.jpg"
        img.save(root / name, quality=92)
        rows.append({
            "id": f"demo-{i:05d}",
            "image": name,
            "conversations": [
                {"from": "human", "value": f"<image>\nWhat colour is the {shape} in the picture?"},
                {"from": "gpt", "value": f"The {shape} is {colour}."},
            ],
        })
    rows.append({"id": "demo-text-only", "conversations": [
        {"from": "human", "value": "Name a primary colour."}, {"from": "gpt", "value": "Red."}]})
    path = root / "llava.json"
    path.write_text(json.dumps(rows, indent=1))
    return path
