"""Bad input across the scripts: one `error:` line naming the problem, exit code 1, nothing half-written.

The seed of the fault matrix: each case here was once a traceback or a silent success.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import create_input_files
import eval as evaluation
from tools import draw_shapes
import train

TINY = ["encoder_stages=1", "enc_size=2", "attention_dim=16", "embed_dim=16", "decoder_dim=16", "batch_size=8",
        "num_workers=0", "epochs=1", "encoder_weights=none", "encoder=resnet18"]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("override,expected", [
    ("device=gpu", "device='gpu' is not a device"),
    ("batch_size=1000", "no full batch of batch_size=1000"),
    ("decoder_lr=-1", "decoder_lr=-1.0 must be >= 0"),
    ("val_beam_size=0", "val_beam_size=0 must be >= 1"),
    ("fine_tune_encoder=true", "fine_tune_stages=3 must be in 0..1"),
])
def test_train_rejects_bad_settings_before_training(override, expected, shapes_folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main([*TINY, f"data_folder={shapes_folder}", f"out_dir={out}", override]) == 1
    assert expected in one_error_line(capsys)
    assert not out.exists()


def test_train_out_dir_that_is_a_file(shapes_folder, tmp_path, capsys):
    clash = tmp_path / "run"
    clash.write_text("not a folder")
    assert train.main([*TINY, f"data_folder={shapes_folder}", f"out_dir={clash}"]) == 1
    assert "run" in one_error_line(capsys)


def test_train_empty_val_split(pack, tmp_path, capsys):
    folder = tmp_path / "noval"
    pack(["--dataset", "shapes", "--num-images", "20", "--image-size", "32", "--val-fraction", "0",
          "--output-folder", str(folder)])
    capsys.readouterr()  # the packing progress bars
    assert train.main([*TINY, f"data_folder={folder}", f"out_dir={tmp_path / 'run'}"]) == 1
    assert "val.h5: the val split is empty" in one_error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_unreadable_config_and_word_map(tmp_path, capsys):
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b"name: caf\xe9\n")
    assert train.main(["--config", str(latin1)]) == 1
    assert "latin1.yaml: cannot read the config file" in one_error_line(capsys)
    assert train.main(["--config", str(tmp_path)]) == 1  # a folder
    assert "cannot read the config file" in one_error_line(capsys)
    broken = tmp_path / "broken.yaml"
    broken.write_text("epochs: [1\n")
    assert train.main(["--config", str(broken)]) == 1
    assert "broken.yaml: not valid YAML" in one_error_line(capsys)  # PyYAML's message folded on one line


@pytest.mark.parametrize("args,expected", [
    (["--max-len", "0"], "--max-len=0 must be >= 1"),
    (["--length-penalty", "nan"], "--length-penalty=nan must be a finite number"),
])
def test_eval_rejects_bad_flags(args, expected, tmp_path, capsys):
    code = evaluation.main(["--checkpoint", str(tmp_path / "none.pt"), "--data-folder", str(tmp_path), *args])
    assert code == 1 and expected in one_error_line(capsys)


def test_eval_out_under_a_file_fails_before_decoding(tmp_path, capsys):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    code = evaluation.main(["--checkpoint", str(tmp_path / "none.pt"), "--data-folder", str(tmp_path),
                            "--out", str(blocker / "results.json")])
    assert code == 1 and "blocker" in one_error_line(capsys)  # before the missing checkpoint is even read


def karpathy(tmp_path: Path, write_image, **entry_fields) -> Path:
    write_image(tmp_path / "imgs" / "a.jpg")
    entry = {"filename": "a.jpg", "split": "train", "sentences": [{"raw": "a red square", "tokens": ["a"]}]}
    entry.update(entry_fields)
    path = tmp_path / "k.json"
    path.write_text(json.dumps({"images": [entry]}))
    return path


@pytest.mark.parametrize("fields,expected", [
    ({"sentences": [{"tokens": 5}]}, "no valid 'sentences' list"),
    ({"split": ["train"]}, "has split ['train']"),
    ({"filepath": 2014}, "non-text 'filepath'"),
])
def test_karpathy_json_with_wrong_types(fields, expected, tmp_path, write_image, capsys):
    path = karpathy(tmp_path, write_image, **fields)
    code = create_input_files.main(["--dataset", "coco", "--karpathy-json", str(path), "--image-folder",
                                    str(tmp_path / "imgs"), "--output-folder", str(tmp_path / "out")])
    assert code == 1 and expected in one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_pack_into_a_file_or_with_size_zero(tmp_path, capsys):
    clash = tmp_path / "out"
    clash.write_text("a file")
    assert create_input_files.main(["--dataset", "shapes", "--num-images", "12", "--output-folder", str(clash)]) == 1
    assert "cannot write" in one_error_line(capsys)
    assert create_input_files.main(["--dataset", "shapes", "--image-size", "0",
                                    "--output-folder", str(tmp_path / "zero")]) == 1
    assert "--image-size=0 must be >= 32 for --dataset shapes" in one_error_line(capsys)
    assert create_input_files.main(["--dataset", "shapes", "--seed", "-1", "--output-folder", str(tmp_path / "s")]) == 1
    assert "--seed=-1 must be >= 0" in one_error_line(capsys)  # was a numpy traceback
    assert not (tmp_path / "zero").exists() and not (tmp_path / "s").exists()


def test_csv_caption_swallowed_by_an_unclosed_quote(tmp_path, write_image, capsys):
    for name in ("g0.jpg", "g1.jpg"):
        write_image(tmp_path / "imgs" / name)
    (tmp_path / "c.csv").write_text('image,caption\ng0.jpg,"a cat\ng1.jpg,a dog\n')
    code = create_input_files.main(["--dataset", "custom", "--captions-file", str(tmp_path / "c.csv"),
                                    "--image-folder", str(tmp_path / "imgs"), "--output-folder", str(tmp_path / "o")])
    assert code == 1 and "c.csv:2: caption spans several lines" in one_error_line(capsys)


@pytest.mark.parametrize("args,expected", [(["--count", "0"], "--count=0 must be >= 1"),
                                           (["--seed", "-1"], "--seed=-1 must be >= 0"),
                                           (["--image-size", "100000"], "--image-size=100000 must be <= 2048")])
def test_shapes_cli_bounds(args, expected, tmp_path, capsys):
    assert draw_shapes.main(["--out-dir", str(tmp_path / "s"), *args]) == 1
    assert expected in one_error_line(capsys)
    assert not (tmp_path / "s").exists()
