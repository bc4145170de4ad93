"""Training objectives in one place: cross-entropy, the doubly stochastic regulariser (Sec. 4.2.1),
REINFORCE for hard attention (Sec. 4.1), the concept loss, and self-critical sequence training (SCST,
Rennie et al. 2017). The next objective goes here."""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from satkit.attention import is_stochastic
from satkit.config import Config
from satkit.decoding import Hypothesis, beam_search
from satkit.model import ShowAttendTell
from satkit.training.rewards import reference_ids, scst_rewards
from satkit.data.text import SPECIAL_TOKENS


# --------------------------------------------------------------------------------------------
# Training objectives
# --------------------------------------------------------------------------------------------
def doubly_stochastic_penalty(alphas: torch.Tensor, mask: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """lambda-free regulariser sum_i (1 - sum_t alpha_ti)^2 (Sec. 4.2.1), averaged over captions.

    The sum over t runs over real (unpadded) steps only. `reduction="sum"` is the paper's sum over
    locations i; "mean" divides it by L, as the popular PyTorch tutorial does. With L locations and
    fewer words than locations no cell can reach 1, so the summed form pulls attention toward uniform.
    """
    attention_per_location = (alphas * mask.unsqueeze(2).to(alphas.dtype)).sum(dim=1)  # (N, L)
    per_location = (1.0 - attention_per_location) ** 2  # (N, L)
    if reduction == "sum":
        return per_location.sum(dim=1).mean()
    if reduction == "mean":
        return per_location.mean(dim=1).mean()
    raise ValueError(f"ds_reduction={reduction!r} is not one of sum, mean")


def normalised_attention_entropy(entropy: torch.Tensor, mask: torch.Tensor, num_locations: int) -> torch.Tensor:
    """Mean H(alpha_t) / log L over real steps: 1 is uniform attention, 0 one location. Not in the paper."""
    if num_locations < 2:
        return entropy.new_zeros(())
    return (entropy * mask).sum() / mask.sum().clamp_min(1) / math.log(num_locations)


def reinforce_surrogate(
    log_lik: torch.Tensor, log_p_s: torch.Tensor, baseline: float | torch.Tensor, reinforce_weight: float
) -> torch.Tensor:
    """A loss whose gradient is -lambda_r (log p(y|s,a) - b) d log p(s|a)/dW (Sec. 4.1, Eq. 12).

    Args:
        log_lik: (N,) log p(y|s~,a) per sample; treated as a constant reward (detached).
        log_p_s: (N,) log p(s~|a) of the sampled locations, summed over steps.
        baseline: the moving-average baseline b.
    """
    advantage = (log_lik.detach() - baseline)  # (N,)
    return -(reinforce_weight * advantage * log_p_s).mean()


def target_log_probs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(y_t | a, y_<t) of each target word, (N, T), in fp32 even under autocast."""
    return F.log_softmax(logits.float(), dim=2).gather(2, targets.unsqueeze(2)).squeeze(2)


class ConceptHead(nn.Module):
    """Training only, not in the paper: the model plus a linear head that predicts, from each image's mean
    annotation vector, which words its captions use (a bag of words over the vocabulary).

    A random-init encoder learns from the caption loss alone only through attention and the initial
    LSTM state, and on a small dataset the decoder then settles for one caption that fits every image.
    This direct per-image signal trains the encoder to recognise what captions talk about (dogs, water,
    snow), the role ImageNet pretraining plays in the paper. The head is dropped from the saved model.
    """

    def __init__(self, model: ShowAttendTell, word_map: dict[str, int]) -> None:
        super().__init__()
        self.model = model
        self.head = nn.Linear(model.encoder.out_dim, len(word_map))
        self.ignore = [word_map[token] for token in SPECIAL_TOKENS]  # never a concept

    def targets(self, captions: torch.Tensor) -> torch.Tensor:
        """(B, C, T+1) word ids -> (B, V): each word used by any of an image's captions, weights summing to 1."""
        present = torch.zeros(captions.size(0), self.head.out_features, device=captions.device)
        present.scatter_(1, captions.flatten(1), 1.0)
        present[:, self.ignore] = 0.0
        return present / present.sum(dim=1, keepdim=True).clamp_min(1.0)

    def forward(self, images: torch.Tensor, captions: torch.Tensor, caplens: torch.Tensor,
                context_mode: str = "expected") -> dict[str, torch.Tensor]:
        out = self.model(images, captions, caplens, context_mode)
        out["concept_logits"] = self.head(out["mean_annotation"])  # (B, V)
        return out


def compute_loss(out: dict[str, torch.Tensor], cfg: Config, hard_baseline: float | torch.Tensor,
                 concepts: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Cross-entropy over real words + doubly stochastic term (+ REINFORCE and entropy for hard)
    (+ the concept loss against `concepts` (B, V) when the model has a ConceptHead).

    `out` is the model's teacher-forced output. Returns the loss and detached parts; for sampled hard
    attention, parts["log_lik"] is the batch's mean per-word log p(y|s,a), which updates the baseline.
    """
    mask = out["mask"]  # (N, T)
    log_probs = target_log_probs(out["logits"], out["targets"])  # (N, T), shared by CE and the reward
    ce = -log_probs[mask].mean()  # cross-entropy, mean over real words
    ds = doubly_stochastic_penalty(out["alphas"], mask, cfg.ds_reduction)
    loss = ce + cfg.alpha_c * ds
    parts = {"ce": ce.detach(), "ds": ds.detach()}
    # Logged always (how flat attention is while training: 1 is uniform); a loss term only when weighted.
    attention_entropy = normalised_attention_entropy(out["entropy"], mask, out["alphas"].size(2))
    parts["attention_entropy"] = attention_entropy.detach()
    if cfg.attention_entropy_weight > 0:
        loss = loss + cfg.attention_entropy_weight * attention_entropy
    if is_stochastic(cfg.attention):
        num_words = mask.sum(dim=1).clamp_min(1)  # (N,)
        # Entropy bonus lambda_e * H[s] (Eq. 12), averaged over real steps.
        loss = loss - cfg.hard_entropy_weight * (out["entropy"] * mask).sum() / num_words.sum()
        if "log_p_s" in out:
            # Reward log p(y|s,a) per word, as the original code (it averages the cost over time).
            log_lik = (log_probs * mask).sum(dim=1) / num_words  # (N,)
            log_p_s = (out["log_p_s"] * mask).sum(dim=1)  # (N,) log p(s|a) over real steps
            loss = loss + reinforce_surrogate(log_lik, log_p_s, hard_baseline, cfg.hard_reinforce_weight)
            parts["log_lik"] = log_lik.detach().mean()
    if concepts is not None:
        concept = -(concepts * F.log_softmax(out["concept_logits"].float(), dim=1)).sum(dim=1).mean()
        loss = loss + cfg.concept_loss_weight * concept
        parts["concept"] = concept.detach()
    # Detached tensors, not floats: converting would force a GPU sync every step.
    parts["loss"] = loss.detach()
    return loss, parts


# --------------------------------------------------------------------------------------------
# Self-critical sequence training (objective=scst)
# --------------------------------------------------------------------------------------------
SCST_PARTS = ("loss", "reward", "baseline", "advantage_std", "entropy", "ds")  # logged per epoch
XE_PARTS = ("loss", "ce", "ds", "attention_entropy", "concept")  # loss parts averaged over an epoch (train_* in metrics.csv)


def epoch_parts(cfg: Config) -> tuple[str, ...]:
    """The loss parts an epoch averages and metrics.csv records (train_*), by objective: here, beside the
    objectives, so that the trainer and the log both read it without the log importing the trainer."""
    return SCST_PARTS if cfg.objective == "scst" else XE_PARTS


def scst_baseline(rewards: torch.Tensor, kind: str, greedy_rewards: torch.Tensor | None = None) -> torch.Tensor:
    """b for each of K samples of B images, rewards (B, K): the reward of the image's greedy caption
    (Rennie et al.), or the mean reward of its other K-1 samples ("new self-critical"), whose advantages
    then sum to zero per image."""
    if kind == "greedy":
        return greedy_rewards[:, None].expand_as(rewards)
    if kind == "mean":
        return (rewards.sum(dim=1, keepdim=True) - rewards) / (rewards.size(1) - 1)
    raise ValueError(f"scst_baseline={kind!r} is not one of greedy, mean")


def self_critical_loss(out: dict[str, torch.Tensor], rewards: torch.Tensor, baseline: torch.Tensor,
                       cfg: Config) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """REINFORCE with a baseline: the gradient of -(r - b) log p(w_1..T | I) per sampled caption, averaged
    over captions (+ the doubly stochastic term on the same captions' attention).

    `out` is the model's teacher-forced output on the sampled captions (N rows); rewards and baseline (N,).
    """
    mask = out["mask"]  # (N, T)
    log_probs = target_log_probs(out["logits"], out["targets"])  # (N, T)
    advantage = (rewards - baseline).to(log_probs.dtype)  # (N,)
    policy = -(advantage * (log_probs * mask).sum(dim=1)).mean()
    ds = doubly_stochastic_penalty(out["alphas"], mask, cfg.ds_reduction)
    with torch.no_grad():  # the policy's entropy per word: falling fast means the samples stop exploring
        log_p = F.log_softmax(out["logits"].float(), dim=2)  # (N, T, V)
        entropy = -(log_p.exp() * log_p).sum(dim=2)[mask].mean()
    loss = policy + cfg.alpha_c * ds
    parts = {"loss": loss.detach(), "reward": rewards.mean(), "baseline": baseline.float().mean(),
             "advantage_std": advantage.std() if advantage.numel() > 1 else advantage.new_zeros(()),
             "entropy": entropy, "ds": ds.detach()}
    return loss, parts


class SelfCritical:
    """objective=scst, one step: K captions per image sampled with the decode path (no autograd graph),
    their rewards (CIDEr-D, + BLEU-4) against the image's references, the baseline (a greedy decode, also
    without a graph, or the other samples), then the samples re-read with teacher forcing through the
    one Decoder.step to get log p(w | I) with a graph.

    The policy is the model as it decodes: sampling and re-reading run in eval mode (no dropout), so the
    re-read log-probabilities are those the samples were drawn from. Hard attention takes the expected
    context here (as its decoding does): its location REINFORCE terms are not used in this phase, the
    caption reward trains attention through the expectation, as for soft attention.
    """

    def __init__(self, model: ShowAttendTell, word_map: dict[str, int], document_frequencies: Any,
                 cfg: Config) -> None:
        self.model, self.word_map, self.df, self.cfg = model, word_map, document_frequencies, cfg
        self.end = word_map["<end>"]

    def __call__(self, ddp_model: nn.Module, batch: dict[str, Any], device: torch.device
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg, k = self.cfg, self.cfg.scst_samples
        self.model.eval()
        images = batch["image"].to(device, non_blocking=True)  # (B, 3, S, S), or cached annotations (B, L, D)
        references = reference_ids(batch["captions"], batch["caplens"])
        with torch.no_grad():
            features = self.model.encode(images)  # (B, L, D)
            samples = beam_search(self.model, features, self.word_map, beam_size=k, n_best=k, sample=True,
                                  max_len=cfg.max_len)
            rewards = self.rewards([h for hyps in samples for h in hyps], [r for r in references for _ in range(k)])
            greedy = None
            if cfg.scst_baseline == "greedy":
                best = beam_search(self.model, features, self.word_map, beam_size=1, max_len=cfg.max_len)
                greedy = self.rewards([hyps[0] for hyps in best], references)
        rewards = rewards.view(-1, k)  # (B, K)
        baseline = scst_baseline(rewards, cfg.scst_baseline, greedy)
        captions, caplens = sample_batch(samples, self.word_map)  # (B, K, T+1), (B, K)
        out = ddp_model(images, captions.to(device), caplens, "expected")
        return self_critical_loss(out, rewards.flatten().to(device), baseline.flatten().to(device), cfg)

    def rewards(self, hypotheses: list[Hypothesis], references: list[list[list[int]]]) -> torch.Tensor:
        """(N,) CIDEr-D (+ BLEU-4) of each hypothesis; <end> counts as a word (see rewards.py)."""
        candidates = [h.tokens + [self.end] if h.finished else list(h.tokens) for h in hypotheses]
        return torch.from_numpy(scst_rewards(candidates, references, self.df, self.cfg.scst_bleu_weight)).float()


def sample_batch(samples: list[list[Hypothesis]], word_map: dict[str, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampled hypotheses (B lists of K) as a teacher-forcing batch: captions (B, K, T+1) `<start> w.. <end>
    <pad>..` (no <end> for a sample cut at max_len) and caplens (B, K) counting <start> and <end>."""
    rows = [[word_map["<start>"], *h.tokens, *([word_map["<end>"]] if h.finished else [])]
            for hyps in samples for h in hyps]
    captions = torch.full((len(rows), max(map(len, rows))), word_map["<pad>"], dtype=torch.long)
    for i, row in enumerate(rows):
        captions[i, : len(row)] = torch.tensor(row)
    caplens = torch.tensor([len(row) for row in rows])
    k = len(samples[0])
    return captions.view(len(samples), k, -1), caplens.view(len(samples), k)
