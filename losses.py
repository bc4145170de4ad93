"""Training objectives in one place: cross-entropy, the doubly stochastic regulariser (Sec. 4.2.1),
REINFORCE for hard attention (Sec. 4.1) and the concept loss. The next objective goes here."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from attention import is_stochastic
from config import Config
from models import ShowAttendTell
from text import SPECIAL_TOKENS


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
