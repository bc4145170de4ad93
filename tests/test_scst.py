"""Self-critical sequence training (objective=scst): baselines, the direction of one update, the sampled
batch, SelfCritical's step (rewards with <end>, each sample paired with its own image, padding masked), a
run that trains, resumes exactly and reports its reward, and one epoch under 2-process gloo torchrun."""
from __future__ import annotations

import csv

import pytest
import torch

from test_rewards import REAL_REFS, WORDS, coco_bleu4, coco_cider, ids
from test_train import torchrun

from satkit.training import losses
import train
from satkit.config import ModelConfig, load_config
from satkit.decoding import Hypothesis
from satkit.training.losses import SelfCritical, sample_batch, scst_baseline, self_critical_loss
from satkit.training.losses import target_log_probs
from satkit.model import build_model
from satkit.training.rewards import DocumentFrequencies, cider_d
from satkit.infra.runtime import UserError

WORD_MAP = {"<pad>": 0, "<unk>": 1, "<start>": 2, "<end>": 3, "a": 4, "red": 5, "blue": 6, "circle": 7}
TINY = ["encoder_stages=2", "enc_size=4", "attention_dim=16", "embed_dim=16", "decoder_dim=32", "batch_size=8",
        "num_workers=0", "max_len=8", "early_stop_patience=0", "fine_tune_encoder=false", "objective=scst",
        "scst_samples=3"]


def test_mean_of_others_baseline_gives_advantages_that_sum_to_zero_per_image():
    rewards = torch.rand(4, 5)
    advantages = rewards - scst_baseline(rewards, "mean")
    torch.testing.assert_close(advantages.sum(dim=1), torch.zeros(4), atol=1e-6, rtol=0)
    # each sample's baseline leaves its own reward out
    torch.testing.assert_close(scst_baseline(rewards, "mean")[0, 0], rewards[0, 1:].mean())
    greedy = torch.tensor([0.1, 0.2, 0.3, 0.4])
    assert torch.equal(scst_baseline(rewards, "greedy", greedy), greedy[:, None].expand(4, 5))


def sequence_log_probs(model, images, captions, caplens) -> torch.Tensor:
    with torch.no_grad():
        out = model(images, captions, caplens)
    return (target_log_probs(out["logits"], out["targets"]) * out["mask"]).sum(dim=1)


def test_one_step_raises_the_better_sample_and_lowers_the_worse():
    torch.manual_seed(0)
    cfg = ModelConfig(encoder="resnet18", encoder_stages=1, enc_size=2, attention_dim=8, embed_dim=8, decoder_dim=16,
                      dropout=0.0, vocab_size=len(WORD_MAP))
    model = build_model(cfg).eval()
    images = torch.randn(1, 3, 32, 32)
    samples = [[Hypothesis([4, 5, 7], -3.0, -3.0, True, torch.zeros(3, 2, 2), torch.zeros(3)),
                Hypothesis([4, 6, 7], -3.0, -3.0, True, torch.zeros(3, 2, 2), torch.zeros(3))]]
    captions, caplens = sample_batch(samples, WORD_MAP)
    assert captions.tolist() == [[[2, 4, 5, 7, 3], [2, 4, 6, 7, 3]]] and caplens.tolist() == [[5, 5]]
    before = sequence_log_probs(model, images, captions, caplens)
    rewards = torch.tensor([1.0, 0.0])  # the red circle is right
    train_cfg = load_config(None, ["alpha_c=0"])
    out = model(images, captions, caplens)
    loss, parts = self_critical_loss(out, rewards, scst_baseline(rewards.view(1, 2), "mean").flatten(), train_cfg)
    assert parts["reward"] == pytest.approx(0.5) and parts["advantage_std"] > 0
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.05 * p.grad
    after = sequence_log_probs(model, images, captions, caplens)
    assert after[0] > before[0] and after[1] < before[1], (before, after)


