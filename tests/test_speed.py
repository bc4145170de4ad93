"""The speed features keep the numbers: shared per-image annotations, the attention's sigmoid form and
cache-friendly path, back-pointer beam search, the feature cache, compile_step, and benchmark.py's tiny mode."""
from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
import torch

import train
from satkit.checkpoints import load_checkpoint
from satkit.config import ModelConfig
from satkit.data.dataset import CaptionDataset, collate_captions
from satkit.decoding import beam_search
from satkit.data.feature_cache import cache_path, weights_hash
from satkit.model import build_model

ROOT = Path(__file__).resolve().parent.parent
WORD_MAP = {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, 30)}}
TINY = ["encoder_stages=2", "enc_size=4", "attention_dim=32", "embed_dim=16", "decoder_dim=32", "batch_size=8",
        "num_workers=0", "max_len=12", "early_stop_patience=0"]


def tiny_model(attention: str = "soft", seed: int = 0):
    torch.manual_seed(seed)
    cfg = ModelConfig(encoder="resnet18", encoder_stages=2, enc_size=4, attention=attention, attention_dim=24,
                      embed_dim=16, decoder_dim=20, vocab_size=len(WORD_MAP), dropout=0.0)
    return build_model(cfg).eval()


@pytest.mark.parametrize("attention", ["soft", "hard"])
def test_captions_share_their_images_annotations(attention):
    """Decoder rows grouped per image (r captions each) give what repeating the annotations per row gives."""
    model = tiny_model(attention)
    features = torch.randn(3, 16, model.encoder.out_dim)  # (G, L, D)
    captions = torch.randint(4, len(WORD_MAP), (6, 7))  # 2 captions per image
    captions[:, 0] = WORD_MAP["<start>"]
    caplens = torch.tensor([7, 5, 6, 7, 3, 4])
    grouped = model.decoder(features, captions, caplens, "argmax")
    repeated = model.decoder(features.repeat_interleave(2, dim=0), captions, caplens, "argmax")
    for key in ("logits", "alphas", "entropy"):
        torch.testing.assert_close(grouped[key], repeated[key], rtol=1e-5, atol=1e-5)


def test_attention_without_autograd_equals_with_it():
    """The no-grad path builds the (r, L, A) pre-activation per image in a reused buffer; same weights."""
    attention = tiny_model().decoder.attention
    features_proj = torch.randn(4, 16, 24)
    h = torch.randn(12, 20)  # 3 rows per image
    with torch.enable_grad():
        expected = attention.weights(features_proj, h)
    with torch.no_grad():
        got = attention.weights(features_proj, h)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    assert got.shape == (12, 16)


def test_beam_search_from_annotations_equals_from_images():
    model = tiny_model()
    images = torch.randn(3, 3, 32, 32)
    from_images = beam_search(model, images, WORD_MAP, beam_size=3, max_len=8)
    from_features = beam_search(model, model.encoder(images), WORD_MAP, beam_size=3, max_len=8)
    for (a,), (b,) in zip(from_images, from_features):
        assert a.tokens == b.tokens and a.score == pytest.approx(b.score, abs=1e-5)
        torch.testing.assert_close(a.alphas, b.alphas)


def test_beam_search_attention_is_the_emitting_beams():
    """Back-pointers return, for each word of each of the n best captions, the attention of the beam
    that emitted it: re-running the returned caption through teacher forcing gives the same alphas."""
    model = tiny_model()
    images = torch.randn(2, 3, 32, 32)
    for hypotheses, image in zip(beam_search(model, images, WORD_MAP, beam_size=4, max_len=6, n_best=3), images):
        for hyp in hypotheses:
            tokens = [WORD_MAP["<start>"], *hyp.tokens, WORD_MAP["<end>"]]
            captions = torch.tensor([tokens])
            out = model.decoder(model.encoder(image[None]), captions, torch.tensor([len(tokens)]))
            n = len(hyp.tokens)
            torch.testing.assert_close(out["alphas"][0, :n].view(n, 4, 4), hyp.alphas, rtol=1e-4, atol=1e-5)


@pytest.fixture
def own_pack(shapes_folder, tmp_path) -> Path:
    """A private copy of the tiny pack: the cache is written beside it."""
    return Path(shutil.copytree(shapes_folder, tmp_path / "packed", ignore=shutil.ignore_patterns("features")))


