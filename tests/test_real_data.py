"""Real photos end to end: a Flickr8k subset packed, trained with configs/flickr8k_cpu.yaml for one short
epoch, scored with the shuffled control and captioned. Skips when ../shared/data/flickr8k is absent."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import caption
import eval as evaluation
import train

SUBSET = {"train": 32, "val": 6, "test": 6}


def flickr8k_subset(flickr8k: Path, tmp_path: Path) -> Path:
    data = json.loads((flickr8k / "dataset_flickr8k.json").read_text())
    keep = []
    for split, count in SUBSET.items():
        keep += [image for image in data["images"] if image["split"] == split][:count]
    path = tmp_path / "flickr8k_subset.json"
    path.write_text(json.dumps({"dataset": "flickr8k", "images": keep}))
    return path


def test_flickr8k_subset_trains_evaluates_and_captions(flickr8k, tmp_path, pack, capsys):
    data, run = tmp_path / "data", tmp_path / "run"
    pack(["--dataset", "flickr8k", "--karpathy-json", str(flickr8k_subset(flickr8k, tmp_path)), "--image-folder",
          str(flickr8k / "images"), "--image-size", "64", "--min-word-freq", "3", "--output-folder", str(data)])
    # The shipped CPU config, shrunk to one short epoch; concept loss, flips and 2 captions a step included.
    assert train.main(["--config", "configs/flickr8k_cpu.yaml", f"data_folder={data}", f"out_dir={run}", "epochs=1",
                       "batch_size=8", "num_workers=0", "max_len=8"]) == 0
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert len(rows) == 1 and float(rows[0]["train_concept"]) > 0  # the concept loss was computed and logged
    assert (run / "curves.png").stat().st_size > 1000

    out = tmp_path / "test.json"
    assert evaluation.main(["--checkpoint", str(run / "best.pt"), "--data-folder", str(data), "--beam-size", "2",
                            "--max-len", "8", "--num-workers", "0", "--out", str(out)]) == 0
    metrics = json.loads(out.with_name("test.metrics.json").read_text())
    assert metrics["images"] == SUBSET["test"] and metrics["control"] == "shuffled"
    for key in ("CIDEr", "shuffled_CIDEr", "BLEU-4", "shuffled_BLEU-4", "distinct_captions", "vocab_used"):
        assert metrics[key] >= 0, key
    assert 0 < metrics["distinct_captions"] <= 1

    photos = sorted((flickr8k / "images").glob("*.jpg"))[:2]
    capsys.readouterr()
    assert caption.main(["--img", *map(str, photos), "--checkpoint", str(run / "best.pt"), "--max-len", "6",
                         "--out-dir", str(tmp_path / "figures")]) == 0
    printed = capsys.readouterr().out
    assert all(f"{photo}: " in printed for photo in photos)
    assert len(list((tmp_path / "figures").glob("*_attention.gif"))) == 2
