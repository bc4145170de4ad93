"""Where the model looks (satkit/evaluation/attention_measures.py): the per-word measures on hand-made alpha,
the deletion test on toy models whose words do and do not depend on a region, and eval.py's report of both."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from satkit.evaluation.attention_measures import (
    content_positions,
    deletion_ratio,
    deletion_test,
    grey_cells,
    half_mass_cells,
    summarise_attention,
    word_measures,
)

WORD_MAP = {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 3, "a": 4, "dog": 5, "on": 6, "grass": 7}


def test_uniform_and_one_hot_alpha():
    uniform = torch.full((1, 7, 7), 1 / 49)
    one_hot = torch.zeros(1, 7, 7)
    one_hot[0, 3, 4] = 1.0
    flat = word_measures(uniform)
    assert half_mass_cells(uniform)[0] == 25  # 24.5 cells of 1/49 hold half: the 25th crosses it
    assert flat["half_mass_area"][0] == pytest.approx(25 / 49)
    assert flat["peak_x_uniform"][0] == pytest.approx(1.0)
    assert flat["entropy"][0] == pytest.approx(1.0)
    sharp = word_measures(one_hot)
    assert sharp["half_mass_area"][0] == pytest.approx(1 / 49)
    assert sharp["peak_x_uniform"][0] == pytest.approx(49.0)
    assert sharp["entropy"][0] == pytest.approx(0.0, abs=1e-9)


def test_half_mass_counts_the_largest_cells_first_and_tv_follows_the_gaze():
    alpha = torch.tensor([[0.1, 0.4, 0.3, 0.2], [0.4, 0.1, 0.2, 0.3]]).view(2, 2, 2)
    assert half_mass_cells(alpha).tolist() == [2, 2]  # 0.4 + 0.3 (then 0.4 + 0.3 again, other cells)
    measures = word_measures(alpha)
    assert measures["tv_previous"].tolist() == pytest.approx([0.5 * (0.3 + 0.3 + 0.1 + 0.1)])
    assert len(measures["half_mass_area"]) == 2 and len(measures["tv_previous"]) == 1


def test_summary_is_medians_and_p90_over_every_word():
    sharp, flat = torch.zeros(3, 2, 2), torch.full((1, 2, 2), 0.25)
    sharp[:, 0, 0] = 1.0
    summary = summarise_attention([{"alphas": sharp}, {"alphas": flat}, {"alphas": torch.zeros(0, 2, 2)}])
    assert summary["attention_words"] == 4
    assert summary["attention_half_mass_area_median"] == pytest.approx(0.25)  # 3 of 4 words: one cell of 4
    assert summary["attention_half_mass_area_p90"] == pytest.approx(0.5 * 0.7 + 0.25 * 0.3)  # between 0.25 and 0.5
    assert summary["attention_peak_x_uniform_median"] == pytest.approx(4.0)
    assert summary["attention_distinct_peaks_median"] == 1.0


def test_content_words_skip_stop_words_and_special_tokens():
    assert content_positions(["a", "dog", "runs", "on", "the", "grass", "<unk>"]) == [1, 2, 5]


def test_grey_cells_covers_exactly_the_cells_pixels():
    image = torch.ones(3, 10, 10)
    out = grey_cells(image, torch.tensor([0, 3]), grid=2)  # top-left and bottom-right
    assert out[:, :5, :5].abs().sum() == 0 and out[:, 5:, 5:].abs().sum() == 0
    assert torch.all(out[:, :5, 5:] == 1) and torch.all(out[:, 5:, :5] == 1)
    assert torch.all(image == 1)  # a copy


class ToyCaptioner(nn.Module):
    """A toy captioner whose only non-zero logit is for "dog" and grows with the brightness of the image's
    top-left quarter (a little with the whole image too) with depends_on="top_left", of the whole image with
    "whole", and is constant (the image ignored) with None."""

    def __init__(self, depends_on: str | None) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(4.0))
        self.depends_on = depends_on

    def forward(self, images: torch.Tensor, captions: torch.Tensor, caplens: torch.Tensor) -> dict[str, torch.Tensor]:
        batch, steps = images.size(0), captions.size(-1) - 1
        logits = torch.zeros(batch, steps, len(WORD_MAP))
        height, width = images.shape[-2:]
        whole = images.mean((1, 2, 3))
        if self.depends_on == "top_left":
            top_left = images[:, :, : height // 2, : width // 2].mean((1, 2, 3))
            logits[:, :, WORD_MAP["dog"]] = (self.scale * top_left + 0.5 * whole)[:, None]
        elif self.depends_on == "whole":
            logits[:, :, WORD_MAP["dog"]] = self.scale * whole[:, None]
        return {"logits": logits}


def decoded_dog_caption(count: int) -> list[dict]:
    """Captions "a dog" whose alpha at "dog" puts all its mass on the top-left 2x2 cells of a 4x4 grid."""
    alphas = torch.full((2, 4, 4), 1 / 16)
    alphas[1] = 0.0
    alphas[1, :2, :2] = 0.25
    return [{"index": i, "words": ["a", "dog"], "tokens": [WORD_MAP["a"], WORD_MAP["dog"]], "alphas": alphas}
            for i in range(count)]


def test_deletion_test_finds_the_region_a_word_depends_on():
    images = {i: torch.ones(3, 16, 16) for i in range(20)}
    result = deletion_test(ToyCaptioner("top_left"), decoded_dog_caption(20), images.__getitem__, WORD_MAP, seed=0)
    assert result["deletion_words"] == 20
    # Half of "dog"'s mass is on 2 of the 4 top-left cells: greying them darkens half of the region; 2 random
    # cells of 16 miss it more often than not, and then cost only the whole image's small share.
    assert result["deletion_ratio"] > 1.5
    assert result["deletion_attended_wins"] > 0.5
    assert result["deletion_drop_attended_median"] > 0


def test_deletion_test_of_a_model_that_ignores_the_image_is_one():
    images = {i: torch.ones(3, 16, 16) for i in range(5)}
    result = deletion_test(ToyCaptioner(None), decoded_dog_caption(5), images.__getitem__, WORD_MAP, seed=0)
    assert result["deletion_words"] == 5
    assert result["deletion_ratio"] == 1.0 and result["deletion_drop_attended_median"] == 0.0
    assert deletion_ratio([]) == {"deletion_words": 0}


def test_deletion_of_a_word_that_depends_on_the_whole_image_is_about_even():
    """A word that reads the whole image: greying the attended cells costs what greying as many random ones does."""
    result = deletion_test(ToyCaptioner("whole"), decoded_dog_caption(10), {i: torch.ones(3, 16, 16) for i in range(10)}
                           .__getitem__, WORD_MAP, seed=0)
    assert result["deletion_ratio"] == pytest.approx(1.0, abs=1e-4)


def test_eval_reports_the_attention_measures(shapes_folder, tmp_path):
    """eval.py's metrics JSON, printed table and HTML report carry the measures and the deletion test."""
    import eval as eval_script
    from conftest import write_checkpoint
    from satkit.config import ModelConfig
    from satkit.model import build_model

    word_map = json.loads((shapes_folder / "word_map.json").read_text())
    cfg = ModelConfig(encoder="resnet18", encoder_stages=2, enc_size=3, attention_dim=8, embed_dim=8, decoder_dim=8,
                      vocab_size=len(word_map))
    torch.manual_seed(0)
    checkpoint = write_checkpoint(tmp_path / "m.pt", build_model(cfg), cfg, word_map)
    out = tmp_path / "test.json"
    rc = eval_script.main(["--checkpoint", str(checkpoint), "--data-folder", str(shapes_folder), "--beam-size", "1",
                           "--max-len", "4", "--num-workers", "0", "--out", str(out), "--report", str(tmp_path / "r"),
                           "--attention-images", "2", "--metrics-only", "--metric", "BLEU"])
    assert rc == 0
    metrics = json.loads(out.with_name("test.metrics.json").read_text())
    assert metrics["attention_words"] > 0
    assert 1 / 9 <= metrics["attention_half_mass_area_median"] <= 5 / 9
    assert metrics["attention_peak_x_uniform_median"] >= 1.0
    assert "deletion_ratio" in metrics or metrics["deletion_words"] == 0
    page = (tmp_path / "r" / "index.html").read_text()
    assert "attention_half_mass_area_median" in page and "Where does it look?" in page
    assert np.isfinite(metrics["attention_entropy_median"])


