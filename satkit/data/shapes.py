"""Built-in synthetic "shapes" captioning dataset: coloured shapes on a noisy grey background.

Why: it trains in minutes on a CPU, and every caption word that names an object has a known box, so
one can check where the attention looks (Xu et al. 2015, Sec. 5.4 shows such maps qualitatively only).

Each image is a pure function of (seed, index): `generate_image` seeds its own
`numpy.random.default_rng([seed, index])`, so images can be made in any order and in parallel.
Every caption is true of its image without near-ties: words such as "left of" or "from top to bottom"
are only used when the boxes involved are separated by at least `MIN_GAP` of the image side.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["COLORS", "SHAPES", "COUNT_WORDS", "MAX_OBJECTS", "MIN_GAP", "MIN_IMAGE_SIZE", "DEFAULT_IMAGE_SIZE",
           "generate_image", "shape_filename"]

# Colours are far apart in RGB from each other and from the grey background (every colour has a
# channel <= 60 while the background's channels stay >= 124), so a pixel's colour names its object.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 90, 230),
    "yellow": (240, 220, 40),
    "purple": (150, 60, 190),
    "orange": (245, 130, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
COUNT_WORDS: tuple[str, ...] = ("one", "two", "three", "four")
MAX_OBJECTS = 4
MIN_SIZE, MAX_SIZE = 0.16, 0.30  # object side as a fraction of the image side
MIN_GAP = 0.06  # boxes are placed at least this far apart (fraction of the side) on x or on y
NOISE = 18  # per-pixel noise, uniform in [-NOISE, NOISE] per channel
MIN_IMAGE_SIZE = 32  # smallest image side in pixels (the smallest objects are then 5 px across)
DEFAULT_IMAGE_SIZE = 96  # the side create_input_files.py packs shapes at by default

Word = tuple[str, int]  # (token, index of the object it names or -1)


def shape_filename(index: int) -> str:
    """Name stored in the packed `filenames` dataset for shapes image `index`."""
    return f"shapes_{index:06d}.png"


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, x0: int, y0: int, side: int) -> None:
    x1, y1 = x0 + side - 1, y0 + side - 1  # inclusive pixel corners
    xc, yc = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=255)
    elif shape == "square":
        draw.rectangle([x0, y0, x1, y1], fill=255)
    elif shape == "triangle":
        draw.polygon([(x0, y1), (x1, y1), (xc, y0)], fill=255)
    elif shape == "diamond":
        draw.polygon([(xc, y0), (x1, yc), (xc, y1), (x0, yc)], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r} (valid: {', '.join(SHAPES)})")


def _layout(rng: np.random.Generator, size: int) -> list[tuple[int, int, int]]:
    """Sample 1-4 non-overlapping squares (x0, y0, side) in pixels, boxes >= MIN_GAP apart.

    Rejection sampling; a layout that does not fit after a few tries is redrawn, and after many
    redraws one object fewer is asked for, so this always terminates (and stays deterministic).
    """
    gap = math.ceil(MIN_GAP * size)
    want = int(rng.integers(1, MAX_OBJECTS + 1))
    for attempt in range(200):
        num_objects = max(1, want - attempt // 50)
        boxes: list[tuple[int, int, int]] = []
        for _ in range(num_objects):
            side = int(round(rng.uniform(MIN_SIZE, MAX_SIZE) * size))
            for _ in range(30):
                x0 = int(rng.integers(1, size - side))
                y0 = int(rng.integers(1, size - side))
                if all(
                    x0 + side + gap <= bx or bx + bs + gap <= x0 or y0 + side + gap <= by or by + bs + gap <= y0
                    for bx, by, bs in boxes
                ):
                    boxes.append((x0, y0, side))
                    break
            else:
                break
        if len(boxes) == num_objects:
            return boxes
    raise RuntimeError("shapes layout failed")  # unreachable: a single object always fits


def _article(color: str) -> str:
    return "an" if color[0] in "aeiou" else "a"


def _phrase(objects: list[dict[str, Any]], i: int) -> list[Word]:
    return [(_article(objects[i]["color"]), -1), (objects[i]["color"], i), (objects[i]["shape"], i)]


def _listing(objects: list[dict[str, Any]], order: list[int]) -> list[Word]:
    """'a X', 'a X and a Y', 'a X a Y and a Z' (plain words, no commas; "an" before a vowel)."""
    words: list[Word] = []
    for n, i in enumerate(order):
        if n == len(order) - 1 and n > 0:
            words.append(("and", -1))
        words += _phrase(objects, i)
    return words


def _captions(objects: list[dict[str, Any]], pixel_boxes: list[tuple[int, int, int, int]], size: int,
              rng: np.random.Generator) -> list[list[Word]]:
    """All captions of one image as (word, object index) lists; see the module docstring."""
    num_objects = len(objects)
    gap = math.ceil(MIN_GAP * size)
    # Plain listings use an order that depends on what the objects are, never on where they are,
    # so the model is never asked to resolve a near-tie in position.
    canonical = sorted(range(num_objects), key=lambda i: (SHAPES.index(objects[i]["shape"]),
                                                          list(COLORS).index(objects[i]["color"])))
    listing = _listing(objects, canonical)
    count = [(COUNT_WORDS[num_objects - 1], -1), ("shape" if num_objects == 1 else "shapes", -1)]
    out = [
        listing,
        count + listing,
        [("there", -1), ("is" if num_objects == 1 else "are", -1)] + count + listing,
        listing + [("on", -1), ("a", -1), ("grey", -1), ("background", -1)],
    ]
    if num_objects == 1:
        return out + [[("a", -1), ("single", -1), (objects[0]["color"], 0), (objects[0]["shape"], 0)]]

    def left_of(a: int, b: int) -> bool:
        return pixel_boxes[a][2] + gap <= pixel_boxes[b][0]

    def above(a: int, b: int) -> bool:
        return pixel_boxes[a][3] + gap <= pixel_boxes[b][1]

    orderings = ((("from", "left", "to", "right"), 0, left_of), (("from", "top", "to", "bottom"), 1, above))
    for words, axis, before in orderings:  # only when every consecutive pair is clearly separated
        order = sorted(range(num_objects), key=lambda i: pixel_boxes[i][axis])
        if all(before(a, b) for a, b in zip(order, order[1:])):
            out.append([(w, -1) for w in words] + _listing(objects, order))
    for before, forward, backward in ((left_of, ("to", "the", "left", "of"), ("to", "the", "right", "of")),
                                      (above, ("above",), ("below",))):
        candidates = []
        for a in range(num_objects):
            for b in range(num_objects):
                if a != b and before(a, b):
                    candidates.append(_phrase(objects, a) + [(w, -1) for w in forward] + _phrase(objects, b))
                    candidates.append(_phrase(objects, b) + [(w, -1) for w in backward] + _phrase(objects, a))
        for j in rng.permutation(len(candidates))[:2]:
            out.append(candidates[j])
    return out


def generate_image(
    seed: int, index: int, image_size: int = DEFAULT_IMAGE_SIZE
) -> tuple[Image.Image, list[dict[str, Any]], list[list[str]], list[list[int]]]:
    """Draw shapes image `index` of the dataset with this `seed`, natively at `image_size` pixels.

    Returns:
        image: RGB PIL image (image_size x image_size).
        objects: one dict per object, {"color", "shape", "box": [x0, y0, x1, y1]} with the tight box of
            the drawn pixels as fractions of the side (x1, y1 exclusive, i.e. pixel columns x0*S..x1*S-1).
        captions: at least 5 distinct captions, each a list of lower-case tokens.
        word_objects: per caption, per token, the index into `objects` of the object the token names
            (its colour word or shape noun), -1 for other tokens.
    """
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"shapes image size {image_size} is too small (need >= {MIN_IMAGE_SIZE} pixels)")
    rng = np.random.default_rng([seed, index])
    squares = _layout(rng, image_size)
    pairs = [(c, s) for c in COLORS for s in SHAPES]
    chosen = rng.choice(len(pairs), size=len(squares), replace=False)  # (colour, shape) unique per image

    # Background: light grey with a slight tint; objects flat; then noise over everything.
    base = rng.uniform(150, 200) + rng.uniform(-8, 8, size=3)
    canvas = np.broadcast_to(base, (image_size, image_size, 3)).astype(np.uint8)
    image = Image.fromarray(np.ascontiguousarray(canvas))
    objects, pixel_boxes = [], []
    for (x0, y0, side), pair in zip(squares, chosen):
        color, shape = pairs[int(pair)]
        mask = Image.new("L", (image_size, image_size), 0)
        _draw_shape(ImageDraw.Draw(mask), shape, x0, y0, side)
        box = mask.getbbox()  # tight (left, top, right, bottom), right/bottom exclusive
        assert box is not None
        image.paste(COLORS[color], mask=mask)
        pixel_boxes.append(box)
        objects.append({"color": color, "shape": shape, "box": [v / image_size for v in box]})
    noise = rng.integers(-NOISE, NOISE + 1, size=(image_size, image_size, 3))
    pixels = np.clip(np.asarray(image, dtype=np.int16) + noise, 0, 255).astype(np.uint8)

    captions = _captions(objects, pixel_boxes, image_size, rng)
    tokens = [[w for w, _ in c] for c in captions]
    word_objects = [[o for _, o in c] for c in captions]
    return Image.fromarray(pixels), objects, tokens, word_objects
