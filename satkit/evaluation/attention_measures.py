"""Where the model looks, in numbers: how concentrated alpha_t is at each generated word, and whether the
words depend on the places it looks (a deletion test). eval.py reports both on any split (real photos
included, where no boxes say where objects are); the shapes set's box hit rate (fidelity.py) checks them.

Per word, over the L = g*g cells of alpha_t:
- `peak_x_uniform`: max_i alpha_ti / (1/L); 1 is flat attention, L all weight on one cell;
- `half_mass_area`: the smallest share of the cells that holds half of alpha_t's mass (uniform: ~1/2,
  one-hot: 1/L);
- `entropy`: H(alpha_t) / log L (1 flat, 0 one cell);
- `tv_previous`: total variation 1/2 sum_i |alpha_ti - alpha_(t-1)i| from the previous word (0 a fixed gaze).

The deletion test greys out (the ImageNet mean, 0 after normalisation) the pixels under the cells that hold
half of a content word's alpha mass, and re-scores that word's log-probability on the same caption prefix
(teacher-forced), against greying an equal number of random cells. A model that looks where it speaks loses
more when what it looked at is gone: the ratio of the median drops (attended / random) is then above 1.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from satkit.infra.progress import progress_bar

# Words whose log-probability is not expected to depend on a place in the image (the deletion test skips
# them): articles, prepositions, conjunctions, pronouns and auxiliaries of English captions.
STOP_WORDS = frozenset(
    "a an the of in on at with and or is are was were be being been to his her its their them they he she it "
    "this that these those some while for by from into onto up down out over under near next as there here "
    "who which what one each other another has have very".split()
)
SKIPPED_TOKENS = frozenset({"<unk>", "<pad>", "<start>", "<end>"})
PER_WORD_KEYS = ("peak_x_uniform", "half_mass_area", "entropy", "tv_previous")


def half_mass_cells(alpha: torch.Tensor) -> torch.Tensor:
    """How many of the L cells it takes, largest first, to hold half of each row's mass: (..., L) -> (...)."""
    ordered = alpha.flatten(-2) if alpha.dim() >= 3 else alpha
    ordered = ordered.sort(dim=-1, descending=True).values.double()
    mass = ordered.cumsum(dim=-1) / ordered.sum(dim=-1, keepdim=True)
    return (mass < 0.5 - 1e-9).sum(dim=-1) + 1  # the first k whose cumulative mass reaches one half


def word_measures(alphas: torch.Tensor) -> dict[str, np.ndarray]:
    """The per-word measures of one caption's alphas (T, g, g) or (T, L): arrays of T values (T-1 for tv)."""
    flat = alphas.reshape(alphas.size(0), -1).double()  # (T, L)
    flat = flat / flat.sum(dim=1, keepdim=True)
    num_locations = flat.size(1)
    entropy = -(flat * flat.clamp_min(1e-300).log()).sum(dim=1)
    return {
        "peak_x_uniform": (flat.max(dim=1).values * num_locations).numpy(),
        "half_mass_area": (half_mass_cells(flat).double() / num_locations).numpy(),
        "entropy": (entropy / math.log(num_locations)).numpy() if num_locations > 1 else np.zeros(len(flat)),
        "tv_previous": (0.5 * (flat[1:] - flat[:-1]).abs().sum(dim=1)).numpy(),
    }


