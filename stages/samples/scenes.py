"""Synthetic scenes with ground truth: one coloured shape on grey clutter, with its exact mask.

12 classes (3 shapes x 4 colours). The background is grey with a smooth texture, grey
distractor marks and per-pixel noise everywhere (so no two patches tie exactly and the
scene is not trivially flat). The object's mask is drawn by the same PIL call as the
object itself, so it is pixel-exact. Everything is achromatic except the object, whose
colour stays within NOISE of its nominal value: the object can be told from the clutter
by colour alone (tests/test_scenes.py checks the masks that way).

Scene `i` of seed `s` comes from its own generator (numpy's `default_rng([s, i])`), so a
scene does not depend on how many are written, and different seeds give disjoint sets.
Torch-free: PIL and numpy only.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
# Saturated colours, far from each other and from any grey (at least ~65 levels in one channel).
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 80, 230), "yellow": (230, 200, 40)}
CLASSES = tuple(f"{colour} {shape}" for shape in SHAPES for colour in COLOURS)  # index = class id
NOISE = 8  # per-pixel noise: uniform integers in [-NOISE, NOISE], per channel
SIDE = (0.3, 0.55)  # object side as a share of the image side
ROWS, COLUMNS = ("top", "middle", "bottom"), ("left", "centre", "right")
LAYOUTS = ("llava", "folder")


@dataclass(frozen=True)
class Scene:
    image: np.ndarray  # (size, size, 3) uint8
    mask: np.ndarray  # (size, size) bool: the object's pixels
    shape: str
    colour: str
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 of the mask's pixels, x1/y1 exclusive

    @property
    def label(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def class_index(self) -> int:
        return CLASSES.index(self.label)

    @property
    def position(self) -> str:
        """Where the bbox centre falls in a 3x3 grid: "top left", ..., "centre", ..., "bottom right"."""
        size = self.mask.shape[1], self.mask.shape[0]
        x0, y0, x1, y1 = self.bbox
        col = min(int(3 * (x0 + x1) / 2 / size[0]), 2)
        row = min(int(3 * (y0 + y1) / 2 / size[1]), 2)
        return "centre" if (row, col) == (1, 1) else f"{ROWS[row]} {COLUMNS[col]}"


def draw_scene(rng: np.random.Generator, size: int = 112, clutter: bool = True) -> Scene:
    """One scene. Every random draw happens whatever `clutter` says, so clutter=False renders
    the same object on a flat black background without noise (for checking masks)."""
    shape = SHAPES[rng.integers(len(SHAPES))]
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    side = int(rng.integers(int(SIDE[0] * size), int(SIDE[1] * size) + 1))
    x0, y0 = (int(v) for v in rng.integers(0, size - side + 1, size=2))
    background = _background(rng, size)
    noise = rng.integers(-NOISE, NOISE + 1, size=(size, size, 3))

    img = Image.fromarray(background if clutter else np.zeros((size, size, 3), np.uint8))
    mask = Image.new("L", (size, size), 0)
    # The same call draws the object and its mask, so the two cover exactly the same pixels.
    for target, fill in ((ImageDraw.Draw(img), COLOURS[colour]), (ImageDraw.Draw(mask), 255)):
        _draw_shape(target, shape, x0, y0, side, fill)
    pixels = np.asarray(img, dtype=np.int16)
    if clutter:
        pixels = np.clip(pixels + noise, 0, 255)
    mask_arr = np.asarray(mask) > 0
    ys, xs = np.nonzero(mask_arr)
    bbox = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    return Scene(pixels.astype(np.uint8), mask_arr, shape, colour, bbox)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, x0: int, y0: int, side: int, fill) -> None:
    x1, y1 = x0 + side - 1, y0 + side - 1  # PIL's boxes include their last pixel
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    else:  # an upright triangle
        draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=fill)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Grey clutter: a base level, a smooth texture and grey marks (lines, boxes, blobs)."""
    base = rng.uniform(70, 180)
    coarse = rng.normal(0, 1, size=(5, 5)).astype(np.float32)
    texture = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BILINEAR))
    grey = np.clip(base + 20 * texture, 25, 230).astype(np.uint8)
    img = Image.fromarray(grey)  # mode L
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(4, 9))):
        kind = rng.integers(3)
        level = int(rng.integers(25, 231))
        x, y = (float(v) for v in rng.uniform(0, size, size=2))
        w, h = (float(v) for v in rng.uniform(0.04, 0.2, size=2) * size)
        if kind == 0:
            draw.line((x, y, x + w * rng.choice((-1, 1)), y + h * rng.choice((-1, 1))), fill=level,
                      width=int(rng.integers(1, 4)))
        elif kind == 1:
            draw.rectangle((x, y, x + w, y + h), outline=level, width=int(rng.integers(1, 3)))
        else:
            draw.ellipse((x, y, x + w, y + h), fill=level)
    return np.repeat(np.asarray(img)[..., None], 3, axis=2)


def scene(seed: int, index: int, size: int = 112, clutter: bool = True) -> Scene:
    """Scene `index` of the set `seed`."""
    return draw_scene(np.random.default_rng([seed, index]), size, clutter)


def conversations(s: Scene) -> list[dict]:
    """LLaVA-format questions about the object: its colour, its shape, where it is."""
    turns = [
        ("<image>\nWhat colour is the shape in the picture?", f"It is {s.colour}."),
        ("What shape is it?", f"A {s.shape}."),
        (f"Where in the picture is the {s.label}?", "In the centre." if s.position == "centre" else f"In the {s.position}."),
    ]
    return [{"from": who, "value": text} for q, a in turns for who, text in (("human", q), ("gpt", a))]


def write_scenes(directory: str | Path, n: int, seed: int, size: int = 112, layout: str = "llava") -> Path:
    """Write n scenes with their masks and ground truth; returns the path to give the pipeline.

    layout "llava": DIR/llava.json ({id, image, conversations}) and DIR/images/ID.png;
    layout "folder": DIR/images/<label with _>/ID.png, class subfolders as `--folder-labels`
    reads them (returns DIR/images). Both: DIR/masks/ID.png (255 = object; outside the image
    folder, so the pipeline never reads a mask as an input) and DIR/scenes.json (id, image,
    mask, label, shape, colour, bbox, position, class_index, size, seed, index).
    PNG throughout: lossless, so the pixels are exactly the generated ones."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    root = Path(directory)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    records, rows = [], []
    for i in range(n):
        s = scene(seed, i, size)
        sid = f"scene-{seed}-{i:05d}"
        folder = "images" if layout == "llava" else f"images/{s.label.replace(' ', '_')}"
        image, mask = f"{folder}/{sid}.png", f"masks/{sid}.png"
        (root / folder).mkdir(parents=True, exist_ok=True)
        Image.fromarray(s.image).save(root / image)
        Image.fromarray(s.mask.astype(np.uint8) * 255).save(root / mask)
        records.append({"id": sid, "image": image, "mask": mask, "label": s.label, "shape": s.shape,
                        "colour": s.colour, "bbox": list(s.bbox), "position": s.position,
                        "class_index": s.class_index, "size": size, "seed": seed, "index": i})
        rows.append({"id": sid, "image": image, "conversations": conversations(s)})
    (root / "scenes.json").write_text(json.dumps(records, indent=1))
    if layout == "folder":
        return root / "images"
    path = root / "llava.json"
    path.write_text(json.dumps(rows, indent=1))
    return path


def read_mask(path: str | Path) -> np.ndarray:
    """A mask PNG written by write_scenes -> (H, W) bool."""
    return np.asarray(Image.open(path).convert("L")) > 127
