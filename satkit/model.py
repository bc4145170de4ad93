"""Show, Attend and Tell (Xu et al. 2015): a CNN encoder (encoders.py: ResNets, EfficientNet-Lite) and the
attention LSTM decoder (attention variants in attention.py, beam search in decoding.py, the losses in losses.py).

Symbols follow the paper: a (B, L, D) annotation vectors of B images, L = enc_size**2 locations, D encoder
channels; per decoded row (N = B*r rows: an image's r captions or beams) alpha_t (N, L) attention weights,
beta_t the gate, z_t (N, D) context, h_t, c_t (N, n) LSTM state;
E the m-dim word embedding; V the vocabulary size; T decoding steps.

One function, `Decoder.step`, advances the decoder by one word. Teacher-forced training, greedy decoding,
beam search and both attention variants all call it, so they cannot drift apart.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
import torch.nn as nn

from satkit.attention import ATTENTIONS
from satkit.encoders import ImageEncoder, ResNetEncoder, WeightsDownloadError, build_encoder, first_detail

from satkit.checkpoints import load_checkpoint, model_config_from_checkpoint
from satkit.config import ModelConfig
from satkit.plugins import check_plugins
from satkit.infra.runtime import UserError
from satkit.data.text import SPECIAL_TOKENS

__all__ = [
    "Encoder",
    "ImageEncoder",
    "WeightsDownloadError",
    "Decoder",
    "ShowAttendTell",
    "build_model",
    "model_from_checkpoint",
    "load_model",
    "StepOutput",
]

Encoder = ResNetEncoder  # the name before encoders.py (a ResNet); kept for code that imports it


# --------------------------------------------------------------------------------------------
# Decoder
# --------------------------------------------------------------------------------------------
class StepOutput(NamedTuple):
    logits: torch.Tensor  # (N, V) unnormalised log p(y_t | a, y_<t)
    state: tuple[torch.Tensor, torch.Tensor]  # (h_t, c_t), each (N, n)
    alpha: torch.Tensor  # (N, L)
    beta: torch.Tensor  # (N, 1) scalar gate, (N, D) vector gate, or ones (N, 1) without a gate
    location: torch.Tensor | None  # (N,) sampled/argmax location s_t, None for the expected context


class Decoder(nn.Module):
    """The attention LSTM of Sec. 3.1.2 with the gate beta_t and the deep output layer (Eq. 7)."""

    def __init__(
        self,
        *,
        vocab_size: int,
        encoder_dim: int,
        attention: str = "soft",
        attention_dim: int = 512,
        embed_dim: int = 512,
        decoder_dim: int = 512,
        dropout: float = 0.5,
        gate: str = "scalar",
        deep_output: bool = True,
    ) -> None:
        super().__init__()
        attention_cls = ATTENTIONS.get(attention)
        if attention_cls is None:
            raise ValueError(f"attention={attention!r} is not one of {', '.join(ATTENTIONS)}")
        if gate not in ("scalar", "vector", "none"):
            raise ValueError(f"gate={gate!r} is not one of scalar, vector, none")
        self.vocab_size, self.deep_output = vocab_size, deep_output
        self.attention = attention_cls(encoder_dim, decoder_dim, attention_dim)
        self.embedding = nn.Embedding(vocab_size, embed_dim)  # E
        # c_0, h_0 from the mean annotation through two separate layers (Sec. 3.1.2).
        self.init_h = nn.Linear(encoder_dim, decoder_dim)
        self.init_c = nn.Linear(encoder_dim, decoder_dim)
        # Paper: a scalar beta_t = sigmoid(f_beta(h_{t-1})); a size-D vector is a common variant.
        self.f_beta = nn.Linear(decoder_dim, 1 if gate == "scalar" else encoder_dim) if gate != "none" else None
        self.lstm = nn.LSTMCell(embed_dim + encoder_dim, decoder_dim)  # input [E y_{t-1}; z_t]
        self.dropout = nn.Dropout(dropout)
        if deep_output:
            # p(y_t) ∝ exp(L_o(E y_{t-1} + L_h h_t + L_z z_t)), Eq. 7. The paper writes it without a
            # nonlinearity inside L_o(...), so none is added (the original Theano code applies tanh).
            self.L_h = nn.Linear(decoder_dim, embed_dim)
            self.L_z = nn.Linear(encoder_dim, embed_dim)
            self.L_o = nn.Linear(embed_dim, vocab_size)
        else:
            self.fc = nn.Linear(decoder_dim, vocab_size)  # the plain output of most PyTorch ports
        self.embedding.weight.data.uniform_(-0.1, 0.1)
        self._compiled_step: Callable[..., StepOutput] | None = None

    def compile_step(self, **compile_options: Any) -> None:
        """Teacher forcing then runs `step` through torch.compile: its dozens of small ops fused into a
        few kernels, so a GPU step is no longer bound by kernel launches. Decoding stays eager (its row
        count changes as images finish, which would recompile)."""
        self._compiled_step = torch.compile(self.step, **compile_options)

    def init_state(self, features: torch.Tensor, rows_per_image: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(h_0, c_0), each (B*r, n), for r rows (captions or beams) of each of B images."""
        mean_a = features.mean(dim=1)  # (B, D)
        h, c = self.init_h(mean_a), self.init_c(mean_a)  # (B, n) each
        return h.repeat_interleave(rows_per_image, dim=0), c.repeat_interleave(rows_per_image, dim=0)

    def step(
        self,
        y_prev: torch.Tensor,
        state: tuple[torch.Tensor, torch.Tensor],
        features: torch.Tensor,
        features_proj: torch.Tensor,
        context_mode: str = "expected",
    ) -> StepOutput:
        """Advance one word: y_{t-1} (N,), (h_{t-1}, c_{t-1}), a (B, L, D) -> logits for y_t and more.

        The N = B*r rows are r consecutive rows per image (an image's captions, or its beams): they share
        the image's annotations a and their projection `features_proj` (B, L, A), which are neither
        copied nor recomputed per row. `context_mode` is only read by hard attention: "sample",
        "expected" or "argmax".
        """
        h, c = state
        alpha = self.attention.weights(features_proj, h)  # (N, L)
        z, location = self.attention.context(features, alpha, context_mode)  # (N, D), (N,) or None
        if self.f_beta is not None:
            beta = torch.sigmoid(self.f_beta(h))  # (N, 1) or (N, D)
            z = beta * z
        else:
            beta = h.new_ones(h.size(0), 1)
        emb = self.embedding(y_prev)  # (N, m) E y_{t-1}
        h, c = self.lstm(torch.cat([emb, z], dim=1), (h, c))  # (N, n) each
        if self.deep_output:
            logits = self.L_o(self.dropout(emb + self.L_h(h) + self.L_z(z)))  # (N, V)
        else:
            logits = self.fc(self.dropout(h))  # (N, V)
        return StepOutput(logits, (h, c), alpha, beta, location)

    def forward(
        self, features: torch.Tensor, captions: torch.Tensor, caplens: torch.Tensor, context_mode: str = "expected"
    ) -> dict[str, torch.Tensor]:
        """Teacher forcing over padded captions, in input order (masks, no sort-and-slice).

        Args:
            features: a, (B, L, D), shared by N/B consecutive captions each.
            captions: (N, T+1) `<start> w_1 .. w_n <end> <pad>..`.
            caplens: (N,) n + 2, counting <start> and <end>; best kept on the CPU (T is read from them).
        Returns a dict with logits (N, T, V) for targets captions[:, 1:T+1], alphas (N, T, L),
        mask (N, T) of real steps, and for sampled hard attention log_p_s and entropy (N, T).
        """
        steps = int(caplens.max()) - 1  # T: predict w_1 .. <end> (caplens on the CPU: no GPU sync)
        lengths = caplens.to(captions.device, non_blocking=True)
        mask = torch.arange(steps, device=captions.device)[None, :] < (lengths[:, None] - 1)  # (N, T)
        features_proj = self.attention.project(features)  # (B, L, A), once per image
        state = self.init_state(features, captions.size(0) // features.size(0))  # (N, n) each
        logits, alphas, log_p_s, entropy = [], [], [], []
        for t in range(steps):
            out = (self._compiled_step or self.step)(captions[:, t], state, features, features_proj, context_mode)
            state = out.state
            logits.append(out.logits)
            alphas.append(out.alpha)
            log_alpha = torch.log(out.alpha.clamp_min(1e-12))  # (N, L)
            entropy.append(-(out.alpha * log_alpha).sum(dim=1))  # H[s_t] = -sum_i alpha_ti log alpha_ti
            if out.location is not None:
                log_p_s.append(log_alpha.gather(1, out.location[:, None]).squeeze(1))  # log p(s_t | a)
        result = {
            "logits": torch.stack(logits, dim=1),  # (N, T, V)
            "alphas": torch.stack(alphas, dim=1),  # (N, T, L)
            "entropy": torch.stack(entropy, dim=1),  # (N, T)
            "mask": mask,
            "targets": captions[:, 1 : steps + 1],  # (N, T)
        }
        if log_p_s:
            result["log_p_s"] = torch.stack(log_p_s, dim=1)  # (N, T)
        return result


class ShowAttendTell(nn.Module):
    """Encoder + decoder in one module, so DDP, optimisers and checkpoints see one thing.

    Args:
        cfg: the architecture (what a checkpoint stores as its model config).
        encoder_weights, fine_tune, fine_tune_stages: how the encoder starts and which stages train
            (see Encoder); training concerns, so not part of ModelConfig.
    """

    def __init__(self, cfg: ModelConfig, *, encoder_weights: str = "none", fine_tune: bool = False,
                 fine_tune_stages: int = 3) -> None:
        super().__init__()
        self.encoder: ImageEncoder = build_encoder(
            cfg.encoder,
            weights=encoder_weights,
            stages=cfg.encoder_stages,
            enc_size=cfg.enc_size,
            fine_tune=fine_tune,
            fine_tune_stages=fine_tune_stages,
        )
        self.decoder = Decoder(
            vocab_size=cfg.vocab_size,
            encoder_dim=self.encoder.out_dim,
            attention=cfg.attention,
            attention_dim=cfg.attention_dim,
            embed_dim=cfg.embed_dim,
            decoder_dim=cfg.decoder_dim,
            dropout=cfg.dropout,
            gate=cfg.gate,
            deep_output=cfg.deep_output,
        )

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, S, S) -> annotations a (B, L, D); annotations (B, L, D) from a cache pass through."""
        if images.dim() == 3:
            return images.float() if images.dtype == torch.float16 else images
        return self.encoder(images)

    def forward(
        self, images: torch.Tensor, captions: torch.Tensor, caplens: torch.Tensor, context_mode: str = "expected"
    ) -> dict[str, torch.Tensor]:
        """images (B, 3, S, S); captions (B, C, T+1) with C captions per image; caplens (B, C).

        The CNN runs once per image and its annotations, neither copied nor re-projected, serve that
        image's C captions. `images` may also be the annotations themselves, (B, L, D), from a feature
        cache of a frozen encoder. The result also holds each image's mean annotation `mean_annotation` (B, D).
        """
        features = self.encode(images)  # (B, L, D)
        out = self.decoder(features, captions.flatten(0, 1), caplens.flatten(), context_mode)  # B*C rows
        out["mean_annotation"] = features.mean(dim=1)  # (B, D)
        return out


def build_model(cfg: ModelConfig, **encoder_options: Any) -> ShowAttendTell:
    """The model of `cfg`; encoder_options (encoder_weights, fine_tune, fine_tune_stages) as ShowAttendTell."""
    if cfg.vocab_size < len(SPECIAL_TOKENS):
        raise ValueError(f"model config vocab_size={cfg.vocab_size}: set it from the word map first")
    return ShowAttendTell(cfg, **encoder_options)


def model_from_checkpoint(ckpt: dict[str, Any], source: str = "checkpoint") -> tuple[ShowAttendTell, ModelConfig]:
    """Rebuild the exact model a checkpoint was trained with from its model config alone (no download:
    the weights come from the checkpoint)."""
    cfg = model_config_from_checkpoint(ckpt, source)
    if cfg.vocab_size != len(ckpt["word_map"]):
        raise UserError(f"{source}: model config vocab_size={cfg.vocab_size} but its word map has "
                        f"{len(ckpt['word_map'])} words")
    model = build_model(cfg)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise UserError(f"{source}: weights do not match its model config ({first_detail(e)})") from None
    return model.eval(), cfg


def load_model(path: str | Path) -> tuple[ShowAttendTell, ModelConfig, dict[str, Any]]:
    """Checkpoint file -> (model in eval mode on CPU, its model config, the checkpoint dict).

    The one loader eval.py and caption.py share; every failure is a UserError naming the file, as is a
    checkpoint whose run imported modules (config `imports`) that this process has not (`--import`).
    """
    ckpt = load_checkpoint(path)
    check_plugins((ckpt.get("train_config") or {}).get("imports") or [], str(path))
    model, cfg = model_from_checkpoint(ckpt, str(path))
    return model, cfg, ckpt


