"""Every trainable parameter gets a gradient from one training step, for every shipped config.

DistributedDataParallel refuses to start a step while a parameter of the previous one got no gradient
(the attention's score bias once did: a constant the softmax cancels), so a parameter that cannot affect
the loss breaks every multi-process run at its second step. This guard covers the whole class: each
config of configs/, shrunk to tiny sizes, with both attention variants (hard with sampled and expected
context), with and without the concept head, and from cached annotations where the encoder is frozen.
The SCST configs run their own step (losses.SelfCritical: sampling, rewards, re-reading) as they train;
one SCST epoch under 2-process DDP is in tests/test_scst.py.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from satkit.training import trainer
from satkit.config import load_config
from satkit.training.losses import SelfCritical
from satkit.model import build_model
from satkit.training.rewards import DocumentFrequencies, reference_ids

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))
# Only the sizes shrink: the structure of each config (gate, deep output, trained stages, losses) stays.
TINY = {"encoder": "resnet18", "enc_size": 2, "attention_dim": 8, "embed_dim": 8, "decoder_dim": 8,
        "encoder_weights": "none", "vocab_size": 12, "amp": "off", "device": "cpu", "grad_clip": 1.0}


def tiny_config(name: str, **changes):
    cfg = load_config(str(ROOT / "configs" / name))
    for key, value in {**TINY, **changes}.items():
        setattr(cfg, key, value)
    cfg.encoder_stages = min(cfg.encoder_stages, 2)
    cfg.fine_tune_stages = min(cfg.fine_tune_stages, cfg.encoder_stages)
    return cfg


def one_step_without_gradient(cfg, context_mode: str, cached: bool) -> list[str]:
    """Names of the trainable parameters that one trainer.train_step leaves without a gradient."""
    torch.manual_seed(0)
    word_map = {**{t: i for i, t in enumerate(("<pad>", "<unk>", "<start>", "<end>"))},
                **{f"w{i}": i for i in range(4, cfg.vocab_size)}}
    model = build_model(cfg.model_config(), encoder_weights="none", fine_tune=cfg.fine_tune_encoder,
                        fine_tune_stages=cfg.fine_tune_stages)
    trained = trainer.ConceptHead(model, word_map) if cfg.concept_loss_weight > 0 else model
    optimizer = torch.optim.SGD([p for p in trained.parameters() if p.requires_grad], lr=0.0)
    images = torch.randn(2, 3, 32, 32)
    if cached:  # the feature cache hands the decoder the frozen encoder's annotations (B, L, D)
        with torch.no_grad():
            images = model.encoder(images)
    captions = torch.randint(4, cfg.vocab_size, (2, 2, 7))
    captions[..., 0], captions[..., 6] = word_map["<start>"], word_map["<end>"]
    batch = {"image": images, "captions": captions, "caplens": torch.full((2, 2), 7)}
    # hard_expected_prob decides per step between sampled and expected context: force the one asked for
    cfg.hard_expected_prob = 0.0 if context_mode == "sample" else 1.0
    objective = None
    if cfg.objective == "scst":  # rewarded against the batch's own captions as references
        df = DocumentFrequencies.from_references(reference_ids(captions, batch["caplens"]))
        objective = SelfCritical(model, word_map, df, cfg)
    parts = trainer.train_step(trained, batch, optimizer, torch.amp.GradScaler("cpu", enabled=False), cfg,
                             trainer.TrainState(), torch.device("cpu"), objective)
    assert parts and torch.isfinite(parts["loss"])
    assert ("reward" in parts) == (cfg.objective == "scst")  # the config's own objective ran
    return [name for name, p in trained.named_parameters() if p.requires_grad and p.grad is None]


# SCST re-reads its samples with the expected context (sampled locations are an XE-phase trick) and
# refuses the concept head, so its configs run neither.
SCST = {name for name in CONFIGS if load_config(str(ROOT / "configs" / name)).objective == "scst"}
CASES = [(name, attention, context, concept, cached)
         for name in CONFIGS for attention in ("soft", "hard")
         for context in (("expected", "sample") if attention == "hard" and name not in SCST else ("expected",))
         for concept in ((0.0,) if name in SCST else (0.0, 1.0)) for cached in (False, True)]


@pytest.mark.parametrize("name,attention,context,concept,cached", CASES)
def test_every_trainable_parameter_gets_a_gradient(name, attention, context, concept, cached):
    cfg = tiny_config(name, attention=attention, concept_loss_weight=concept)
    if cached and cfg.fine_tune_encoder:
        pytest.skip("the feature cache serves frozen encoders only")
    missing = one_step_without_gradient(cfg, context, cached)
    assert not missing, f"{name} ({attention}, {context}, concept {concept}): no gradient for {', '.join(missing)}"


def test_the_guard_names_a_parameter_that_gets_no_gradient(monkeypatch):
    """The check of the check: a parameter outside the loss's graph is reported by name."""
    original = build_model

    def with_an_unused_parameter(*args, **kwargs):
        model = original(*args, **kwargs)
        model.decoder.unused = torch.nn.Parameter(torch.zeros(3))
        return model

    monkeypatch.setitem(globals(), "build_model", with_an_unused_parameter)
    assert one_step_without_gradient(tiny_config("shapes.yaml"), "expected", False) == ["decoder.unused"]
    assert one_step_without_gradient(tiny_config("shapes_scst.yaml"), "expected", False) == ["decoder.unused"]
