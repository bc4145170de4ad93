"""Model, loss and config tests on tiny seeded CPU models (no data files needed)."""
from __future__ import annotations

import urllib.error

import pytest
import torch
import torch.nn.functional as F
import torchvision

from satkit.attention import HardAttention
from satkit.checkpoints import build_checkpoint, load_checkpoint, save_checkpoint
from satkit.config import Config, load_config
from satkit.training.losses import doubly_stochastic_penalty, reinforce_surrogate
from satkit.model import Encoder, WeightsDownloadError, build_model, model_from_checkpoint
from satkit.infra.runtime import UserError

VOCAB = 12  # ids: 0 <pad>, 1..8 words, 9 <unk>, 10 <start>, 11 <end>
WORD_MAP = {"<pad>": 0, **{f"w{i}": i for i in range(1, 9)}, "<unk>": 9, "<start>": 10, "<end>": 11}


def tiny_config(**overrides) -> Config:
    values = dict(
        encoder="resnet18", encoder_weights="none", encoder_stages=2, enc_size=4, fine_tune_encoder=True,
        fine_tune_stages=0, attention_dim=32, embed_dim=16, decoder_dim=32, dropout=0.0,
    )
    values.update(overrides)
    return Config(vocab_size=VOCAB, **values)


def make_model(cfg: Config) -> torch.nn.Module:
    return build_model(cfg.model_config(), fine_tune=cfg.fine_tune_encoder, fine_tune_stages=cfg.fine_tune_stages)


def tiny_batch(batch: int = 4, per_image: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, 32, 32, generator=g)
    lengths = torch.randint(3, 8, (batch, per_image), generator=g)  # <start> + words + <end>
    captions = torch.zeros(batch, per_image, 8, dtype=torch.long)
    for b in range(batch):
        for c in range(per_image):
            n = int(lengths[b, c])
            captions[b, c, 0] = WORD_MAP["<start>"]
            captions[b, c, 1 : n - 1] = torch.randint(1, 9, (n - 2,), generator=g)
            captions[b, c, n - 1] = WORD_MAP["<end>"]
    return images, captions, lengths


@pytest.mark.parametrize("attention", ["soft", "hard"])
@pytest.mark.parametrize("gate,deep_output", [("scalar", True), ("vector", False), ("none", True)])
def test_forward_shapes_and_alpha_sums_to_one(attention, gate, deep_output):
    torch.manual_seed(0)
    model = make_model(tiny_config(attention=attention, gate=gate, deep_output=deep_output))
    images, captions, lengths = tiny_batch()
    mode = "sample" if attention == "hard" else "expected"
    out = model(images, captions, lengths, mode)
    n, steps, L = 8, int(lengths.max()) - 1, 16  # 32 px / 8 = 4x4 grid from layer2
    assert out["logits"].shape == (n, steps, VOCAB)
    assert out["alphas"].shape == (n, steps, L)
    assert out["mask"].shape == (n, steps)
    assert torch.equal(out["mask"].sum(1), lengths.flatten() - 1)
    torch.testing.assert_close(out["alphas"].sum(2), torch.ones(n, steps))
    assert ("log_p_s" in out) == (attention == "hard")
    assert model.encoder(images).shape == (4, L, 128)  # (B, L, D): resnet18 layer2 has D=128


def test_encoder_channels_and_grid():
    enc = Encoder(arch="resnet50", weights="none", stages=4, enc_size=3)
    assert enc(torch.randn(1, 3, 64, 64)).shape == (1, 9, 2048)


def test_frozen_encoder_keeps_batchnorm_in_eval_and_no_grad():
    enc = Encoder(arch="resnet18", weights="none", stages=4, fine_tune=True, fine_tune_stages=3)
    enc.train()
    assert not enc.stem[1].training and not enc.stages[0][0].bn1.training  # frozen: BN uses running stats
    assert enc.stages[3][0].bn1.training
    assert not any(p.requires_grad for p in enc.stages[1].parameters())
    assert all(p.requires_grad for p in enc.stages[2].parameters())
    frozen = Encoder(arch="resnet18", weights="none", fine_tune=False)
    assert not any(p.requires_grad for p in frozen.parameters())


