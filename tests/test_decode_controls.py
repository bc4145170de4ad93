"""Decoding controls in beam_search's one path: sampling (temperature, top-k, top-p) and trigram blocking,
through beam_search, DecodeOptions and the shared flags, the Captioner API and caption.py."""
from __future__ import annotations

import inspect
import json

import pytest
import torch
from test_caption import make_checkpoint, shapes_image
from test_decoding import (END, MAX_LEN, MODELS, PAD, START, WORD_MAP, controlled_step, tiny_images, tiny_model,
                           varied_model)

import caption
from satkit.captioner import Captioner
from satkit.config import TrainConfig
from satkit.decoding import DecodeOptions, beam_search, decode_args_parser, decode_options_from_args
from satkit.training.losses import target_log_probs
from satkit.infra.runtime import UserError

A, RED = WORD_MAP["a"], WORD_MAP["red"]
# "a red a red ...", <end> nearly never; any other word is followed by <end> (controlled_step's default).
LOOP = {START: {A: 0.9, END: 1e-6}, A: {RED: 0.9, END: 1e-6}, RED: {A: 0.9, END: 1e-6}}


def repeats_a_trigram(tokens: list[int]) -> bool:
    trigrams = [tuple(tokens[i : i + 3]) for i in range(len(tokens) - 2)]
    return len(trigrams) != len(set(trigrams))


def log_likelihood(model: torch.nn.Module, image: torch.Tensor, tokens: list[int], finished: bool) -> float:
    """sum_t log p(y_t | a, y_<t) of a caption (+ <end> when finished), by teacher forcing."""
    caption = [START, *tokens] + ([END] if finished else [])
    with torch.no_grad():
        out = model.decoder(model.encoder(image[None]), torch.tensor([caption + [0]]), torch.tensor([len(caption)]))
    return float((target_log_probs(out["logits"], out["targets"]) * out["mask"]).sum())


def captions(per_image: list[list]) -> list[list[tuple[int, ...]]]:
    return [[tuple(h.tokens) for h in hyps] for hyps in per_image]


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("control", [{"top_k": 1}, {"top_p": 1e-6}, {"temperature": 1e-5}])
def test_sharpest_sampling_is_greedy(kind, control):
    """top_k=1 is exactly greedy (the same argmax); a tiny top_p or temperature leaves no other word."""
    model, images = MODELS[kind](), tiny_images(6)
    greedy = beam_search(model, images, WORD_MAP, beam_size=1, max_len=MAX_LEN)
    torch.manual_seed(0)
    sampled = beam_search(model, images, WORD_MAP, beam_size=3, n_best=3, max_len=MAX_LEN, sample=True, **control)
    for (g,), samples in zip(greedy, sampled):
        for s in samples:  # all three rows draw greedy's caption, with greedy's score
            assert (s.tokens, s.finished) == (g.tokens, g.finished)
            assert s.score == pytest.approx(g.score, abs=1e-5)
    assert {g.finished for (g,) in greedy} == {True, False}


def test_samples_differ_and_are_ranked_and_scored_as_beams():
    """beam_size=5 samples per image: several distinct captions, ranked finished first then by normalized
    score, each score its caption's own log-likelihood (temperature and top_p shape only the draws)."""
    model, images = varied_model(end_bias=-1.0), tiny_images(4)
    torch.manual_seed(0)
    per_image = beam_search(model, images, WORD_MAP, beam_size=5, n_best=5, max_len=MAX_LEN, length_penalty=0.7,
                            sample=True, temperature=1.5, top_p=0.95)
    for image, hyps in zip(images, per_image):
        assert len(hyps) == 5 and len({(tuple(h.tokens), h.finished) for h in hyps}) >= 3
        keys = [(h.finished, h.normalized_score) for h in hyps]
        assert keys == sorted(keys, reverse=True)
        for h in hyps:
            assert h.score == pytest.approx(log_likelihood(model, image, h.tokens, h.finished), abs=1e-4)
            assert h.normalized_score == pytest.approx(h.score / (len(h.tokens) + h.finished) ** 0.7, abs=1e-5)
            assert h.alphas.shape == (len(h.tokens), 4, 4)


def test_sampling_is_reproducible_under_a_seed():
    model, images = tiny_model(end_bias=-1.0), tiny_images(3)
    runs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        runs.append(captions(beam_search(model, images, WORD_MAP, beam_size=4, n_best=4, max_len=MAX_LEN,
                                         sample=True, top_k=5)))
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_top_k_draws_only_among_the_k_likeliest_words(monkeypatch):
    """From <start>: "a" .5, "red" .3, <end> .15 (the rest share .05): top_k=2 never draws <end> nor the rest."""
    model = tiny_model()
    monkeypatch.setattr(model.decoder, "step", controlled_step({START: {A: 0.5, RED: 0.3, END: 0.15}}))
    torch.manual_seed(0)
    per_image = beam_search(model, tiny_images(4), WORD_MAP, beam_size=8, n_best=8, max_len=3, sample=True, top_k=2)
    firsts = {h.tokens[0] for hyps in per_image for h in hyps}
    assert firsts == {A, RED}


