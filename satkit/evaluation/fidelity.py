"""Attention fidelity on the shapes dataset: does the model look at the object it names? eval.py reports it
when the split knows its objects' boxes (evaluation.fidelity_metrics)."""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Sequence

import torch


def attention_fidelity(decoded: list[dict[str, Any]], objects: dict[int, list[dict[str, Any]]]) -> dict[str, Any]:
    """Does the model look at the object it names? (shapes dataset only)

    For each generated mention "<colour> <shape>" of an object present in the image, a hit when the
    centre of the argmax attention cell lies inside the object's box at the step emitting the shape noun
    (`noun`), or at the noun or the colour step (`noun_or_colour`). `chance` is the fraction of grid
    cell centres inside the box: what uniformly random peaks would score.
    """
    from satkit.data.shapes import COLORS, SHAPES

    tallies: dict[str, list[float]] = defaultdict(lambda: [0, 0, 0, 0.0])  # mentions, noun, either, chance
    for item in decoded:
        words, alphas = item["words"], item["alphas"]  # T words, (T, g, g)
        image_objects = objects[item["index"]]
        for t in range(1, len(words)):
            colour, shape = words[t - 1], words[t]
            if colour not in COLORS or shape not in SHAPES:
                continue
            match = [o for o in image_objects if o["color"] == colour and o["shape"] == shape]
            if not match:
                continue  # a mention of an object that is not there: a caption error, not attention
            box = match[0]["box"]
            noun_hit = _peak_in_box(alphas[t], box)
            either_hit = noun_hit or _peak_in_box(alphas[t - 1], box)
            chance = _fraction_of_cells_in_box(alphas.shape[-1], box)
            for key in ("all", f"{len(image_objects)}_objects"):
                tally = tallies[key]
                tally[0] += 1
                tally[1] += noun_hit
                tally[2] += either_hit
                tally[3] += chance
    result: dict[str, Any] = {}
    for key, (mentions, noun, either, chance) in sorted(tallies.items()):
        result[key] = {
            "mentions": int(mentions),
            "hit_noun": noun / mentions,
            "hit_noun_or_colour": either / mentions,
            "chance": chance / mentions,
        }
    return result


def _cell_centres(grid: int) -> torch.Tensor:
    centres = (torch.arange(grid, dtype=torch.float32) + 0.5) / grid
    ys, xs = torch.meshgrid(centres, centres, indexing="ij")
    return torch.stack([xs.flatten(), ys.flatten()], dim=1)  # (g*g, 2) as (x, y) fractions


def _in_box(points: torch.Tensor, box: Sequence[float]) -> torch.Tensor:
    x0, y0, x1, y1 = box
    return (points[:, 0] >= x0) & (points[:, 0] <= x1) & (points[:, 1] >= y0) & (points[:, 1] <= y1)


def _peak_in_box(alpha: torch.Tensor, box: Sequence[float]) -> bool:
    grid = alpha.shape[-1]
    peak = int(alpha.flatten().argmax())
    return bool(_in_box(_cell_centres(grid)[peak : peak + 1], box)[0])


def _fraction_of_cells_in_box(grid: int, box: Sequence[float]) -> float:
    return float(_in_box(_cell_centres(grid), box).float().mean())