def test_imagenet_weights_offline_gives_clear_error(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: "/nonexistent-hub")
    with pytest.raises(WeightsDownloadError, match="offline.*encoder_weights=PATH.*encoder_weights=none"):
        Encoder(arch="resnet18", weights="imagenet")


def fake_weights(arch: str, seed: int) -> dict[str, torch.Tensor]:
    """A torchvision state_dict with known, seeded values (stands in for a downloaded weights file)."""
    torch.manual_seed(seed)
    return getattr(torchvision.models, arch)(weights=None).state_dict()


def assert_encoder_holds(encoder: Encoder, weights: dict[str, torch.Tensor]) -> None:
    torch.testing.assert_close(encoder.stem[0].weight, weights["conv1.weight"], rtol=0, atol=0)
    torch.testing.assert_close(encoder.stages[1][0].conv1.weight, weights["layer2.0.conv1.weight"], rtol=0, atol=0)
    torch.testing.assert_close(encoder.stem[1].running_mean, weights["bn1.running_mean"], rtol=0, atol=0)


def test_imagenet_weights_come_from_the_torch_hub_cache(tmp_path, monkeypatch):
    """encoder_weights=imagenet reads $TORCH_HOME/hub/checkpoints/<torchvision's file name> without a network."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    cache = tmp_path / "torch" / "hub" / "checkpoints" / url.rsplit("/", 1)[-1]
    cache.parent.mkdir(parents=True)
    weights = fake_weights("resnet18", seed=5)
    torch.save(weights, cache)
    assert_encoder_holds(Encoder(arch="resnet18", weights="imagenet", stages=2), weights)
    torch.save(fake_weights("resnet34", seed=5), cache)  # the wrong architecture under the right name
    with pytest.raises(UserError, match=r"resnet18-.*\.pth: not resnet18 weights"):
        Encoder(arch="resnet18", weights="imagenet")


def test_encoder_weights_from_a_local_file(tmp_path):
    weights = fake_weights("resnet18", seed=7)
    path = tmp_path / "my_resnet18.pth"
    torch.save(weights, path)
    assert_encoder_holds(Encoder(arch="resnet18", weights=str(path), stages=2), weights)
    torch.save(fake_weights("resnet34", seed=7), tmp_path / "r34.pth")
    with pytest.raises(UserError, match=r"r34\.pth: not resnet18 weights \(.*layer"):
        Encoder(arch="resnet18", weights=str(tmp_path / "r34.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not torch")
    with pytest.raises(UserError, match=r"junk\.pth: not a readable torch state_dict file"):
        Encoder(arch="resnet18", weights=str(tmp_path / "junk.pth"))
    with pytest.raises(UserError, match="is not imagenet, none or an existing weights file"):
        Encoder(arch="resnet18", weights=str(tmp_path / "missing.pth"))


def test_train_config_accepts_a_weights_path(tmp_path):
    """train.py passes encoder_weights through unchanged, so a path works from YAML or key=value."""
    path = tmp_path / "w.pth"
    torch.save(fake_weights("resnet18", seed=3), path)
    cfg = tiny_config(encoder_weights=str(path))
    model = build_model(cfg.model_config(), encoder_weights=cfg.encoder_weights)
    assert_encoder_holds(model.encoder, torch.load(path, weights_only=True))


def test_step_function_matches_teacher_forced_forward():
    torch.manual_seed(0)
    model = make_model(tiny_config()).eval()
    images, captions, lengths = tiny_batch(batch=2, per_image=1)
    out = model(images, captions, lengths)
    features = model.encoder(images)
    proj = model.decoder.attention.project(features)
    state = model.decoder.init_state(features)
    for t in range(out["logits"].size(1)):
        step = model.decoder.step(captions[:, 0, t], state, features, proj)
        state = step.state
        torch.testing.assert_close(step.logits, out["logits"][:, t])
        torch.testing.assert_close(step.alpha, out["alphas"][:, t])


def test_doubly_stochastic_penalty_matches_hand_computation():
    # 1 caption, 3 real steps (+1 padded step that must be ignored), L = 2 locations.
    alphas = torch.tensor([[[0.5, 0.5], [1.0, 0.0], [0.25, 0.75], [0.0, 1.0]]])
    mask = torch.tensor([[True, True, True, False]])
    # sum_t alpha = [1.75, 1.25] -> (1-1.75)^2 + (1-1.25)^2 = 0.5625 + 0.0625 = 0.625
    assert doubly_stochastic_penalty(alphas, mask, "sum").item() == pytest.approx(0.625)
    assert doubly_stochastic_penalty(alphas, mask, "mean").item() == pytest.approx(0.3125)
    with pytest.raises(ValueError, match="sum, mean"):
        doubly_stochastic_penalty(alphas, mask, "max")


@pytest.mark.parametrize("attention", ["soft", "hard"])
def test_tiny_model_overfits_a_batch(attention):
    torch.manual_seed(0)
    cfg = tiny_config(attention=attention, encoder_stages=1)  # layer1 only: 64-d, fast
    model = make_model(cfg)
    images, captions, lengths = tiny_batch(batch=4, per_image=2)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    from satkit.training.trainer import TrainState, train_step

    state = TrainState()
    batch = {"image": images, "captions": captions, "caplens": lengths}
    first = None
    for _ in range(150):
        parts = train_step(model, batch, optimizer, scaler, cfg, state, torch.device("cpu"))
        first = float(parts["ce"]) if first is None else first
    model.eval()
    out = model(images, captions, lengths, "expected")
    final_ce = F.cross_entropy(out["logits"][out["mask"]], out["targets"][out["mask"]]).item()
    assert first > 2.0 and final_ce < 0.1 * first, (first, final_ce)
    if attention == "hard":
        assert state.hard_baseline < 0  # the moving average of log p(y|s,a) was updated


def test_checkpoint_round_trip_weights_only(tmp_path):
    torch.manual_seed(0)
    cfg = tiny_config(attention="hard", gate="vector")
    model = make_model(cfg).eval()
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, build_checkpoint(model, cfg.model_config(), WORD_MAP, cfg=cfg))
    assert not list(tmp_path.glob("*.tmp")), "the temp file was renamed away"
    raw = torch.load(path, weights_only=True)  # plain data only
    assert raw["model_config"]["attention"] == "hard"
    restored, restored_cfg = model_from_checkpoint(load_checkpoint(path))
    assert restored_cfg == cfg.model_config() and restored.decoder.attention.stochastic
    images, captions, lengths = tiny_batch()
    torch.testing.assert_close(restored(images, captions, lengths)["logits"], model(images, captions, lengths)["logits"])


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", None])
def test_bad_checkpoint_gives_one_clear_error(tmp_path, content):
    path = tmp_path / "bad.pt"
    if content is None:
        torch.save({"weights": torch.zeros(1)}, path)  # loadable, but not ours
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=r"bad\.pt: not a"):
        load_checkpoint(path)
    with pytest.raises(ValueError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_config_overrides_are_type_checked(tmp_path):
    cfg = load_config("configs/shapes.yaml", ["epochs=3", "dropout=0.1", "fine_tune_encoder=false", "out_dir=x"])
    assert (cfg.epochs, cfg.dropout, cfg.fine_tune_encoder, cfg.out_dir) == (3, 0.1, False, "x")
    assert cfg.encoder == "resnet18"  # from the YAML file
    with pytest.raises(ValueError, match="unknown key 'epoch'"):
        load_config(None, ["epoch=3"])
    with pytest.raises(ValueError, match="expected an integer"):
        load_config(None, ["epochs=three"])
    with pytest.raises(ValueError, match="expected key=value"):
        load_config(None, ["epochs"])
    with pytest.raises(ValueError, match="attention='glance' is not one of soft, hard"):
        load_config(None, ["attention=glance"])
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("epochs: [1, 2\n")
    with pytest.raises(ValueError, match="bad.yaml: not valid YAML"):
        load_config(str(bad_yaml))
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("learning_rate: 0.1\n")
    with pytest.raises(ValueError, match="unknown.yaml: unknown key 'learning_rate'"):
        load_config(str(unknown))


def test_every_shipped_config_loads():
    import glob

    for path in glob.glob("configs/*.yaml"):
        load_config(path)


# ----------------------------------------------------------------------------------------------
# REINFORCE estimator (Sec. 4.1): unbiased, and the baseline reduces its variance.
# ----------------------------------------------------------------------------------------------
def _reinforce_gradients(logits: torch.Tensor, rewards: torch.Tensor, samples: torch.Tensor, baseline: float):
    """Per-sample gradients of -reinforce_surrogate w.r.t. the logits, i.e. estimates of dE[r]/dlogits."""
    grads = []
    for s in samples.tolist():
        theta = logits.clone().requires_grad_(True)
        log_p = F.log_softmax(theta, dim=0)
        loss = reinforce_surrogate(rewards[s : s + 1], log_p[s : s + 1], baseline, reinforce_weight=1.0)
        (grad,) = torch.autograd.grad(-loss, theta)
        grads.append(grad)
    return torch.stack(grads)


def test_reinforce_gradient_is_unbiased_and_baseline_reduces_variance():
    torch.manual_seed(0)
    logits = torch.tensor([0.3, -0.2, 1.0, 0.0, -1.0], dtype=torch.float64)
    rewards = torch.tensor([-3.0, -2.0, -2.5, -1.0, -4.0], dtype=torch.float64)  # log p(y|s) < 0
    theta = logits.clone().requires_grad_(True)
    expected = (F.softmax(theta, dim=0) * rewards).sum()  # E_s[r(s)], the objective
    (exact,) = torch.autograd.grad(expected, theta)
    samples = torch.multinomial(F.softmax(logits, dim=0), 4000, replacement=True)
    mean_reward = float((F.softmax(logits, 0) * rewards).sum())
    plain = _reinforce_gradients(logits, rewards, samples, baseline=0.0)
    with_baseline = _reinforce_gradients(logits, rewards, samples, baseline=mean_reward)
    for grads in (plain, with_baseline):
        standard_error = grads.std(0) / len(samples) ** 0.5
        assert torch.all((grads.mean(0) - exact).abs() < 4 * standard_error + 1e-3)
    assert with_baseline.var(0).sum() < 0.2 * plain.var(0).sum()


def test_hard_attention_locations_follow_alpha():
    torch.manual_seed(0)
    attention = HardAttention(4, 4, 4)
    features = torch.arange(3 * 4, dtype=torch.float32).view(1, 3, 4).repeat(20000, 1, 1)  # (B, L=3, D=4)
    alpha = torch.tensor([[0.2, 0.5, 0.3]]).repeat(20000, 1)
    z, s = attention.context(features, alpha, "sample")
    assert torch.equal(z, features[torch.arange(20000), s])  # one-hot context: the chosen a_i
    freq = torch.bincount(s, minlength=3).double() / 20000
    torch.testing.assert_close(freq, torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64), atol=0.015, rtol=0)
    z, s = attention.context(features, alpha, "argmax")
    assert torch.all(s == 1)
    z, s = attention.context(features, alpha, "expected")
    assert s is None
    torch.testing.assert_close(z[0], (alpha[0, :, None] * features[0]).sum(0))