def summarise_attention(decoded: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Medians and 90th percentiles of the per-word measures over every generated word of `decoded` (items
    with "alphas" (T, g, g), as decoding.decode_split returns), and the distinct arg-max cells per caption."""
    values: dict[str, list[np.ndarray]] = {key: [] for key in PER_WORD_KEYS}
    distinct_peaks, words = [], 0
    for item in decoded:
        alphas = torch.as_tensor(item["alphas"])
        if alphas.size(0) == 0:
            continue
        for key, array in word_measures(alphas).items():
            values[key].append(array)
        distinct_peaks.append(len(set(alphas.flatten(1).argmax(dim=1).tolist())))
        words += alphas.size(0)
    summary: dict[str, Any] = {"attention_words": words}
    for key, arrays in values.items():
        joined = np.concatenate(arrays) if arrays else np.zeros(0)
        summary[f"attention_{key}_median"] = float(np.median(joined)) if joined.size else float("nan")
        summary[f"attention_{key}_p90"] = float(np.percentile(joined, 90)) if joined.size else float("nan")
    summary["attention_distinct_peaks_median"] = float(np.median(distinct_peaks)) if distinct_peaks else float("nan")
    return summary


def content_positions(words: Sequence[str]) -> list[int]:
    """Positions of the words the deletion test scores: not stop words, not special tokens."""
    return [t for t, w in enumerate(words) if w not in STOP_WORDS and w not in SKIPPED_TOKENS]


def grey_cells(image: torch.Tensor, cells: torch.Tensor, grid: int) -> torch.Tensor:
    """A copy of the normalised image (3, H, W) with the pixels under the given cells (flat ids in a grid x grid
    layout over the whole image) set to 0, the ImageNet mean colour."""
    out = image.clone()
    height, width = image.shape[-2:]
    for cell in cells.tolist():
        row, col = divmod(int(cell), grid)
        y0, y1 = round(row * height / grid), round((row + 1) * height / grid)
        x0, x1 = round(col * width / grid), round((col + 1) * width / grid)
        out[:, y0:y1, x0:x1] = 0.0
    return out


@torch.no_grad()
def deletion_drops(model: torch.nn.Module, image: torch.Tensor, tokens: Sequence[int], alphas: torch.Tensor,
                   positions: Sequence[int], word_map: dict[str, int], generator: torch.Generator
                   ) -> list[tuple[float, float]]:
    """(attended drop, random drop) of log p(word) for each position of one caption.

    image: (3, H, W) normalised pixels; tokens: the caption's word ids without <start>/<end>; alphas: the
    attention (T, g, g) it was generated with. All greyed copies go through the encoder in one batch and are
    teacher-forced with the same caption, so each word is scored on the prefix the model generated.
    """
    if not positions:
        return []
    grid = alphas.shape[-1]
    num_locations = grid * grid
    variants = [image]
    for t in positions:
        flat = alphas[t].reshape(-1)
        k = int(half_mass_cells(flat[None])[0])
        attended = flat.argsort(descending=True)[:k]
        random_cells = torch.randperm(num_locations, generator=generator)[:k]
        variants += [grey_cells(image, attended, grid), grey_cells(image, random_cells, grid)]
    images = torch.stack(variants).to(next(model.parameters()).device)  # (1 + 2W, 3, H, W)
    ids = [word_map["<start>"], *tokens, word_map["<end>"]]
    captions = torch.tensor(ids, device=images.device).expand(images.size(0), 1, len(ids))  # (B, 1, T+2)
    caplens = torch.full((images.size(0), 1), len(ids))
    logits = model(images, captions.contiguous(), caplens)["logits"]  # (B, T+1, V)
    log_probs = F.log_softmax(logits.float(), dim=-1)
    drops = []
    for j, t in enumerate(positions):
        word = tokens[t]
        base = log_probs[0, t, word]
        drops.append((float(base - log_probs[1 + 2 * j, t, word]), float(base - log_probs[2 + 2 * j, t, word])))
    return drops


def deletion_ratio(drops: Sequence[tuple[float, float]]) -> dict[str, Any]:
    """The deletion test's summary: median drops, their ratio (attended / random) and the share of words that
    lose more from their attended cells. A model that ignores the image loses nothing either way: ratio 1."""
    if not drops:
        return {"deletion_words": 0}
    attended, random_drops = np.array(drops).T
    median_attended, median_random = float(np.median(attended)), float(np.median(random_drops))
    ratio: float | None = None  # undefined when random cells cost nothing at the median but attended ones do
    if abs(median_attended) < 1e-9 and abs(median_random) < 1e-9:
        ratio = 1.0
    elif median_random > 1e-9:
        ratio = median_attended / median_random
    return {"deletion_words": len(drops), "deletion_drop_attended_median": median_attended,
            "deletion_drop_random_median": median_random, "deletion_ratio": ratio,
            "deletion_attended_wins": float(np.mean(attended > random_drops))}


def deletion_test(model: torch.nn.Module, decoded: Sequence[dict[str, Any]], images: Any,
                  word_map: dict[str, int], seed: int = 0, progress: bool = False) -> dict[str, Any]:
    """The deletion test over decoded captions: `images(index)` gives an item's normalised pixels (3, H, W).
    Runs the model in eval mode with teacher forcing; the random cells come from a generator seeded `seed`."""
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    drops: list[tuple[float, float]] = []
    try:
        for item in progress_bar(decoded, desc="deletion test", disable=not progress):
            positions = content_positions(item["words"])
            drops += deletion_drops(model, images(item["index"]), item["tokens"], torch.as_tensor(item["alphas"]),
                                    positions, word_map, generator)
    finally:
        model.train(was_training)
    return deletion_ratio(drops)