def test_an_unfinished_sample_is_read_without_end():
    samples = [[Hypothesis([4, 4], -1.0, -1.0, False, torch.zeros(2, 1, 1), torch.zeros(2))]]
    captions, caplens = sample_batch(samples, WORD_MAP)
    assert captions.tolist() == [[[2, 4, 4]]] and caplens.tolist() == [[3]]


# --------------------------------------------------------------------------------------------
# SelfCritical's step, on hand-made samples: rewards, pairing with images, padding
# --------------------------------------------------------------------------------------------
END = WORDS["<end>"]


def hypothesis(words: str, finished: bool = True) -> Hypothesis:
    tokens = ids(words, end=False)
    return Hypothesis(tokens, -1.0, -1.0, finished, torch.zeros(len(tokens), 2, 2), torch.zeros(len(tokens)))


def test_rewards_of_known_captions_count_end_only_for_finished_samples():
    """SelfCritical.rewards equals pycocoevalcap's CIDEr-D (+ 0.5 BLEU-4) of each sample written with
    <end> when it finished and without when max_len cut it: a reference's own words earn less unfinished."""
    hyps = [hypothesis("a man riding a horse"), hypothesis("a man riding a horse", finished=False),
            hypothesis("two dogs play in the snow"), hypothesis("a dog runs on the", finished=False)]
    candidates = [ids("a man riding a horse"), ids("a man riding a horse", end=False),
                  ids("two dogs play in the snow"), ids("a dog runs on the", end=False)]
    references = [REAL_REFS[0], REAL_REFS[0], REAL_REFS[1], REAL_REFS[2]]
    df = DocumentFrequencies.from_references(references)  # as coco_cider's: from the same reference sets
    scst = SelfCritical(None, WORDS, df, load_config(None, ["objective=scst", "scst_bleu_weight=0.5"]))  # no model
    got = scst.rewards(hyps, references).numpy()
    expected = coco_cider(candidates, references) + 0.5 * coco_bleu4(candidates, references)
    torch.testing.assert_close(torch.from_numpy(got).double(), torch.from_numpy(expected), rtol=0, atol=1e-5)
    assert got[0] > got[1] + 0.1  # "horse <end>" ends two references: without <end> it earns nothing


def packed_references(references: list[list[list[int]]], per_image: int) -> tuple[torch.Tensor, torch.Tensor]:
    """References (with <end>) as CaptionDataset's batch holds them: (B, C, T) `<start> w.. <end> <pad>..`, (B, C)."""
    chosen = [refs[:per_image] for refs in references]
    width = 1 + max(len(r) for refs in chosen for r in refs)
    captions = torch.full((len(chosen), per_image, width), WORDS["<pad>"], dtype=torch.long)
    for b, refs in enumerate(chosen):
        for c, ref in enumerate(refs):
            captions[b, c, : len(ref) + 1] = torch.tensor([WORDS["<start>"], *ref])
    return captions, torch.tensor([[len(r) + 1 for r in refs] for refs in chosen])


def words_model() -> torch.nn.Module:
    """A tiny seeded model over test_rewards' WORDS, in eval mode (no dropout), as SCST samples and re-reads."""
    torch.manual_seed(0)
    return build_model(ModelConfig(encoder="resnet18", encoder_stages=1, enc_size=2, attention_dim=8, embed_dim=8,
                                   decoder_dim=16, dropout=0.0, vocab_size=len(WORDS))).eval()


def caption_log_prob(model: torch.nn.Module, image: torch.Tensor, hyp: Hypothesis) -> torch.Tensor:
    """log p(w_1..T <end> | image) of one sample, teacher-forced on that image alone."""
    captions, caplens = sample_batch([[hyp]], WORDS)
    out = model(image[None], captions, caplens)
    return (target_log_probs(out["logits"], out["targets"]) * out["mask"]).sum()


