"""train.py init_from / extend_vocab: fine-tuning another run's model on a new pack with its own word map."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import SHAPES_ARGS, pack_main

from satkit.training import finetune as fine_tuning
import train
from satkit.config import ModelConfig
from satkit.data.dataset import CaptionDataset
from satkit.model import build_model
from satkit.data.text import decode_ids

TINY_MODEL = ["encoder_stages=2", "enc_size=4", "attention_dim=32", "embed_dim=16", "decoder_dim=32"]
TINY_RUN = ["batch_size=8", "num_workers=0", "max_len=12", "log_every=1", "early_stop_patience=0"]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> tuple[Path, Path]:
    """A one-epoch run on a shapes pack with a small vocabulary (min word freq 40): (its last.pt, its pack)."""
    root = tmp_path_factory.mktemp("finetune")
    pack = root / "small_vocab"
    pack_main(SHAPES_ARGS + ["--min-word-freq", "40", "--output-folder", str(pack)])
    out = root / "base"
    argv = ["--config", "configs/shapes.yaml", f"data_folder={pack}", f"out_dir={out}", "epochs=1",
            *TINY_MODEL, *TINY_RUN]
    assert train.main(argv) == 0
    return out / "last.pt", pack


def finetune(base: Path, data: Path, out: Path, *extra: str) -> int:
    return train.main(["--config", "configs/shapes.yaml", f"data_folder={data}", f"out_dir={out}",
                       f"init_from={base}", "epochs=1", *TINY_RUN, *extra])


def test_extend_word_map_and_caption_id_map():
    base = {"<pad>": 0, "dog": 1, "<unk>": 2, "<start>": 3, "<end>": 4}
    pack = {"<pad>": 0, "cat": 1, "dog": 2, "<unk>": 3, "<start>": 4, "<end>": 5}
    extended = fine_tuning.extend_word_map(base, pack)
    assert extended == {**base, "cat": 5}  # old ids kept, the new word appended
    table = fine_tuning.caption_id_map(pack, extended)
    assert table.tolist() == [0, 5, 1, 2, 3, 4]
    assert fine_tuning.caption_id_map(pack, base).tolist() == [0, 2, 1, 2, 3, 4]  # "cat" -> <unk> without extending


def test_extend_vocab_keeps_old_rows_and_old_logits():
    cfg = ModelConfig(encoder="resnet18", encoder_stages=1, enc_size=2, attention_dim=8, embed_dim=8,
                      decoder_dim=8, dropout=0.0, vocab_size=6)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    images = torch.randn(2, 3, 32, 32)
    captions, caplens = torch.tensor([[[3, 1, 4, 0]], [[3, 1, 2, 4]]]), torch.tensor([[3], [4]])
    with torch.no_grad():
        before = model(images, captions, caplens)["logits"]
    old = {k: v.clone() for k, v in model.state_dict().items()}
    fine_tuning.extend_vocab(model, 9)
    decoder = model.decoder
    assert decoder.embedding.weight.shape == (9, 8) and decoder.L_o.weight.shape == (9, 8)
    assert torch.equal(decoder.embedding.weight[:6], old["decoder.embedding.weight"])
    assert torch.equal(decoder.L_o.weight[:6], old["decoder.L_o.weight"])
    assert torch.equal(decoder.L_o.bias[:6], old["decoder.L_o.bias"])
    assert torch.all(decoder.L_o.bias[6:] == old["decoder.L_o.bias"].min())
    assert decoder.embedding.weight[6:].abs().max() <= 0.1 and decoder.embedding.weight[6:].abs().sum() > 0
    with torch.no_grad():
        after = model(images, captions, caplens)["logits"]
    assert after.shape[-1] == 9
    # Not bit-equal: the output layer's new shape (6 -> 9 rows) may take another GEMM kernel with another
    # summation order (seen on Intel Xeons, 3e-8); float32 rounding at this scale stays far under 1e-6.
    assert_old_logits_kept(after, before)
    # The tolerance still catches what matters: an old row moved by 1e-4 fails it.
    with torch.no_grad():
        decoder.L_o.weight[2] += 1e-4
        decoder.L_o.bias[2] += 1e-4
        moved = model(images, captions, caplens)["logits"]
    with pytest.raises(AssertionError):
        assert_old_logits_kept(moved, before)


def assert_old_logits_kept(after: torch.Tensor, before: torch.Tensor) -> None:
    torch.testing.assert_close(after[..., : before.shape[-1]], before, rtol=0, atol=1e-6)


def test_dataset_translates_pack_ids_to_model_ids(shapes_folder):
    dataset = CaptionDataset(str(shapes_folder), "train")
    pack_map = dataset.word_map
    model_map = fine_tuning.extend_word_map({"<pad>": 0, "<unk>": 1, "<start>": 2, "<end>": 3, "circle": 4}, pack_map)
    raw = dataset[0]["captions"]
    dataset.caption_id_map = fine_tuning.caption_id_map(pack_map, model_map)
    mapped = dataset[0]["captions"]
    rev_pack, rev_model = ({v: k for k, v in m.items()} for m in (pack_map, model_map))
    assert [decode_ids(c, rev_pack) for c in raw] == [decode_ids(c, rev_model) for c in mapped]
    assert not torch.equal(raw, mapped)


@pytest.mark.filterwarnings("ignore:Data has no positive values")  # curves.png: a zero learning rate on a log axis
def test_init_from_starts_from_the_weights_and_extends_the_vocabulary(base_run, shapes_folder, tmp_path):
    base_ckpt, _ = base_run
    base = torch.load(base_ckpt, weights_only=True)
    out = tmp_path / "tuned"
    # Zero learning rates and a frozen encoder (BN in eval): after one epoch the weights are the start.
    assert finetune(base_ckpt, shapes_folder, out, "extend_vocab=true", "decoder_lr=0", "encoder_lr=0",
                    "fine_tune_encoder=false", "feature_cache=off") == 0  # no cache in the shared pack
    tuned = torch.load(out / "last.pt", weights_only=True)
    old_words, pack_words = base["word_map"], json.loads((shapes_folder / "word_map.json").read_text())
    assert len(pack_words) > len(old_words)  # the pack has words the base model lacks
    assert list(tuned["word_map"].items())[: len(old_words)] == list(old_words.items())
    assert set(tuned["word_map"]) == set(old_words) | set(pack_words)
    assert tuned["pack_word_map"] == pack_words
    assert tuned["model_config"]["vocab_size"] == len(tuned["word_map"])
    assert tuned["model_config"]["enc_size"] == base["model_config"]["enc_size"] == 4
    assert tuned["train_state"]["epoch"] == 1 and tuned["train_state"]["step"] == 3  # fresh: 30 images / 8
    assert tuned["train_config"]["init_from"] == str(base_ckpt)
    n_old = len(old_words)
    for key, value in base["model"].items():
        new = tuned["model"][key]
        if key in ("decoder.embedding.weight", "decoder.L_o.weight", "decoder.L_o.bias"):
            assert new.shape[0] == len(tuned["word_map"]) > n_old, key
            new = new[:n_old]
        assert torch.equal(new, value), key


def test_init_from_trains_and_eval_accepts_the_new_pack(base_run, shapes_folder, tmp_path, capsys):
    import eval as evaluation

    base_ckpt, _ = base_run
    out = tmp_path / "tuned"
    assert finetune(base_ckpt, shapes_folder, out, "extend_vocab=true") == 0
    base = torch.load(base_ckpt, weights_only=True)
    tuned = torch.load(out / "last.pt", weights_only=True)
    assert not torch.equal(tuned["model"]["decoder.L_o.weight"][: len(base["word_map"])],
                           base["model"]["decoder.L_o.weight"])  # it trained
    capsys.readouterr()
    code = evaluation.main(["--checkpoint", str(out / "last.pt"), "--data-folder", str(shapes_folder),
                            "--beam-size", "1", "--max-len", "8", "--num-workers", "0", "--control", "none",
                            "--out", str(tmp_path / "test.json")])
    assert code == 0, capsys.readouterr().err


def test_init_from_without_extend_vocab_keeps_the_word_map_and_resumes(base_run, shapes_folder, tmp_path):
    base_ckpt, _ = base_run
    assert finetune(base_ckpt, shapes_folder, tmp_path / "tuned") == 0
    tuned = torch.load(tmp_path / "tuned" / "last.pt", weights_only=True)
    assert tuned["word_map"] == torch.load(base_ckpt, weights_only=True)["word_map"]
    # Resuming a fine-tuning run keeps its own word map (not the pack's) and continues from its weights.
    assert train.main([f"resume={tmp_path / 'tuned' / 'last.pt'}", "epochs=2"]) == 0
    resumed = torch.load(tmp_path / "tuned" / "last.pt", weights_only=True)
    assert resumed["word_map"] == tuned["word_map"] and resumed["train_state"]["epoch"] == 2


def test_init_from_refuses_architecture_overrides(base_run, shapes_folder, tmp_path, capsys):
    base_ckpt, _ = base_run
    assert finetune(base_ckpt, shapes_folder, tmp_path / "tuned", "decoder_dim=64") == 1
    err = capsys.readouterr().err
    assert err.strip() == (f"error: init_from={base_ckpt}: the architecture comes from that checkpoint; "
                           "drop the override(s) of decoder_dim")
    assert not (tmp_path / "tuned").exists()
    assert train.main(["--config", "configs/shapes.yaml", f"data_folder={shapes_folder}", "extend_vocab=true"]) == 1
    assert capsys.readouterr().err.strip() == (
        "error: extend_vocab=true extends the word map of init_from=PATH; give init_from too")


def test_a_hard_run_warm_started_from_a_soft_checkpoint_trains_and_evaluates(base_run, shapes_folder, tmp_path,
                                                                            capsys):
    """The paper's second variant from the first's weights (soft and hard share f_att): init_from= a soft
    model with attention=hard trains with sampled locations and eval.py scores it."""
    import eval as evaluation

    base_ckpt, _ = base_run
    base = torch.load(base_ckpt, weights_only=True)
    assert base["model_config"]["attention"] == "soft"
    out = tmp_path / "hard"
    assert finetune(base_ckpt, shapes_folder, out, "attention=hard", "feature_cache=off") == 0
    assert "attention=hard (the checkpoint's: soft" in capsys.readouterr().err
    hard = torch.load(out / "last.pt", weights_only=True)
    assert hard["model_config"]["attention"] == "hard"
    assert hard["model"].keys() == base["model"].keys()
    assert not torch.equal(hard["model"]["decoder.attention.score.weight"], base["model"]["decoder.attention.score.weight"])
    rows = (out / "metrics.csv").read_text().splitlines()
    assert len(rows) == 2  # one epoch trained
    code = evaluation.main(["--checkpoint", str(out / "last.pt"), "--data-folder", str(shapes_folder), "--beam-size",
                            "2", "--max-len", "8", "--num-workers", "0", "--control", "none", "--out",
                            str(tmp_path / "test.json"), "--attention-images", "1"])
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((tmp_path / "test.metrics.json").read_text())
    assert metrics["attention"] == "hard" and metrics["attention_words"] > 0
