"""progress.progress_bar: tqdm on a terminal, one plain line every N steps in a log file (CI, nohup, > log)."""
from __future__ import annotations

import io
import re

from tqdm import tqdm

from satkit.infra.progress import PlainProgress, progress_bar


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_every_n_steps_when_not_a_terminal():
    log = io.StringIO()
    bar = progress_bar(range(95), desc="epoch 1/3", every=10, file=log)
    assert isinstance(bar, PlainProgress)
    for step in bar:
        if step == 30:
            bar.set_postfix(loss="2.345", img_s="120")
    text = log.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert [re.match(r"epoch 1/3: (\d+)/95 ", line).group(1) for line in lines] == [
        "10", "20", "30", "40", "50", "60", "70", "80", "90", "95"]
    assert "loss" not in lines[2] and " loss=2.345, img_s=120, " in lines[3]  # the figures, once set
    assert re.search(r"\(11%\) .* it/s, elapsed \d\d:\d\d, ETA \d\d:\d\d$", lines[0]), lines[0]
    assert lines[-1].startswith("epoch 1/3: 95/95 (100%) loss=2.345, img_s=120, ")


def test_manual_updates_write_and_default_spacing():
    log = io.StringIO()
    with progress_bar(total=400, desc="train", unit="img", file=log) as bar:
        for _ in range(400):
            bar.update()
        bar.write("warning: skipped x.jpg", file=log)
    lines = log.getvalue().splitlines()
    assert len(lines) == 21 and lines[-1] == "warning: skipped x.jpg"  # ~20 lines a pass by default
    assert lines[0].startswith("train: 20/400 (5%) ") and " img/s, " in lines[0]
    assert lines[-2].startswith("train: 400/400 (100%) ")


def test_unknown_length_disabled_and_early_stop():
    log = io.StringIO()
    for _ in progress_bar(iter(range(250)), desc="decode", file=log):
        pass
    assert [line.split(" ")[1] for line in log.getvalue().splitlines()] == ["100", "200", "250"]
    quiet = io.StringIO()
    for _ in progress_bar(range(50), desc="x", every=1, disable=True, file=quiet):
        pass
    assert quiet.getvalue() == ""
    log = io.StringIO()
    for step in progress_bar(range(100), desc="x", every=40, file=log):
        if step == 44:
            break
    assert [line.split(" ")[1] for line in log.getvalue().splitlines()] == ["40/100", "44/100"]  # as tqdm counts


def test_a_terminal_gets_tqdm():
    term = FakeTerminal()
    bar = progress_bar(range(5), desc="epoch", file=term)
    assert isinstance(bar, tqdm)
    list(bar)
    assert "\r" in term.getvalue()  # the redraws this module keeps out of log files


def test_packing_log_has_no_carriage_returns(pack, tmp_path, capsys):
    pack(["--dataset", "shapes", "--num-images", "12", "--image-size", "32", "--workers", "1",
          "--output-folder", str(tmp_path / "packed")])
    err = capsys.readouterr().err
    assert "\r" not in err
    assert re.search(r"^train: \d+/\d+ \(100%\) .* img/s", err, re.M), err


def test_training_log_has_no_carriage_returns(shapes_folder, tmp_path, capsys):
    from test_train import run_train

    assert run_train(shapes_folder, tmp_path / "run", "epochs=1") == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    assert re.search(r"^epoch 1/1: 3/3 \(100%\) .* it/s, elapsed ", err, re.M), err