# From <start>: "a" .5, "red" .3, <end> .15, and .05 shared by the other 11 words, of which <pad> and <start>
# are never drawn: renormalised, "a" .505, "red" .303 (together .807), <end> .151, 9 words .0046 each.
FIRST = {START: {A: 0.5, RED: 0.3, END: 0.15}}


def first_word_frequencies(monkeypatch, draws: int = 4000, **control) -> torch.Tensor:
    """(V,) how often each word is the first of `draws` samples of one image from FIRST, under `control`."""
    model = tiny_model()
    monkeypatch.setattr(model.decoder, "step", controlled_step(FIRST))
    torch.manual_seed(0)
    (hyps,) = beam_search(model, tiny_images(1), WORD_MAP, beam_size=draws, n_best=draws, max_len=1, sample=True,
                          **control)
    firsts = torch.tensor([h.tokens[0] if h.tokens else END for h in hyps])
    return torch.bincount(firsts, minlength=len(WORD_MAP)).float() / draws


def tempered(temperature: float, kept: tuple[int, ...] | None = None) -> torch.Tensor:
    """(V,) FIRST's p(w) ** (1 / temperature), renormalised over `kept` (default: every drawable word)."""
    p = torch.full((len(WORD_MAP),), 0.05 / (len(WORD_MAP) - 3))
    p[A], p[RED], p[END] = 0.5, 0.3, 0.15
    p[[PAD, START]] = 0.0
    q = p ** (1 / temperature)
    if kept is not None:
        q = torch.zeros_like(q).index_copy(0, torch.tensor(kept), q[list(kept)])
    return q / q.sum()


@pytest.mark.parametrize("temperature,top_p,kept", [
    (1.0, 0.50, (A,)),  # "a" alone holds .505 >= p
    (1.0, 0.51, (A, RED)),  # "a" holds less than p: the word that crosses p is kept
    (1.0, 0.80, (A, RED)),
    (1.0, 0.81, (A, RED, END)),
    (2.0, 0.60, (A, RED, END)),  # the tempered distribution's nucleus: "a" and "red" hold .56 there (.81 at T=1)
])
def test_top_p_keeps_the_fewest_likeliest_words_that_hold_p(temperature, top_p, kept, monkeypatch):
    """The nucleus at p: the likeliest words, in order, up to and including the one whose mass reaches p;
    draws among them in proportion to their (tempered) probabilities, and never any other word."""
    frequencies = first_word_frequencies(monkeypatch, temperature=temperature, top_p=top_p)
    assert set(frequencies.nonzero().flatten().tolist()) == set(kept)
    torch.testing.assert_close(frequencies, tempered(temperature, kept), rtol=0, atol=0.03)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_divides_the_log_probabilities(temperature, monkeypatch):
    """Draws follow exp(log p / T), renormalised: p**2 at T=.5 ("a" .69), sqrt(p) at T=2 ("a" .31, each
    of the 9 rare words .03)."""
    frequencies = first_word_frequencies(monkeypatch, temperature=temperature)
    torch.testing.assert_close(frequencies, tempered(temperature), rtol=0, atol=0.03)