def test_feature_cache_holds_the_encoders_annotations_and_trains(own_pack, tmp_path):
    out = tmp_path / "run"
    argv = ["--config", "configs/shapes.yaml", f"data_folder={own_pack}", *TINY, "fine_tune_encoder=false", "epochs=1"]
    assert train.main([*argv, f"out_dir={out}"]) == 0  # feature_cache=auto: on for a frozen encoder
    ckpt = load_checkpoint(out / "last.pt")
    model_cfg = ModelConfig(**ckpt["model_config"])
    model = build_model(model_cfg)
    model.load_state_dict(ckpt["model"])
    model.eval()
    for split in ("train", "val"):
        path = cache_path(own_pack, split, model_cfg, weights_hash(model.encoder))
        dataset = CaptionDataset(str(own_pack), split)
        batch = collate_captions([dataset[i] for i in range(len(dataset))])
        with h5py.File(path, "r") as h5, torch.no_grad():
            cached = torch.from_numpy(h5["features"][:])
            assert cached.dtype == torch.float16 and cached.shape == (len(dataset), 16, model.encoder.out_dim)
            torch.testing.assert_close(cached.float(), model.encoder(batch["image"]), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("override,message", [
    ("fine_tune_encoder=true", "needs a frozen encoder"),
    ("hflip=true", "cannot flip images"),
])
def test_feature_cache_on_refuses_what_it_cannot_cache(shapes_folder, tmp_path, capsys, override, message):
    argv = ["--config", "configs/shapes.yaml", f"data_folder={shapes_folder}", f"out_dir={tmp_path / 'r'}", *TINY,
            "fine_tune_encoder=false", "feature_cache=on", override]
    assert train.main(argv) == 1
    assert message in capsys.readouterr().err


def test_cached_and_pixel_training_agree(own_pack, tmp_path):
    """The same frozen-encoder run from pixels and from the cache: the same first-epoch loss (fp16 features)."""
    argv = ["--config", "configs/shapes.yaml", f"data_folder={own_pack}", *TINY, "fine_tune_encoder=false", "epochs=1"]
    assert train.main([*argv, f"out_dir={tmp_path / 'cached'}", "feature_cache=on"]) == 0
    assert train.main([*argv, f"out_dir={tmp_path / 'pixels'}", "feature_cache=off"]) == 0
    cached = next(csv.DictReader(open(tmp_path / "cached" / "metrics.csv")))
    pixels = next(csv.DictReader(open(tmp_path / "pixels" / "metrics.csv")))
    assert float(cached["train_loss"]) == pytest.approx(float(pixels["train_loss"]), rel=2e-3)
    assert len(list((own_pack / "features").glob("train_resnet18_l2_g4_*.h5"))) == 1  # one encoder, one cache


def test_benchmark_tiny_mode_runs(tmp_path):
    """Every group of rows but `shared` (a minute of busy neighbours; its code is the demo step's)."""
    rows = "decode,frozen,trainable,data,memory,scst,encoders"
    result = subprocess.run([sys.executable, "-m", "tools.benchmark", "--tiny", "--rows", rows], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    table = result.stdout
    for row in ("decode", "train, frozen encoder", "train, trainable encoder", "data", "peak RSS", "SCST step, K=2",
                "frozen encoder forward", "forward layout", "feature cache build", "Captioner end to end"):
        assert row in table, table


def test_benchmark_shards_rows_run():
    """--tiny --rows shards, on 40 shapes training images: loaders from shards and from the pack, the flickr8k_cpu
    step fed by each, and the peak memory of streaming 2 vs 16 shards; every figure measured."""
    result = subprocess.run([sys.executable, "-m", "tools.benchmark", "--tiny", "--rows", "shards"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in result.stdout.splitlines()
            if line.startswith("| shards")}
    assert [name.split(",")[0] for name in rows] == ["shards: loader alone"] * 2 + [
        "shards: training", "shards keep the step fed (1 worker(s))",
        "shards: peak data memory (PSS) of the loader and its 2 workers"], result.stdout
    for cells in rows.values():
        assert float(cells[3]) > 0 and float(cells[5]) > 0, cells


def test_benchmark_shards_rows_need_the_flickr8k_pack(tmp_path, capsys):
    """Full mode reads Flickr8k: asked for by name, the shards rows name what is missing; in the default
    (every group) they are left out with a note (checked by hand: that run takes minutes)."""
    from tools import benchmark

    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(["--rows", "shards", "--flickr8k-pack", str(tmp_path / "nowhere")])
    assert exit_info.value.code == 2
    assert "no Flickr8k pack at" in capsys.readouterr().err


def test_compiled_step_gives_the_eager_loss_and_gradients():
    """compile_step=true (torch.compile of Decoder.step) trains the same model: loss and gradients agree."""
    from satkit.training.losses import target_log_probs

    model = tiny_model("soft")
    features = torch.randn(3, 16, model.encoder.out_dim)
    captions = torch.randint(4, len(WORD_MAP), (6, 7))
    captions[:, 0] = WORD_MAP["<start>"]
    caplens = torch.tensor([7, 5, 6, 7, 3, 4])

    def loss_and_grad() -> tuple[torch.Tensor, torch.Tensor]:
        model.zero_grad()
        out = model.decoder(features, captions, caplens)
        loss = -target_log_probs(out["logits"], out["targets"])[out["mask"]].mean()
        loss.backward()
        return loss.detach(), model.decoder.attention.features_att.weight.grad.clone()

    from torch._dynamo.utils import counters

    eager = loss_and_grad()
    model.decoder.compile_step(dynamic=False)
    compiled_frames = counters["frames"]["ok"]
    compiled = loss_and_grad()
    assert counters["frames"]["ok"] > compiled_frames  # the step really went through torch.compile
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled[1], eager[1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("grad", [True, False])
def test_attention_weights_are_the_papers_tanh_mlp(grad):
    """The sigmoid form gives softmax_i(w^T tanh(W_a a_i + W_h h) + b) exactly as written in the paper."""
    attention = tiny_model().decoder.attention
    features = torch.randn(2, 16, 128)
    h = torch.randn(6, 20)
    features_proj = attention.project(features)
    b = 0.7  # the paper's bias: the same for every location, so the softmax cancels it
    paper = torch.softmax(attention.score(torch.tanh(
        features_proj.repeat_interleave(3, 0) + attention.hidden_att(h)[:, None])).squeeze(2) + b, dim=1)
    with torch.set_grad_enabled(grad):
        got = attention.weights(features_proj, h)
    torch.testing.assert_close(got, paper, rtol=1e-5, atol=1e-6)
