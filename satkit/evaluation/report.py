"""eval.py --report DIR: one static HTML page to browse a split's results and find the bad ones.

    DIR/index.html         corpus metrics and collapse diagnostics at the top, then one row per image,
                           worst first (by its own CIDEr): thumbnail, generated caption, references,
                           its per-image scores (CIDEr, BLEU-4, any registered metric's), and the
                           attention GIF (for the `gif_limit` worst images)
    DIR/images/N.jpg       thumbnails (N: the image's index in the split)
    DIR/attention/N.gif    caption.py's attention panels, animated

No server, no CDN, no external file: it opens from disk, offline. index.html is written last (and an
old one removed first), so an interrupted run never leaves a page that looks complete.
"""
from __future__ import annotations

import html
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from satkit.infra.filesafety import atomic_write, atomic_write_text
from satkit.evaluation.scoring import COLLAPSE_DISTINCT, DIVERSITY_KEYS, per_image_keys, result_keys

__all__ = ["write_report", "THUMBNAIL_SIZE"]

THUMBNAIL_SIZE = 160  # px, the longer side
DIAGNOSTICS = (*DIVERSITY_KEYS, "CIDEr_over_shuffled", "unfinished")
ATTENTION_KEYS = (  # attention_measures.py: where the model looks, and whether its words depend on it
    "attention_words", "attention_half_mass_area_median", "attention_half_mass_area_p90",
    "attention_peak_x_uniform_median", "attention_peak_x_uniform_p90", "attention_entropy_median",
    "attention_entropy_p90", "attention_tv_previous_median", "attention_tv_previous_p90",
    "attention_distinct_peaks_median", "deletion_words", "deletion_ratio", "deletion_attended_wins",
)
ORDER_BY = "CIDEr"  # rows are sorted worst first by this per-image score, its column first

