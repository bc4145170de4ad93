"""One decode path: validation in train.py, eval.py and caption.py decode with the same options, flags,
defaults and code, so they cannot drift apart.

    DecodeOptions       beam size, longest caption, length penalty, hard attention's context, batch size
    decode_args_parser  the argparse parent both scripts share (--beam-size, --max-len, ...)
    decode_images       a tensor of images -> the n best Hypotheses per image (best first)
    decode_split        a DataLoader of a packed split -> per image: caption, words, references, attention
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from typing import Any, Iterable

import torch

from models import Hypothesis, ShowAttendTell, beam_search
from utils import HARD_DECODE_MODES, autocast_context, check_fields, decode_ids, option, progress_bar

__all__ = ["DecodeOptions", "decode_args_parser", "decode_options_from_args", "decode_images", "decode_split"]


@dataclass
class DecodeOptions:
    beam_size: int = option(5, min=1)  # 1 = greedy
    max_len: int = option(50, min=1)  # longest caption decoded, in words
    length_penalty: float = option(0.0)  # rank finished captions by score / length**p (0 = raw log-prob)
    hard_decode: str = option("expected", choices=HARD_DECODE_MODES)  # hard models' context; soft ignores it
    batch_size: int = option(32, min=1)  # images decoded at once (each with beam_size rows)


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
    """Beam-search images (N, 3, S, S) in batches of opts.batch_size; per image a list of its n_best
    Hypotheses, best first (n_best <= opts.beam_size).

    Each batch is one `models.beam_search` call: all its images and all their beams decoded together.
    """
    model.eval()
    device = torch.device(device)
    context_mode = opts.hard_decode if model.attention_variant == "hard" else "expected"
    hypotheses: list[list[Hypothesis]] = []
    for first in range(0, images.size(0), opts.batch_size):
        batch = images[first : first + opts.batch_size].to(device, non_blocking=True)  # (b, 3, S, S)
        with autocast_context(device, amp):
            hypotheses += beam_search(model, batch, word_map, beam_size=opts.beam_size, max_len=opts.max_len,
                                      length_penalty=opts.length_penalty, context_mode=context_mode, n_best=n_best)
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
