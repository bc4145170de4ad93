"""Attention variants: f_att scores the L locations (alpha_t), the variant turns alpha_t into the context z_t.

A new variant is one class here (or in your own file) plus `@register_attention("name")`: the config key
`attention` accepts every registered name, and training, decoding, captioning and eval ask the class's
`stochastic` flag (does it sample locations s_t, trained by REINFORCE?) rather than its name.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

ATTENTIONS: dict[str, type["SoftAttention"]] = {}  # name -> class; the config's `attention` choices


def register_attention(name: str) -> Callable[[type], type]:
    """Class decorator: make an attention variant available as `attention: NAME` in configs. A name already
    taken is a ValueError (a bug in the registering code), as for scoring.register_metric."""
    def register(cls: type) -> type:
        if name in ATTENTIONS and ATTENTIONS[name] is not cls:
            raise ValueError(f"attention {name!r} already registered ({ATTENTIONS[name].__qualname__})")
        ATTENTIONS[name] = cls
        return cls
    return register


def is_stochastic(name: str) -> bool:
    """Whether the variant `name` samples locations (hard attention's REINFORCE training and decode modes)."""
    return ATTENTIONS[name].stochastic


# --------------------------------------------------------------------------------------------
# Attention: f_att scores the locations; the variant decides how alpha becomes the context z_t.
# --------------------------------------------------------------------------------------------
@register_attention("soft")
class SoftAttention(nn.Module):
    """Deterministic soft attention (Sec. 4.2): z_t = sum_i alpha_ti a_i, trained by backprop."""

    stochastic = False  # z_t is the expectation: trained by backprop alone

    def __init__(self, encoder_dim: int, decoder_dim: int, attention_dim: int) -> None:
        super().__init__()
        self.features_att = nn.Linear(encoder_dim, attention_dim)
        self.hidden_att = nn.Linear(decoder_dim, attention_dim)
        # w of f_att. The paper's bias b adds the same constant to every location's score, which the
        # softmax cancels: it could never receive a gradient (and DDP refuses a parameter that gets none).
        self.score = nn.Linear(attention_dim, 1, bias=False)
        torch.empty(1).uniform_()  # the draw the bias's init took: a seed gives the same weights as before

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        """Checkpoints written before the bias was dropped carry `score.bias`: it changed no alpha, so it is
        discarded on load (as BatchNorm upgrades its old state dicts)."""
        state_dict.pop(prefix + "score.bias", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """The h-independent half of f_att, computed once per image rather than every step."""
        return self.features_att(features)  # (B, L, A)

    def weights(self, features_proj: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """alpha_t = softmax_i f_att(a_i, h_{t-1}) for N = B*r rows of h sharing B images' projections.

        f_att = w^T tanh(W_a a_i + W_h h) + b. As tanh(x) = 2 sigmoid(2x) - 1 and a softmax ignores a
        constant, the scores are computed as 2 w^T sigmoid(2 (W_a a_i + W_h h)): the same alpha, and
        sigmoid is ~6x faster than tanh on a CPU (measured: 2.3 vs 0.38 G elements/s a core). The
        (B, r, L, A) pre-activation is a step's largest tensor: it is transformed in place, and without
        autograd on a CPU it is built one image at a time so that it stays in the cache.
        """
        groups, num_locations, attention_dim = features_proj.shape
        att_h = self.hidden_att(h).view(groups, -1, 1, attention_dim)  # (B, r, 1, A)
        if torch.is_grad_enabled() or features_proj.device.type != "cpu":
            gate = torch.sigmoid_((features_proj.unsqueeze(1) + att_h).mul_(2.0))  # (B, r, L, A)
            e = F.linear(gate, self.score.weight)  # (B, r, L, 1)
        else:
            e = features_proj.new_empty(groups, att_h.size(1), num_locations, 1)
            gate = features_proj.new_empty(att_h.size(1), num_locations, attention_dim)
            for g in range(groups):
                torch.add(features_proj[g], att_h[g], out=gate).mul_(2.0).sigmoid_()  # (r, L, A)
                torch.matmul(gate, self.score.weight.t(), out=e[g])  # (r, L, 1)
        e = 2.0 * e.view(h.size(0), num_locations).float()  # (N, L): f_att up to a constant per row
        return F.softmax(e, dim=1)  # fp32 even under autocast

    def context(
        self, features: torch.Tensor, alpha: torch.Tensor, context_mode: str
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns z_t (N, D) and, for sampled locations, s_t (N,) (None when z_t is the expectation)."""
        del context_mode  # soft attention always takes the expectation
        return _expected_context(features, alpha), None


@register_attention("hard")
class HardAttention(SoftAttention):
    """Stochastic hard attention (Sec. 4.1): s_t ~ Multinoulli(alpha_t), z_t = a_{s_t}.

    Context modes: "sample" (training, and optional decoding), "expected" (the expectation, as the paper's
    variance-reduction trick and the original code's decoding do), "argmax" (most likely location).
    """

    stochastic = True  # samples s_t in training: REINFORCE terms in losses.compute_loss

    def context(
        self, features: torch.Tensor, alpha: torch.Tensor, context_mode: str
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if context_mode == "expected":
            return _expected_context(features, alpha), None
        if context_mode == "sample":
            s = torch.multinomial(alpha.float(), 1).squeeze(1)  # (B,)
        elif context_mode == "argmax":
            s = alpha.argmax(dim=1)  # (B,)
        else:
            raise ValueError(f"hard attention context mode {context_mode!r} is not one of sample, expected, argmax")
        rows_per_image = alpha.size(0) // features.size(0)
        image = torch.arange(alpha.size(0), device=features.device) // rows_per_image  # (N,)
        return features[image, s], s  # (N, D), (N,)


def _expected_context(features: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """z_t = sum_i alpha_ti a_i for N = B*r rows of alpha over B images: one (r, L) x (L, D) product per image."""
    groups, num_locations, _ = features.shape
    z = torch.bmm(alpha.view(groups, -1, num_locations).to(features.dtype), features)  # (B, r, D)
    return z.view(alpha.size(0), -1)  # (N, D)