_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; }
td, th { border-bottom: 1px solid #ddd; padding: 6px 10px; vertical-align: top; text-align: left; }
.metrics td { padding: 2px 12px; }
.num { text-align: right; font-variant-numeric: tabular-nums; }
.caption { font-weight: bold; }
.refs { margin: 0; padding-left: 1.2em; color: #555; }
.warn { color: #a00; font-weight: bold; }
.id { color: #777; font-size: 85%; }
.top { display: flex; flex-wrap: wrap; gap: 3em; }
h2 { font-size: 120%; }
"""

# Sets data-images-loaded="loaded/total" on <body> once the page has loaded: a check for people and tests.
_SCRIPT = """
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var loaded = images.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute("data-images-loaded", loaded + "/" + images.length);
});
"""


def _format(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else html.escape(str(value))


def _metrics_table(metrics: dict[str, Any], keys: Sequence[str]) -> str:
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td class='num'>{_format(metrics[k])}</td></tr>"
                   for k in keys if k in metrics)
    return f"<table class='metrics'>{rows}</table>"


def _per_image_columns(per_image: dict[int, dict[str, float]]) -> list[str]:
    """The registered per-image scores present, ORDER_BY first (the one the rows are sorted by)."""
    present = {key for scores in per_image.values() for key in scores}
    keys = [key for key in per_image_keys() if key in present]
    return sorted(keys, key=lambda key: key != ORDER_BY)


def write_report(
    report_dir: str | Path,
    decoded: list[dict[str, Any]],
    dataset: Any,
    metrics: dict[str, Any],
    per_image: dict[int, dict[str, float]],
    *,
    stochastic: bool = False,
    gif_limit: int = 50,
    source: str = "",
) -> Path:
    """Write DIR/index.html and its images for `decoded` (decoding.decode_split's output on `dataset`, a
    CaptionDataset) with eval's corpus `metrics` and `per_image` scores; return the index.html path.
    `source` (e.g. "CHECKPOINT on DATA_FOLDER") is shown under the title."""
    report_dir = Path(report_dir)
    index_html = report_dir / "index.html"
    index_html.unlink(missing_ok=True)  # a page only once this run's images are all there
    for sub in ("images", "attention"):
        (report_dir / sub).mkdir(parents=True, exist_ok=True)

    columns = _per_image_columns(per_image)

    def worst_first(d: dict[str, Any]) -> tuple[float, int]:
        return per_image.get(d["index"], {}).get(columns[0], float("nan")) if columns else 0.0, d["index"]

    ordered = sorted(decoded, key=worst_first)
    rows = [_image_row(report_dir, rank, d, dataset, [per_image.get(d["index"], {}).get(k, "") for k in columns],
                       draw=rank <= gif_limit, stochastic=stochastic) for rank, d in enumerate(ordered, 1)]
    title = f"{metrics.get('split', '')} split, beam {metrics.get('beam_size', '')}, {len(decoded)} images"
    headers = "".join(f"<th>{html.escape(key)}</th>" for key in columns)
    table = f"""<h2>Per image{', worst ' + html.escape(columns[0]) + ' first' if columns else ''}</h2>
<p>Attention is drawn for the {min(gif_limit, len(ordered))} worst images.</p>
<table><tr><th>#</th><th>image</th><th>caption and references</th>{headers}
<th>attention</th></tr>
{chr(10).join(rows)}
</table>"""
    atomic_write_text(index_html, _page(title, source, metrics, table))
    return index_html


def _image_row(report_dir: Path, rank: int, d: dict[str, Any], dataset: Any, scores: list[Any], *, draw: bool,
               stochastic: bool) -> str:
    """One image's table row; writes its thumbnail and, when `draw`, its attention GIF."""
    # figures loads matplotlib: only when a row is drawn, and looked up here so tests can replace its writers.
    from satkit.figures import AttentionMaps, render_panels, save_attention_gif

    i = d["index"]
    image = Image.fromarray(np.ascontiguousarray(dataset.image(i).transpose(1, 2, 0)))  # (S, S, 3)
    thumbnail = image.copy()
    thumbnail.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
    atomic_write(report_dir / "images" / f"{i}.jpg", lambda f: thumbnail.save(f, format="JPEG", quality=85))
    lazy = "" if draw else " loading='lazy'"  # thousands of rows: load thumbnails as they scroll in
    thumb_cell = (f"<img src='images/{i}.jpg' alt='image {i}' width='{thumbnail.width}' "
                  f"height='{thumbnail.height}'{lazy}>")
    if draw and d["words"]:
        maps = AttentionMaps(image=image, words=list(d["words"]), alphas=d["alphas"], betas=d["betas"],
                             stochastic=stochastic)
        save_attention_gif(report_dir / "attention" / f"{i}.gif", render_panels(maps))
        attention_cell = f"<img src='attention/{i}.gif' alt='attention for image {i}' class='gif'>"
    else:
        attention_cell = "<span class='id'>(not drawn: beyond --report-limit)</span>" if d["words"] else ""
    refs = "".join(f"<li>{html.escape(r)}</li>" for r in d["references"])
    score_cells = "".join(f"<td class='num'>{_format(score)}</td>" for score in scores)
    return (f"<tr><td class='num'>{rank}</td><td>{thumb_cell}<div class='id'>{html.escape(str(dataset.image_id(i)))}"
            f" (#{i})</div></td><td><div class='caption'>{html.escape(d['caption']) or '<i>(empty)</i>'}</div>"
            f"<ol class='refs'>{refs}</ol></td>{score_cells}<td>{attention_cell}</td></tr>")


def _page(title: str, source: str, metrics: dict[str, Any], table: str) -> str:
    """index.html: the corpus metrics (every registered metric's keys present), diagnostics, then `table`."""
    corpus_keys = [k for k in result_keys() if k in metrics]
    shuffled_keys = [f"shuffled_{k}" for k in result_keys() if f"shuffled_{k}" in metrics]
    collapsed = metrics.get("distinct_captions", 1.0) < COLLAPSE_DISTINCT
    warning = (f"<p class='warn'>Only {metrics['distinct_captions']:.0%} of the captions are distinct: the model "
               "gives (nearly) the same caption to every image.</p>" if collapsed else "")
    shuffled = (f"<div><h2>Against shuffled references</h2>{_metrics_table(metrics, shuffled_keys)}</div>"
                if shuffled_keys else "")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Captions: {html.escape(title)}</title>
<link rel="icon" href="data:,"><style>{_STYLE}</style><script>{_SCRIPT}</script></head>
<body>
<h1>Captions: {html.escape(title)}</h1>
<p class="id">{html.escape(source)}</p>
{warning}<div class="top">
<div><h2>Corpus metrics</h2>{_metrics_table(metrics, corpus_keys)}</div>
<div><h2>Does the model use the image?</h2>{_metrics_table(metrics, DIAGNOSTICS)}</div>
<div><h2>Where does it look?</h2>{_metrics_table(metrics, ATTENTION_KEYS)}</div>
{shuffled}
</div>
{table}</body></html>
"""
