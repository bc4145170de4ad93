"""Show, Attend and Tell (Xu et al. 2015): ResNet encoder, attention LSTM decoder, decoding.

Symbols follow the paper: a (B, L, D) annotation vectors, L = enc_size**2 locations, D encoder channels;
alpha_t (B, L) attention weights; beta_t the gate; z_t (B, D) context; h_t, c_t (B, n) LSTM state;
E the m-dim word embedding; V the vocabulary size; T decoding steps.

One function, `Decoder.step`, advances the decoder by one word. Teacher-forced training, greedy decoding,
beam search and both attention variants all call it, so they cannot drift apart.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from utils import SPECIAL_TOKENS, ModelConfig, UserError, load_checkpoint, model_config_from_checkpoint

__all__ = [
    "Encoder",
    "WeightsDownloadError",
    "SoftAttention",
    "HardAttention",
    "Decoder",
    "ShowAttendTell",
    "build_model",
    "model_from_checkpoint",
    "load_model",
    "doubly_stochastic_penalty",
    "reinforce_surrogate",
    "target_log_probs",
    "Hypothesis",
    "beam_search",
]

# Output channels of layer1; each later stage doubles them, so D = this * 2**(stages - 1).
_RESNET_LAYER1_CHANNELS = {"resnet18": 64, "resnet34": 64, "resnet50": 256, "resnet101": 256, "resnet152": 256}


# --------------------------------------------------------------------------------------------
# Encoder
# --------------------------------------------------------------------------------------------
class Encoder(nn.Module):
    """A torchvision ResNet cut before pooling, giving L = enc_size**2 annotation vectors a_i.

    The paper uses VGG's conv5 (14x14x512, not fine-tuned); a ResNet's last stage pooled to 14x14 is the
    common modern stand-in (D = 2048 for ResNet-50/101/152, 512 for 18/34). `stages=3` stops after layer3,
    which halves the stride: useful for small images such as the built-in shapes dataset.

    Args:
        arch: torchvision ResNet name.
        weights: "imagenet" (torchvision's IMAGENET1K_V1 weights, from torch's hub cache or downloaded),
            "none" (random init), or the path of a local torchvision state_dict file for `arch`.
        stages: keep layer1..layer{stages}.
        enc_size: side of the adaptive-average-pooled grid.
        fine_tune: train the encoder stages >= fine_tune_stages (0 also trains the stem).
        fine_tune_stages: first trained stage when fine_tune is set.
    """

    def __init__(
        self,
        *,
        arch: str = "resnet101",
        weights: str = "imagenet",
        stages: int = 4,
        enc_size: int = 14,
        fine_tune: bool = False,
        fine_tune_stages: int = 3,
    ) -> None:
        super().__init__()
        if arch not in _RESNET_LAYER1_CHANNELS:
            raise UserError(f"encoder {arch!r} is not one of {', '.join(_RESNET_LAYER1_CHANNELS)}")
        resnet = _load_resnet(arch, weights)
        self.stem = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool)
        self.stages = nn.ModuleList([getattr(resnet, f"layer{i}") for i in range(1, stages + 1)])
        self.pool = nn.AdaptiveAvgPool2d((enc_size, enc_size))
        self.out_dim = _RESNET_LAYER1_CHANNELS[arch] * 2 ** (stages - 1)  # D
        self.enc_size = enc_size
        # Frozen parts stay frozen and run BatchNorm with running statistics, as a fixed feature extractor.
        first_trained = fine_tune_stages if fine_tune else len(self.stages) + 1
        self._frozen = [self.stem] if first_trained > 0 else []
        self._frozen += [s for i, s in enumerate(self.stages, start=1) if i < first_trained]
        for module in self._frozen:
            module.requires_grad_(False)

    def train(self, mode: bool = True) -> "Encoder":
        super().train(mode)
        for module in self._frozen:
            module.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.stem(images)  # (B, C, S/4, S/4)
        for stage in self.stages:
            x = stage(x)
        x = self.pool(x)  # (B, D, enc_size, enc_size)
        return x.flatten(2).transpose(1, 2)  # (B, L, D)


class WeightsDownloadError(UserError):
    """ImageNet weights were asked for but cannot be fetched (typically: no network)."""


def _load_resnet(arch: str, weights: str) -> nn.Module:
    """A torchvision ResNet: random init, ImageNet weights (hub cache first), or a local state_dict file."""
    build = getattr(torchvision.models, arch)
    if weights == "none":
        return build(weights=None)
    if weights == "imagenet":
        enum = torchvision.models.get_model_weights(arch).IMAGENET1K_V1
        source = Path(torch.hub.get_dir()) / "checkpoints" / enum.url.rsplit("/", 1)[-1]
        try:
            return build(weights=enum)  # reads the hub cache when the file is there, else downloads it
        except OSError as e:  # URLError, connection refused, DNS failure: all OSError subclasses
            raise WeightsDownloadError(
                f"could not download the ImageNet weights for {arch} ({e}); this machine looks offline. "
                f"Put {source.name} in {source.parent}, pass its path as encoder_weights=PATH, "
                "or train from random init with encoder_weights=none"
            ) from None
        except RuntimeError as e:  # a cached file of the wrong architecture: load_state_dict's error
            raise UserError(f"{source}: not {arch} weights ({_first_detail(e)})") from None
    source = Path(weights)
    if not source.is_file():
        raise UserError(f"encoder_weights={weights!r} is not imagenet, none or an existing weights file")
    try:
        state_dict = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, truncated, pickled objects
        raise UserError(f"{source}: not a readable torch state_dict file ({type(e).__name__})") from None
    resnet = build(weights=None)
    try:
        resnet.load_state_dict(state_dict)
    except (RuntimeError, TypeError, AttributeError) as e:  # wrong architecture, or not a state_dict at all
        raise UserError(f"{source}: not {arch} weights ({_first_detail(e)})") from None
    return resnet


def _first_detail(error: Exception) -> str:
    """load_state_dict's first line only says "Error(s) in loading state_dict": show the first detail."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[1] if len(lines) > 1 else lines[0] if lines else type(error).__name__)[:200]