@pytest.mark.parametrize("baseline", ["mean", "greedy"])
def test_each_sample_is_scored_and_re_read_with_its_own_image(baseline, monkeypatch):
    """B=3 images, K=2 samples each, samples flattened image by image: each sample's reward is against its
    own image's references and its log-probability is given its own image (the loss pins both), and the
    greedy baseline is its own image's greedy caption's reward."""
    model = words_model()
    images = torch.randn(3, 3, 32, 32) * torch.tensor([3.0, 0.0, -3.0])[:, None, None, None]
    references = [refs[:3] for refs in REAL_REFS]
    captions, caplens = packed_references(references, 3)
    samples = [[hypothesis("a man riding a horse"), hypothesis("two dogs in the snow")],
               [hypothesis("dogs play in the snow"), hypothesis("a man on a horse", finished=False)],
               [hypothesis("a dog on the grass"), hypothesis("a black dog")]]
    greedy = [[hypothesis("a man on a horse")], [hypothesis("two dogs")], [hypothesis("a dog runs", finished=False)]]

    def decode(model_, features, word_map, *, beam_size, max_len, n_best=1, sample=False):
        assert features.shape[0] == 3 and (beam_size, n_best) == ((2, 2) if sample else (1, 1))
        return samples if sample else greedy

    monkeypatch.setattr(losses, "beam_search", decode)
    df = DocumentFrequencies.from_references(REAL_REFS)
    cfg = load_config(None, ["objective=scst", "scst_samples=2", f"scst_baseline={baseline}", "alpha_c=0"])
    batch = {"image": images, "captions": captions, "caplens": caplens}
    loss, parts = SelfCritical(model, WORDS, df, cfg)(model, batch, torch.device("cpu"))

    def end_counted(h: Hypothesis) -> list[int]:
        return h.tokens + [END] if h.finished else h.tokens

    rewards = torch.tensor([[cider_d([end_counted(h)], [references[b]], df)[0] for h in hyps]
                            for b, hyps in enumerate(samples)], dtype=torch.float32)  # (B, K)
    greedy_rewards = torch.tensor([cider_d([end_counted(h)], [references[b]], df)[0] for b, (h,) in enumerate(greedy)],
                                  dtype=torch.float32)
    base = scst_baseline(rewards, baseline, greedy_rewards)
    with torch.no_grad():
        log_probs = torch.stack([torch.stack([caption_log_prob(model, images[b], h) for h in hyps])
                                 for b, hyps in enumerate(samples)])  # (B, K)
        swapped = torch.stack([caption_log_prob(model, images[(b + 1) % 3], h) for b, hyps in enumerate(samples)
                               for h in hyps]).view(3, 2)  # each sample given the next image
    assert parts["reward"] == pytest.approx(float(rewards.mean()), abs=1e-6)
    assert parts["baseline"] == pytest.approx(float(base.mean()), abs=1e-6)
    expected = -((rewards - base) * log_probs).mean()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)
    # The pairings a bug could mix up give other losses here: the flat samples against the references
    # repeated batch-wise (sample i with image i % B), or each sample re-read given the next image.
    mixed = torch.tensor([cider_d([end_counted(h)], [references[(2 * b + k) % 3]], df)[0]
                          for b, hyps in enumerate(samples) for k, h in enumerate(hyps)]).view(3, 2).float()
    assert abs(float(-((mixed - scst_baseline(mixed, baseline, greedy_rewards)) * log_probs).mean() - expected)) > 0.1
    assert abs(float(-((rewards - base) * swapped).mean() - expected)) > 1e-3