def test_gallery_titles_each_photo_with_its_measures(shapes_folder, tmp_path, write_image):
    """tools.attention_gallery: one title line and one strip of panels per photo, in one PNG."""
    from PIL import Image

    from conftest import write_checkpoint
    from satkit.config import ModelConfig
    from satkit.model import build_model
    from tools import attention_gallery

    word_map = json.loads((shapes_folder / "word_map.json").read_text())
    cfg = ModelConfig(encoder="resnet18", encoder_stages=2, enc_size=3, attention_dim=8, embed_dim=8, decoder_dim=8,
                      vocab_size=len(word_map))
    torch.manual_seed(0)
    checkpoint = write_checkpoint(tmp_path / "m.pt", build_model(cfg), cfg, word_map, image_size=48)
    photos = [str(write_image(tmp_path / f"p{i}.png", Image.new("RGB", (60, 50), (40 * i, 90, 200)))) for i in range(2)]
    out = tmp_path / "gallery.png"
    assert attention_gallery.main(["--checkpoint", str(checkpoint), "--img", *photos, "--out", str(out),
                                   "--beam-size", "1", "--max-words", "2", "--width", "400"]) == 0
    with Image.open(out) as figure:
        assert figure.width <= 400 and figure.height > 2 * attention_gallery.TITLE_HEIGHT * 400 / 1600
    line = attention_gallery.measures_line(type("C", (), {"alphas": torch.full((2, 3, 3), 1 / 9), "words": ["a", "b"]}))
    assert line == "half-mass 56% of the image, peak 1.0x uniform, entropy 1.00 (medians over 2 words)"