# --------------------------------------------------------------------------------------------
# Attention: f_att scores the locations; the variant decides how alpha becomes the context z_t.
# --------------------------------------------------------------------------------------------
class SoftAttention(nn.Module):
    """Deterministic soft attention (Sec. 4.2): z_t = sum_i alpha_ti a_i, trained by backprop."""

    variant = "soft"

    def __init__(self, encoder_dim: int, decoder_dim: int, attention_dim: int) -> None:
        super().__init__()
        self.features_att = nn.Linear(encoder_dim, attention_dim)
        self.hidden_att = nn.Linear(decoder_dim, attention_dim)
        # w of f_att. The paper's bias b adds the same constant to every location's score, which the
        # softmax cancels: it could never receive a gradient (and DDP refuses a parameter that gets none).
        self.score = nn.Linear(attention_dim, 1, bias=False)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        """Checkpoints written before the bias was dropped carry `score.bias`: it changed no alpha, so it is
        discarded on load (as BatchNorm upgrades its old state dicts)."""
        state_dict.pop(prefix + "score.bias", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """The h-independent half of f_att, computed once per image rather than every step."""
        return self.features_att(features)  # (B, L, A)

    def weights(self, features_proj: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """alpha_t = softmax_i f_att(a_i, h_{t-1}) for N = G*r rows of h sharing G images' projections.

        f_att = w^T tanh(W_a a_i + W_h h) + b. As tanh(x) = 2 sigmoid(2x) - 1 and a softmax ignores a
        constant, the scores are computed as 2 w^T sigmoid(2 (W_a a_i + W_h h)): the same alpha, and
        sigmoid is ~6x faster than tanh on a CPU (measured: 2.3 vs 0.38 G elements/s a core). The
        (G, r, L, A) pre-activation is a step's largest tensor: it is transformed in place, and without
        autograd on a CPU it is built one image at a time so that it stays in the cache.
        """
        groups, num_locations, attention_dim = features_proj.shape
        att_h = self.hidden_att(h).view(groups, -1, 1, attention_dim)  # (G, r, 1, A)
        if torch.is_grad_enabled() or features_proj.device.type != "cpu":
            gate = torch.sigmoid_((features_proj.unsqueeze(1) + att_h).mul_(2.0))  # (G, r, L, A)
            e = F.linear(gate, self.score.weight)  # (G, r, L, 1)
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


class HardAttention(SoftAttention):
    """Stochastic hard attention (Sec. 4.1): s_t ~ Multinoulli(alpha_t), z_t = a_{s_t}.

    Context modes: "sample" (training, and optional decoding), "expected" (the expectation, as the paper's
    variance-reduction trick and the original code's decoding do), "argmax" (most likely location).
    """

    variant = "hard"

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
    """z_t = sum_i alpha_ti a_i for N = G*r rows of alpha over G images: one (r, L) x (L, D) product per image."""
    groups, num_locations, _ = features.shape
    z = torch.bmm(alpha.view(groups, -1, num_locations).to(features.dtype), features)  # (G, r, D)
    return z.view(alpha.size(0), -1)  # (N, D)


# --------------------------------------------------------------------------------------------
# Decoder
# --------------------------------------------------------------------------------------------
class StepOutput(NamedTuple):
    logits: torch.Tensor  # (B, V) unnormalised log p(y_t | a, y_<t)
    state: tuple[torch.Tensor, torch.Tensor]  # (h_t, c_t), each (B, n)
    alpha: torch.Tensor  # (B, L)
    beta: torch.Tensor  # (B, 1) scalar gate, (B, D) vector gate, or ones (B, 1) without a gate
    location: torch.Tensor | None  # (B,) sampled/argmax location s_t, None for the expected context


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
        attention_cls = {"soft": SoftAttention, "hard": HardAttention}.get(attention)
        if attention_cls is None:
            raise ValueError(f"attention={attention!r} is not one of soft, hard")
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
        """(h_0, c_0), each (G*r, n), for r rows (captions or beams) of each of G images."""
        mean_a = features.mean(dim=1)  # (G, D)
        h, c = self.init_h(mean_a), self.init_c(mean_a)  # (G, n) each
        return h.repeat_interleave(rows_per_image, dim=0), c.repeat_interleave(rows_per_image, dim=0)

    def step(
        self,
        y_prev: torch.Tensor,
        state: tuple[torch.Tensor, torch.Tensor],
        features: torch.Tensor,
        features_proj: torch.Tensor,
        context_mode: str = "expected",
    ) -> StepOutput:
        """Advance one word: y_{t-1} (N,), (h_{t-1}, c_{t-1}), a (G, L, D) -> logits for y_t and more.

        The N = G*r rows are r consecutive rows per image (an image's captions, or its beams): they share
        the image's annotations a and their projection `features_proj` (G, L, A), which are neither
        copied nor recomputed per row. `context_mode` is only read by hard attention: "sample",
        "expected" or "argmax".
        """
        h, c = state
        alpha = self.attention.weights(features_proj, h)  # (B, L)
        z, location = self.attention.context(features, alpha, context_mode)  # (B, D), (B,) or None
        if self.f_beta is not None:
            beta = torch.sigmoid(self.f_beta(h))  # (B, 1) or (B, D)
            z = beta * z
        else:
            beta = h.new_ones(h.size(0), 1)
        emb = self.embedding(y_prev)  # (B, m) E y_{t-1}
        h, c = self.lstm(torch.cat([emb, z], dim=1), (h, c))  # (B, n) each
        if self.deep_output:
            logits = self.L_o(self.dropout(emb + self.L_h(h) + self.L_z(z)))  # (B, V)
        else:
            logits = self.fc(self.dropout(h))  # (B, V)
        return StepOutput(logits, (h, c), alpha, beta, location)

    def forward(
        self, features: torch.Tensor, captions: torch.Tensor, caplens: torch.Tensor, context_mode: str = "expected"
    ) -> dict[str, torch.Tensor]:
        """Teacher forcing over padded captions, in input order (masks, no sort-and-slice).

        Args:
            features: a, (G, L, D), shared by N/G consecutive captions each.
            captions: (N, T+1) `<start> w_1 .. w_n <end> <pad>..`.
            caplens: (N,) n + 2, counting <start> and <end>; best kept on the CPU (T is read from them).
        Returns a dict with logits (N, T, V) for targets captions[:, 1:T+1], alphas (N, T, L),
        mask (N, T) of real steps, and for sampled hard attention log_p_s and entropy (N, T).
        """
        steps = int(caplens.max()) - 1  # T: predict w_1 .. <end> (caplens on the CPU: no GPU sync)
        lengths = caplens.to(captions.device, non_blocking=True)
        mask = torch.arange(steps, device=captions.device)[None, :] < (lengths[:, None] - 1)  # (N, T)
        features_proj = self.attention.project(features)  # (G, L, A), once per image
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
        self.encoder = Encoder(
            arch=cfg.encoder,
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
        self.attention_variant = cfg.attention

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
        raise UserError(f"{source}: weights do not match its model config ({_first_detail(e)})") from None
    return model.eval(), cfg


def load_model(path: str | Path) -> tuple[ShowAttendTell, ModelConfig, dict[str, Any]]:
    """Checkpoint file -> (model in eval mode on CPU, its model config, the checkpoint dict).

    The one loader eval.py and caption.py share; every failure is a UserError naming the file.
    """
    ckpt = load_checkpoint(path)
    model, cfg = model_from_checkpoint(ckpt, str(path))
    return model, cfg, ckpt


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


# --------------------------------------------------------------------------------------------
# Decoding: beam search batched over images and beams (greedy is beam_size=1).
# --------------------------------------------------------------------------------------------
@dataclass
class Hypothesis:
    tokens: list[int]  # word ids, without <start> and <end>
    score: float  # sum of log-probabilities (including <end> when finished)
    normalized_score: float  # score / length**length_penalty, what ranks the hypotheses
    finished: bool  # False when max_len was reached without <end>
    alphas: torch.Tensor  # (len(tokens), enc_size, enc_size) attention when emitting each word
    betas: torch.Tensor  # (len(tokens),) gate value (mean over D for a vector gate)


class _Step(NamedTuple):
    """What beam search keeps of one step to read the captions back at the end."""

    word_ids: torch.Tensor  # (R,) word chosen by each row after the step
    parent: torch.Tensor  # (R,) the row of this step's input that it extends
    alpha: torch.Tensor  # (R, L) attention of each input row
    beta: torch.Tensor  # (R,) gate of each input row (mean over D for a vector gate)
    kept: torch.Tensor | None  # (R,) rows of the previous step's output that this step's input kept


@torch.no_grad()
def beam_search(
    model: ShowAttendTell,
    images: torch.Tensor,
    word_map: dict[str, int],
    *,
    beam_size: int = 5,
    max_len: int = 50,
    length_penalty: float = 0.0,
    context_mode: str = "expected",
    n_best: int = 1,
) -> list[list[Hypothesis]]:
    """The n_best best captions per image (best first), decoding all images and all their beams as one batch.

    A finished beam stays in the beam, extended only by <pad> at no cost, so every image keeps exactly
    `beam_size` rows until all of them are finished; the image then leaves the batch, and the search ends
    when no image is left or max_len is reached. When no beam of an image reaches <end>, its best
    unfinished hypothesis is returned rather than nothing.

    Speed: an image's k beams share its annotations and their projection (computed once, not per beam);
    each step keeps only the chosen words, back-pointers and attention, and the captions are read back
    by following the back-pointers once at the end (no per-step copy of the growing hypotheses).

    Args:
        images: (B, 3, S, S) normalised, or their annotations (B, L, D) from a feature cache.
        length_penalty: rank finished hypotheses by score / length**length_penalty (0 = raw log-prob).
        context_mode: hard attention's context at decoding (expected, argmax, sample); soft ignores it.
        n_best: hypotheses returned per image, 1..beam_size: the final beam, finished ones first, each
            group by normalized score. Always a list per image, so callers never branch on n_best.
    """
    if beam_size < 1:
        raise ValueError(f"beam_size={beam_size} must be >= 1")
    if not 1 <= n_best <= beam_size:
        raise ValueError(f"n_best={n_best} must be in 1..beam_size={beam_size}")
    model.eval()
    decoder = model.decoder
    start, end, pad = word_map["<start>"], word_map["<end>"], word_map["<pad>"]
    k, vocab = beam_size, decoder.vocab_size
    features = model.encode(images)  # (B, L, D)
    batch, num_locations, _ = features.shape
    device = features.device
    features_proj = decoder.attention.project(features)  # (B, L, A)
    state = decoder.init_state(features, k)  # (B*k, n) each
    image_ids = torch.arange(batch, device=device)  # (A,) the images still decoding, A <= B
    word_ids = torch.full((batch * k,), start, dtype=torch.long, device=device)  # (A*k,)
    # Only beam 0 is live at t=0, so the first top-k picks k distinct words rather than k copies.
    scores = torch.full((batch, k), float("-inf"), device=device)
    scores[:, 0] = 0.0
    scores = scores.flatten()  # (A*k,)
    finished = torch.zeros(batch * k, dtype=torch.bool, device=device)
    lengths = torch.zeros(batch * k, dtype=torch.long, device=device)  # tokens incl. <end>
    steps: list[_Step] = []
    # Results have n_best slots per image (slot = image * n_best + rank), filled when the image ends.
    ended: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # step -> (slots, their rows) ending there
    slot_score = torch.empty(batch * n_best, device=device)
    slot_normalized = torch.empty(batch * n_best, device=device)
    slot_length = torch.empty(batch * n_best, dtype=torch.long, device=device)
    slot_finished = torch.empty(batch * n_best, dtype=torch.bool, device=device)
    ranks = torch.arange(n_best, device=device)
    kept = None
    # Retiring finished images needs a host sync; on a GPU, do it every few steps only.
    check_every = 1 if device.type == "cpu" else 8

    for t in range(max_len):
        out = decoder.step(word_ids, state, features, features_proj, context_mode)
        log_probs = F.log_softmax(out.logits.float(), dim=1)  # (A*k, V)
        log_probs[:, [pad, start]] = float("-inf")  # never emitted (an untrained model may prefer them)
        # A finished beam may only continue with <pad>, at log-prob 0: its score is frozen.
        log_probs.masked_fill_(finished[:, None], float("-inf"))
        log_probs[:, pad] = torch.where(finished, 0.0, log_probs[:, pad])
        active = image_ids.numel()
        candidates = (scores[:, None] + log_probs).view(active, k * vocab)  # (A, k*V)
        top_scores, top_ids = candidates.topk(k, dim=1)  # (A, k)
        parent = (top_ids // vocab + torch.arange(active, device=device)[:, None] * k).flatten()  # (A*k,)
        word_ids = (top_ids % vocab).flatten()  # (A*k,)
        scores = top_scores.flatten()
        was_finished = finished[parent]
        lengths = lengths[parent] + (~was_finished).long()
        finished = was_finished | (word_ids == end)
        steps.append(_Step(word_ids, parent, out.alpha, out.beta.float().mean(dim=1), kept))
        state = (out.state[0][parent], out.state[1][parent])
        kept = None
        last = t == max_len - 1
        if not last and (t + 1) % check_every:
            continue
        done = torch.ones(active, dtype=torch.bool, device=device) if last else finished.view(active, k).all(dim=1)
        if not bool(done.any()):
            continue
        # Rank the done images' beams: finished hypotheses first, each group by normalized score (two
        # stable sorts: an offset such as -1e9 for unfinished ones would erase their differences in
        # float32); unfinished ones are the fallback for images with none finished.
        rows = torch.arange(active * k, device=device).view(active, k)[done]  # (E, k)
        normalized = scores[rows] / lengths[rows].clamp_min(1).float() ** length_penalty if length_penalty \
            else scores[rows]  # (E, k)
        by_score = normalized.argsort(dim=1, descending=True, stable=True)
        by_finished = finished[rows].gather(1, by_score).int().argsort(dim=1, descending=True, stable=True)
        order = by_score.gather(1, by_finished)[:, :n_best]  # (E, n)
        chosen = rows.gather(1, order).flatten()  # (E*n,)
        slots = (image_ids[done][:, None] * n_best + ranks).flatten()  # (E*n,)
        ended[t] = (slots, chosen)
        slot_score[slots] = scores[chosen]
        slot_normalized[slots] = normalized.gather(1, order).flatten()
        slot_length[slots] = lengths[chosen]
        slot_finished[slots] = finished[chosen]
        if bool(done.all()):
            break
        # The done images leave the batch: keep the rows (and annotations) of the others.
        image_ids = image_ids[~done]
        kept = torch.arange(active * k, device=device).view(active, k)[~done].flatten()  # (A'*k,)
        features, features_proj = features[~done], features_proj[~done]
        word_ids, scores, finished, lengths = word_ids[kept], scores[kept], finished[kept], lengths[kept]
        state = (state[0][kept], state[1][kept])

    tokens, alphas, betas = _follow_back_pointers(steps, ended, batch * n_best, num_locations, pad)
    enc = model.encoder.enc_size

    def hypothesis(slot: int) -> Hypothesis:
        n_words = int(slot_length[slot]) - int(slot_finished[slot])  # drop <end>
        return Hypothesis(
            tokens=tokens[slot, :n_words].tolist(),
            score=float(slot_score[slot]),
            normalized_score=float(slot_normalized[slot]),
            finished=bool(slot_finished[slot]),
            alphas=alphas[slot, :n_words].view(n_words, enc, enc).cpu(),
            betas=betas[slot, :n_words].cpu(),
        )

    return [[hypothesis(i * n_best + rank) for rank in range(n_best)] for i in range(batch)]


def _follow_back_pointers(
    steps: list[_Step], ended: dict[int, tuple[torch.Tensor, torch.Tensor]], slots: int, num_locations: int, pad: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One backward walk over beam search's steps, picking up each result slot at the step where its image
    ended: every slot's words (S, T), the attention that emitted each word (S, T, L) and its gates (S, T)."""
    device = steps[0].word_ids.device
    tokens = torch.full((slots, len(steps)), pad, dtype=torch.long, device=device)
    alphas = torch.zeros(slots, len(steps), num_locations, device=device)
    betas = torch.zeros(slots, len(steps), device=device)
    walking = torch.empty(0, dtype=torch.long, device=device)  # slots whose caption reaches back to step t
    rows = torch.empty(0, dtype=torch.long, device=device)  # their rows in step t's output
    for t in reversed(range(len(steps))):
        step = steps[t]
        if t in ended:
            walking, rows = torch.cat([walking, ended[t][0]]), torch.cat([rows, ended[t][1]])
        tokens[walking, t] = step.word_ids[rows]
        rows = step.parent[rows]  # the input row that emitted the word, with this step's alpha and beta
        alphas[walking, t] = step.alpha[rows].float()
        betas[walking, t] = step.beta[rows]
        if step.kept is not None:
            rows = step.kept[rows]
    return tokens, alphas, betas


def target_log_probs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(y_t | a, y_<t) of each target word, (N, T), in fp32 even under autocast."""
    return F.log_softmax(logits.float(), dim=2).gather(2, targets.unsqueeze(2)).squeeze(2)