def test_bad_sampling_values_are_refused():
    model, image = tiny_model(), tiny_images(1)
    for control, message in (({"temperature": 0.0}, "temperature"), ({"top_k": -1}, "top_k"),
                             ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p")):
        with pytest.raises(ValueError, match=message):
            beam_search(model, image, WORD_MAP, beam_size=2, sample=True, **control)


# --------------------------------------------------------------------------------------------
# Trigram blocking
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("decode", [{"beam_size": 1}, {"beam_size": 3}, {"beam_size": 4, "sample": True}])
def test_blocked_trigrams_never_repeat(decode, monkeypatch):
    """A model rigged to loop "a red a red ..." repeats trigrams; with blocking no caption of the n-best does."""
    model = tiny_model()
    monkeypatch.setattr(model.decoder, "step", controlled_step(LOOP))
    n = decode["beam_size"]
    torch.manual_seed(0)
    loops = beam_search(model, tiny_images(2), WORD_MAP, max_len=12, n_best=n, **decode)
    assert any(repeats_a_trigram(h.tokens) for hyps in loops for h in hyps)
    torch.manual_seed(0)
    blocked = beam_search(model, tiny_images(2), WORD_MAP, max_len=12, n_best=n, block_trigrams=True, **decode)
    assert not any(repeats_a_trigram(h.tokens) for hyps in blocked for h in hyps)
    if n == 1:  # greedy loops until "a" would repeat "a red a", takes another word, then ends
        assert all(h.tokens[:4] == [A, RED, A, RED] and len(h.tokens) == 5 and h.finished for (h,) in blocked)


def test_blocking_follows_beams_and_retired_images():
    """Images retire at different steps here, so the histories are reordered by parent and by `keep`:
    batched and one-by-one searches agree, no caption repeats a trigram, and some did without blocking."""
    model, images = varied_model(end_bias=0.0), tiny_images(6)
    plain = beam_search(model, images, WORD_MAP, beam_size=3, n_best=3, max_len=20)
    batched = beam_search(model, images, WORD_MAP, beam_size=3, n_best=3, max_len=20, block_trigrams=True)
    single = [beam_search(model, images[i : i + 1], WORD_MAP, beam_size=3, n_best=3, max_len=20,
                          block_trigrams=True)[0] for i in range(6)]
    assert captions(batched) == captions(single)
    assert len({len(hyps[0].tokens) for hyps in batched}) > 1  # images left the batch at different steps
    assert any(repeats_a_trigram(h.tokens) for hyps in plain for h in hyps)
    assert not any(repeats_a_trigram(h.tokens) for hyps in batched for h in hyps)
    for image, hyps in zip(images, batched):  # a blocked word is banned, not re-scored: scores stay the model's
        for h in hyps:
            assert h.score == pytest.approx(log_likelihood(model, image, h.tokens, h.finished), abs=1e-4)


# --------------------------------------------------------------------------------------------
# Options, flags, API and caption.py
# --------------------------------------------------------------------------------------------
def test_flags_and_options():
    defaults = decode_options_from_args(decode_args_parser().parse_args([]))
    assert defaults == DecodeOptions()
    assert (defaults.sample, defaults.temperature, defaults.top_k, defaults.top_p, defaults.block_trigrams) == (
        False, 1.0, 0, 1.0, True)  # a beam search that never repeats a trigram: no caption loops to max_len
    opts = decode_options_from_args(decode_args_parser().parse_args(
        ["--sample", "--temperature", "0.7", "--top-k", "5", "--top-p", "0.9", "--no-block-trigrams"]))
    assert (opts.sample, opts.temperature, opts.top_k, opts.top_p, opts.block_trigrams) == (True, 0.7, 5, 0.9, False)
    # Validation and the Captioner decode the same way by default.
    assert TrainConfig().block_trigrams and inspect.signature(Captioner.__call__).parameters["block_trigrams"].default
    for argv, flag in ((["--temperature", "0"], "--temperature"), (["--top-k", "-1"], "--top-k"),
                       (["--top-p", "0"], "--top-p"), (["--top-p", "1.2"], "--top-p")):
        with pytest.raises(UserError, match=flag):
            decode_options_from_args(decode_args_parser().parse_args(argv))
    assert "sample" not in DecodeOptions().record() and DecodeOptions().record()["block_trigrams"] is True
    assert DecodeOptions(sample=True, top_p=0.9).record()["top_p"] == 0.9


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("controls") / "soft.pt")


def test_captioner_samples(ckpt):
    cap = Captioner.from_checkpoint(ckpt)
    images = [shapes_image(seed=i) for i in range(2)]
    torch.manual_seed(0)
    results = cap(images, sample=True, temperature=0.7, top_k=0, top_p=0.9, block_trigrams=True, beam_size=5,
                  n_best=5, max_len=8)
    torch.manual_seed(0)
    again = cap(images, sample=True, temperature=0.7, top_k=0, top_p=0.9, block_trigrams=True, beam_size=5,
                n_best=5, max_len=8)
    assert [[c.text for c in r.captions] for r in results] == [[c.text for c in r.captions] for r in again]
    for result in results:
        assert len(result.captions) == 5 and len({c.text for c in result.captions}) > 1
        assert all(not repeats_a_trigram(c.tokens) for c in result.captions)
    with pytest.raises(UserError, match="top_p"):
        cap(images, sample=True, top_p=0.0)


def test_caption_cli_samples(ckpt, tmp_path, capsys, write_image):
    image = write_image(tmp_path / "in" / "im.png", shapes_image(seed=0))
    json_path = tmp_path / "captions.json"
    code = caption.main(["--img", str(image), "--checkpoint", str(ckpt), "--out-dir", str(tmp_path / "figs"),
                         "--sample", "--n-best", "3", "--beam-size", "3", "--max-len", "6", "--top-k", "4",
                         "--json", str(json_path)])
    out = capsys.readouterr().out
    assert code == 0 and out.startswith(f"{image}: ")
    data = json.loads(json_path.read_text())
    assert data["decode"]["sample"] is True and data["decode"]["top_k"] == 4
    assert [e["rank"] for e in data["images"][0]["n_best"]] == [1, 2, 3]
