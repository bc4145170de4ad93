"""One decode path: validation in train.py, eval.py and caption.py decode with the same options, flags,
defaults and code, so they cannot drift apart.

    DecodeOptions       beam size, longest caption, length penalty, hard attention's context, batch size,
                        sampling (temperature, top-k, top-p) and trigram blocking
    decode_args_parser  the argparse parent both scripts share (--beam-size, --max-len, ...)
    decode_images       a tensor of images -> the n best Hypotheses per image (best first)
    decode_split        a DataLoader of a packed split -> per image: caption, words, references, attention
"""
from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, fields
from typing import Any, Iterable, NamedTuple

import torch
import torch.nn.functional as F

from satkit.config import HARD_DECODE_MODES, check_fields, option
from satkit.model import ShowAttendTell, StepOutput
from satkit.infra.progress import progress_bar
from satkit.infra.runtime import autocast_context
from satkit.data.text import decode_ids

__all__ = ["DecodeOptions", "decode_args_parser", "decode_options_from_args", "decode_images", "decode_split"]


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


class _Policy(NamedTuple):
    """How beam_search extends its rows each step (see beam_search's arguments)."""

    sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    block_trigrams: bool = False


# Speed: an image's k beams share its annotations and their projection (computed once, not per beam); each
# step keeps only the chosen words, back-pointers and attention, and the captions are read back by following
# the back-pointers once at the end (no per-step copy of the growing hypotheses).
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
    sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, block_trigrams: bool = False,
) -> list[list[Hypothesis]]:
    """The n_best best captions per image (best first), decoding all images and all their beams as one batch.

    A finished beam stays in the beam, extended only by <pad> at no cost, so every image keeps exactly
    `beam_size` rows until all of them are finished; the image then leaves the batch, and the search ends
    when no image is left or max_len is reached. When no beam of an image reaches <end>, its best
    unfinished hypothesis is returned rather than nothing.

    Args:
        images: (B, 3, S, S) normalised, or their annotations (B, L, D) from a feature cache.
        length_penalty: rank finished hypotheses by score / length**length_penalty (0 = raw log-prob).
        context_mode: hard attention's context at decoding (expected, argmax, sample); soft ignores it.
        n_best: hypotheses returned per image, 1..beam_size: the final beam, finished ones first, each
            group by normalized score. Always a list per image, so callers never branch on n_best.
        sample: draw beam_size captions per image, one per row, retired and ranked as beams are; a score is the
            model's log-probability, as a beam's: temperature, top_k (0 = off), top_p (1 = off) shape only the
            draws. Reproducible under torch.manual_seed; not batch-size invariant (one stream for all rows).
        block_trigrams: no row may emit a word that repeats a trigram already in its own caption.
    """
    policy = _checked_policy(beam_size, n_best, _Policy(sample, temperature, top_k, top_p, block_trigrams))
    model.eval()
    decoder, k = model.decoder, beam_size
    features = model.encode(images)  # (B, L, D)
    batch, num_locations, _ = features.shape
    features_proj = decoder.attention.project(features)  # (B, L, A)
    beams = _Beams.start(batch, k, word_map["<start>"], decoder.init_state(features, k), policy)
    results = _Results(batch, n_best, length_penalty, features.device)
    steps: list[_Step] = []
    kept = None
    check_every = 1 if features.device.type == "cpu" else 8  # retiring images syncs: on a GPU, now and then
    for t in range(max_len):
        out = decoder.step(beams.word_ids, beams.state, features, features_proj, context_mode)
        parent = beams.extend(out, k, word_map, policy)
        steps.append(_Step(beams.word_ids, parent, out.alpha, out.beta.float().mean(dim=1), kept))
        kept = None
        last = t == max_len - 1
        if not last and (t + 1) % check_every:
            continue
        done = beams.done_images(k, last)  # (A,)
        if not bool(done.any()):
            continue
        results.record(t, beams, done, k)
        if bool(done.all()):
            break
        kept = beams.keep(~done, k)  # the done images leave the batch, with their annotations
        features, features_proj = features[~done], features_proj[~done]
    tokens, alphas, betas = _follow_back_pointers(steps, results.ended, batch * n_best, num_locations,
                                                  word_map["<pad>"])
    return results.hypotheses(tokens, alphas, betas, model.encoder.enc_size)