def test_padding_is_masked_out_of_the_loss_and_the_entropy():
    """Samples of 1, 5 and 3 words in one batch: each caption's log-probability sums its own words and
    <end> only. Summing over the <pad> steps as well would give another loss here."""
    model = words_model()
    images = torch.randn(1, 3, 32, 32)
    hyps = [hypothesis("dogs"), hypothesis("a man riding a horse"), hypothesis("a black dog", finished=False)]
    captions, caplens = sample_batch([hyps], WORDS)
    assert caplens.tolist() == [[3, 7, 4]]
    rewards, baseline = torch.tensor([1.0, 0.5, -2.0]), torch.tensor([0.2, 0.2, 0.2])
    out = model(images, captions, caplens)
    loss, parts = self_critical_loss(out, rewards, baseline, load_config(None, ["alpha_c=0"]))
    log_probs = target_log_probs(out["logits"], out["targets"]).detach()  # (3, 6)
    own = torch.stack([log_probs[i, : int(n) - 1].sum() for i, n in enumerate(caplens.flatten())])
    expected = -((rewards - baseline) * own).mean()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)
    unmasked = -((rewards - baseline) * log_probs.sum(dim=1)).mean()
    assert abs(float(unmasked - expected)) > 0.1  # the <pad> steps weigh in this batch
    log_p = torch.log_softmax(out["logits"].detach(), dim=2)
    per_step = -(log_p.exp() * log_p).sum(dim=2)  # (3, 6)
    real = torch.cat([per_step[i, : int(n) - 1] for i, n in enumerate(caplens.flatten())])
    assert parts["entropy"] == pytest.approx(float(real.mean()), abs=1e-5)


def run_scst(folder, out, *extra):
    return train.main(["--config", "configs/shapes.yaml", f"data_folder={folder}", f"out_dir={out}", *TINY, *extra])


def test_scst_run_logs_its_reward(shapes_folder, tmp_path):
    """metrics.csv carries the reward, baseline, advantage spread and entropy (exact resume in the SCST
    phase: tests/test_train.py::test_resume_is_exact[scst])."""
    assert run_scst(shapes_folder, tmp_path / "run", "epochs=1") == 0
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert {"train_reward", "train_baseline", "train_advantage_std", "train_entropy", "val_bad_endings"} <= set(rows[0])
    assert float(rows[0]["train_reward"]) >= 0.0 and float(rows[0]["train_entropy"]) > 0.0
    assert (tmp_path / "run" / "curves.png").is_file()


def test_one_scst_epoch_under_two_process_gloo_torchrun(shapes_folder, tmp_path):
    """The shipped SCST config, hard attention, frozen encoder (so the feature cache): several steps per
    rank, where DDP refuses a step after one that left a parameter without gradient, then validation."""
    out = tmp_path / "ddp"
    result = torchrun("--config", "configs/shapes_scst.yaml", f"data_folder={shapes_folder}", f"out_dir={out}",
                      *TINY, "batch_size=4", "epochs=1", "device=cpu", "attention=hard")
    assert result.stdout.count("epoch 1: loss") == 1 and "2 process(es)" in result.stdout  # rank 0 prints
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["train_state"]["step"] == 3  # 30 train images -> 15 per rank, 4 per step: 3 steps per rank
    assert ckpt["train_config"]["objective"] == "scst" and ckpt["model_config"]["attention"] == "hard"
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert len(rows) == 1 and float(rows[0]["train_reward"]) >= 0.0 and float(rows[0]["train_entropy"]) > 0.0


@pytest.mark.parametrize("override,message", [
    (["scst_baseline=mean", "scst_samples=1"], "scst_baseline=mean needs scst_samples >= 2"),
    (["concept_loss_weight=1"], "objective=scst trains on the captions' reward alone"),
])
def test_scst_settings_that_cannot_work_are_one_line(override, message, shapes_folder, tmp_path, capsys):
    assert run_scst(shapes_folder, tmp_path / "run", *override) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1


def test_baseline_kinds_are_checked():
    with pytest.raises(ValueError, match="scst_baseline"):
        scst_baseline(torch.zeros(1, 2), "median")
    with pytest.raises(UserError, match="not one of greedy, mean"):
        load_config(None, ["scst_baseline=median"])