def _checked_policy(beam_size: int, n_best: int, policy: _Policy) -> _Policy:
    """The policy, once its values are sane: ValueError naming the first that is not (a library call)."""
    if beam_size < 1:
        raise ValueError(f"beam_size={beam_size} must be >= 1")
    if not 1 <= n_best <= beam_size:
        raise ValueError(f"n_best={n_best} must be in 1..beam_size={beam_size}")
    if not policy.temperature > 0:
        raise ValueError(f"temperature={policy.temperature} must be > 0")
    if policy.top_k < 0:
        raise ValueError(f"top_k={policy.top_k} must be >= 0 (0 = off)")
    if not 0 < policy.top_p <= 1:
        raise ValueError(f"top_p={policy.top_p} must be in (0, 1] (1 = off)")
    return policy


@dataclass
class _Beams:
    """The rows beam search is extending: k per image still decoding (A images, R = A*k rows)."""

    image_ids: torch.Tensor  # (A,) which of the batch's images are still decoding
    word_ids: torch.Tensor  # (R,) each row's last word
    scores: torch.Tensor  # (R,) summed log-probabilities
    finished: torch.Tensor  # (R,) the row has emitted <end>
    lengths: torch.Tensor  # (R,) tokens emitted, <end> included
    state: tuple[torch.Tensor, torch.Tensor]  # (h, c), each (R, n)
    history: torch.Tensor | None = None  # (R, t) each row's words so far; kept only to block trigrams

    @classmethod
    def start(cls, batch: int, k: int, start: int, state: tuple[torch.Tensor, torch.Tensor],
              policy: _Policy = _Policy()) -> "_Beams":
        device = state[0].device
        # Only beam 0 is live at t=0, so the first top-k picks k distinct words rather than k copies;
        # samples are drawn independently, so all k rows are live.
        scores = torch.full((batch, k), 0.0 if policy.sample else float("-inf"), device=device)
        scores[:, 0] = 0.0
        history = torch.empty(batch * k, 0, dtype=torch.long, device=device) if policy.block_trigrams else None
        return cls(torch.arange(batch, device=device), torch.full((batch * k,), start, dtype=torch.long, device=device),
                   scores.flatten(), torch.zeros(batch * k, dtype=torch.bool, device=device),
                   torch.zeros(batch * k, dtype=torch.long, device=device), state, history)

    def extend(self, out: StepOutput, k: int, word_map: dict[str, int], policy: _Policy = _Policy()) -> torch.Tensor:
        """Keep each image's k best one-word extensions, or draw one word per row when sampling; returns
        each new row's parent row (R,)."""
        log_probs = self._log_probs(out, word_map)  # (R, V)
        if policy.sample:
            word_ids = _draw(log_probs, policy)  # (R,)
            parent = torch.arange(word_ids.numel(), device=word_ids.device)  # each row extends itself
            scores = self.scores + log_probs.gather(1, word_ids[:, None]).squeeze(1)  # unreshaped log-probs
        else:
            active, vocab = self.image_ids.numel(), log_probs.size(1)
            candidates = (self.scores[:, None] + log_probs).view(active, k * vocab)  # (A, k*V)
            top_scores, top_ids = candidates.topk(k, dim=1)  # (A, k)
            parent = (top_ids // vocab + torch.arange(active, device=top_ids.device)[:, None] * k).flatten()  # (R,)
            word_ids, scores = (top_ids % vocab).flatten(), top_scores.flatten()
        self.word_ids, self.scores = word_ids, scores
        was_finished = self.finished[parent]
        self.lengths = self.lengths[parent] + (~was_finished).long()
        self.finished = was_finished | (self.word_ids == word_map["<end>"])
        self.state = (out.state[0][parent], out.state[1][parent])
        if self.history is not None:
            self.history = torch.cat([self.history[parent], self.word_ids[:, None]], dim=1)
        return parent

    def _log_probs(self, out: StepOutput, word_map: dict[str, int]) -> torch.Tensor:
        """Each row's next-word log-probabilities (R, V), -inf where the row may not go."""
        pad, start = word_map["<pad>"], word_map["<start>"]
        log_probs = F.log_softmax(out.logits.float(), dim=1)  # (R, V)
        log_probs[:, [pad, start]] = float("-inf")  # never emitted (an untrained model may prefer them)
        if self.history is not None:
            log_probs.masked_fill_(_repeated_trigram_words(self.history, log_probs.size(1)), float("-inf"))
        # A finished beam may only continue with <pad>, at log-prob 0: its score is frozen.
        log_probs.masked_fill_(self.finished[:, None], float("-inf"))
        log_probs[:, pad] = torch.where(self.finished, 0.0, log_probs[:, pad])
        return log_probs

    def done_images(self, k: int, last: bool) -> torch.Tensor:
        """(A,) the images whose k rows have all finished; every image at the last step."""
        if last:
            return torch.ones(self.image_ids.numel(), dtype=torch.bool, device=self.finished.device)
        return self.finished.view(-1, k).all(dim=1)

    def keep(self, images: torch.Tensor, k: int) -> torch.Tensor:
        """Keep the rows of the images marked in `images` (A,); returns the kept rows (R',)."""
        active = self.image_ids.numel()
        kept = torch.arange(active * k, device=images.device).view(active, k)[images].flatten()
        self.image_ids = self.image_ids[images]
        self.word_ids, self.scores = self.word_ids[kept], self.scores[kept]
        self.finished, self.lengths = self.finished[kept], self.lengths[kept]
        self.state = (self.state[0][kept], self.state[1][kept])
        if self.history is not None:
            self.history = self.history[kept]
        return kept


def _repeated_trigram_words(history: torch.Tensor, vocab: int) -> torch.Tensor:
    """(R, V) True for the words that would close, after a row's last two words, a trigram already in
    its history (R, T): all rows at once, no loop over them."""
    banned = torch.zeros(history.size(0), vocab, device=history.device)  # (R, V) counts
    if history.size(1) >= 3:
        # Trigram i is (h_i, h_i+1, h_i+2); it is repeated by w when (h_i, h_i+1) == the last two words.
        same = (history[:, :-2] == history[:, -2:-1]) & (history[:, 1:-1] == history[:, -1:])  # (R, T-2)
        banned.scatter_add_(1, history[:, 2:], same.float())  # add, not scatter: repeated words collide
    return banned > 0


def _draw(log_probs: torch.Tensor, policy: _Policy) -> torch.Tensor:
    """One word per row (R,) from log_probs (R, V): drawn from exp(log p / temperature), renormalised
    (p**(1/T): < 1 sharper, > 1 flatter), then cut to top_k / top_p of that tempered distribution."""
    logits = log_probs / policy.temperature
    if policy.top_k:
        # Exactly k words (a tie at the k-th broken as topk breaks it), so top_k=1 draws greedy's argmax.
        top = logits.topk(min(policy.top_k, logits.size(1)), dim=1)
        logits = torch.full_like(logits, float("-inf")).scatter(1, top.indices, top.values)
    if policy.top_p < 1:
        ordered, order = logits.sort(dim=1, descending=True)  # (R, V)
        probs = ordered.softmax(dim=1)
        beyond = probs.cumsum(dim=1) - probs >= policy.top_p  # the likelier words already hold top_p
        logits = logits.scatter(1, order, ordered.masked_fill(beyond, float("-inf")))
    return torch.multinomial(logits.softmax(dim=1), 1).squeeze(1)


class _Results:
    """n_best slots per image (slot = image * n_best + rank), filled at the step its image ends."""

    def __init__(self, batch: int, n_best: int, length_penalty: float, device: torch.device) -> None:
        self.n_best, self.length_penalty = n_best, length_penalty
        self.ended: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # step -> (slots, their rows)
        self.score = torch.empty(batch * n_best, device=device)
        self.normalized = torch.empty(batch * n_best, device=device)
        self.length = torch.empty(batch * n_best, dtype=torch.long, device=device)
        self.finished = torch.empty(batch * n_best, dtype=torch.bool, device=device)

    def record(self, t: int, beams: _Beams, done: torch.Tensor, k: int) -> None:
        """Rank the beams of the images that are done (A,): finished hypotheses first, each group by
        normalized score (two stable sorts: an offset such as -1e9 for unfinished ones would erase their
        differences in float32); unfinished ones are the fallback for images with none finished."""
        rows = torch.arange(done.numel() * k, device=done.device).view(-1, k)[done]  # (E, k)
        normalized = beams.scores[rows]  # (E, k)
        if self.length_penalty:
            normalized = normalized / beams.lengths[rows].clamp_min(1).float() ** self.length_penalty
        by_score = normalized.argsort(dim=1, descending=True, stable=True)
        by_finished = beams.finished[rows].gather(1, by_score).int().argsort(dim=1, descending=True, stable=True)
        order = by_score.gather(1, by_finished)[:, : self.n_best]  # (E, n)
        chosen = rows.gather(1, order).flatten()  # (E*n,)
        ranks = torch.arange(self.n_best, device=done.device)
        slots = (beams.image_ids[done][:, None] * self.n_best + ranks).flatten()  # (E*n,)
        self.ended[t] = (slots, chosen)
        self.score[slots] = beams.scores[chosen]
        self.normalized[slots] = normalized.gather(1, order).flatten()
        self.length[slots] = beams.lengths[chosen]
        self.finished[slots] = beams.finished[chosen]

    def hypotheses(self, tokens: torch.Tensor, alphas: torch.Tensor, betas: torch.Tensor,
                   enc_size: int) -> list[list[Hypothesis]]:
        """Per image its n_best Hypotheses, from the words, alphas (S, T, L) and betas read back per slot."""

        def hypothesis(slot: int) -> Hypothesis:
            n_words = int(self.length[slot]) - int(self.finished[slot])  # drop <end>
            return Hypothesis(tokens=tokens[slot, :n_words].tolist(), score=float(self.score[slot]),
                              normalized_score=float(self.normalized[slot]), finished=bool(self.finished[slot]),
                              alphas=alphas[slot, :n_words].view(n_words, enc_size, enc_size).cpu(),
                              betas=betas[slot, :n_words].cpu())

        return [[hypothesis(image * self.n_best + rank) for rank in range(self.n_best)]
                for image in range(self.length.numel() // self.n_best)]


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


@dataclass
class DecodeOptions:
    beam_size: int = option(5, min=1)  # 1 = greedy
    max_len: int = option(50, min=1)  # longest caption decoded, in words
    length_penalty: float = option(0.0)  # rank finished captions by score / length**p (0 = raw log-prob)
    hard_decode: str = option("expected", choices=HARD_DECODE_MODES)  # hard models' context; soft ignores it
    batch_size: int = option(32, min=1)  # images decoded at once (each with beam_size rows)
    # Off by default, so validation (trainer.val_scores sets only the fields above) decodes as before.
    sample: bool = False  # draw beam_size captions per image from the model instead of searching
    temperature: float = option(1.0, above=0.0)  # sampling only: log-probabilities / T; < 1 sharper, > 1 flatter
    top_k: int = option(0, min=0)  # sampling only: draw among the k likeliest words (0 = all)
    top_p: float = option(1.0, above=0.0, max=1.0)  # sampling only: among the fewest words holding p (1 = all)
    # On by default: without it a beam can loop ("a man with a black and black and black ...") to max_len
    # (measured on Flickr8k's test split: docs/training.md). --no-block-trigrams gives the plain search.
    block_trigrams: bool = True  # no caption repeats one of its own trigrams (beam search and sampling)

    def record(self) -> dict[str, Any]:
        """The options for a results file: sampling's knobs only when sampling; block_trigrams always (its
        default changed, so a record says which search made the captions)."""
        record = asdict(self)
        if not self.sample:
            for name in ("sample", "temperature", "top_k", "top_p"):
                del record[name]
        return record


def decode_args_parser() -> argparse.ArgumentParser:
    """The decoding flags eval.py and caption.py share (use as `parents=[decode_args_parser()]`)."""
    defaults = DecodeOptions()
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("decoding")
    group.add_argument("--beam-size", type=int, default=defaults.beam_size, help="default: %(default)s (1 = greedy)")
    group.add_argument("--max-len", type=int, default=defaults.max_len,
                       help="longest caption decoded (default: %(default)s)")
    group.add_argument("--length-penalty", type=float, default=defaults.length_penalty,
                       help="rank finished captions by score/len**p (default: %(default)s = raw log-prob)")
    group.add_argument("--hard-decode", choices=HARD_DECODE_MODES, default=defaults.hard_decode,
                       help="hard-attention models: context at decoding (default: %(default)s, as the original code)")
    group.add_argument("--batch-size", type=int, default=defaults.batch_size,
                       help="images decoded at once (default: %(default)s)")
    group.add_argument("--sample", action="store_true",
                       help="draw --beam-size captions per image from the model instead of beam search")
    for flag, kind, what in (("--temperature", float, "< 1 sharper, > 1 flatter"),
                             ("--top-k", int, "draw among the K likeliest words (0 = all)"),
                             ("--top-p", float, "draw among the fewest words holding probability P (1 = all)")):
        group.add_argument(flag, type=kind, default=getattr(defaults, flag[2:].replace("-", "_")),
                           help=f"with --sample: {what} (default: %(default)s)")
    group.add_argument("--block-trigrams", action=argparse.BooleanOptionalAction, default=defaults.block_trigrams,
                       help="no caption repeats one of its own trigrams (beam search and --sample; default: on)")
    group.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    parser.add_argument("--debug", action="store_true", help="show a traceback for every error")
    return parser


def decode_options_from_args(args: argparse.Namespace) -> DecodeOptions:
    opts = DecodeOptions(**{f.name: getattr(args, f.name) for f in fields(DecodeOptions)})
    check_fields(opts, as_flags=True)
    return opts


@torch.no_grad()
def decode_images(
    model: ShowAttendTell,
    images: torch.Tensor,
    word_map: dict[str, int],
    opts: DecodeOptions,
    *,
    device: torch.device | str = "cpu",
    amp: str = "off",
    n_best: int = 1,
) -> list[list[Hypothesis]]:
    """Beam-search (or, with opts.sample, sample) images (N, 3, S, S) in batches of opts.batch_size; per
    image a list of its n_best Hypotheses, best first (n_best <= opts.beam_size).

    Each batch is one `models.beam_search` call: all its images and all their beams decoded together.
    """
    model.eval()
    device = torch.device(device)
    context_mode = opts.hard_decode if model.decoder.attention.stochastic else "expected"
    hypotheses: list[list[Hypothesis]] = []
    for first in range(0, images.size(0), opts.batch_size):
        batch = images[first : first + opts.batch_size].to(device, non_blocking=True)  # (b, 3, S, S)
        with autocast_context(device, amp):
            hypotheses += beam_search(model, batch, word_map, beam_size=opts.beam_size, max_len=opts.max_len,
                                      length_penalty=opts.length_penalty, context_mode=context_mode, n_best=n_best,
                                      sample=opts.sample, temperature=opts.temperature, top_k=opts.top_k,
                                      top_p=opts.top_p, block_trigrams=opts.block_trigrams)
    return hypotheses


def decode_split(
    model: ShowAttendTell,
    loader: Iterable[dict[str, Any]],
    word_map: dict[str, int],
    opts: DecodeOptions,
    *,
    device: torch.device | str = "cpu",
    amp: str = "off",
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Decode every image of a packed split once. Returns per image: index, caption, tokens, words,
    references, finished, and the attention maps `alphas` (T, enc_size, enc_size) and gates `betas` (T,)."""
    rev_word_map = {v: k for k, v in word_map.items()}
    decoded = []
    for batch in progress_bar(loader, desc="decode", disable=not progress):
        hypotheses = decode_images(model, batch["image"], word_map, opts, device=device, amp=amp)
        for index, references, (hyp,) in zip(batch["index"], batch["references"], hypotheses):
            decoded.append(
                {
                    "index": int(index),
                    "caption": decode_ids(hyp.tokens, rev_word_map),
                    "tokens": hyp.tokens,
                    "words": [rev_word_map.get(t, "<unk>") for t in hyp.tokens],
                    "references": list(references),
                    "finished": hyp.finished,
                    "alphas": hyp.alphas,
                    "betas": hyp.betas,
                }
            )
    return decoded
