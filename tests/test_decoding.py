"""decoding.beam_search on tiny seeded random models: greedy equivalence, batching, scores, fallbacks."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from satkit.config import ModelConfig
from satkit.decoding import beam_search
from satkit.training.losses import target_log_probs
from satkit.model import StepOutput, build_model

WORDS = ["a", "red", "blue", "green", "circle", "square", "triangle", "on", "left", "of"]
WORD_MAP = {"<pad>": 0, "<unk>": 1, "<start>": 2, "<end>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
START, END, PAD = WORD_MAP["<start>"], WORD_MAP["<end>"], WORD_MAP["<pad>"]
GRID = 4  # enc_size: L = 16 locations
MAX_LEN = 10


def tiny_model(*, attention: str = "soft", deep_output: bool = True, gate: str = "scalar", end_bias: float = 1.0,
               peak: float = 2.0, seed: int = 0) -> torch.nn.Module:
    """A tiny random model in eval mode whose outputs are made informative without training.

    The output layer is scaled by `peak` (sharper, fewer near-ties), <pad>/<start>/<unk> are banned, and
    `end_bias` is added to <end>: the default gives a mix of finished and unfinished greedy captions.
    The context/initial-state weights are scaled so that captions depend on the image.
    """
    cfg = ModelConfig(encoder="resnet18", encoder_stages=2, enc_size=GRID, attention_dim=16, embed_dim=16,
                      decoder_dim=32, attention=attention, deep_output=deep_output, gate=gate, vocab_size=len(WORD_MAP))
    torch.manual_seed(seed)
    model = build_model(cfg)
    decoder = model.decoder
    with torch.no_grad():
        out = decoder.L_o if deep_output else decoder.fc
        out.weight *= peak
        out.bias[END] += end_bias
        out.bias[[PAD, START, WORD_MAP["<unk>"]]] = -1e4
        decoder.init_h.weight *= 5
        (decoder.L_z if deep_output else decoder.init_c).weight *= 5
    return model.eval()


def varied_model(end_bias: float = -3.0) -> torch.nn.Module:
    """A tiny deep-output model whose captions vary word to word, so beams overtake one another.

    The embedding E is scaled up, so y_{t-1} drives y_t through the deep output's E y_{t-1} term, and
    <end> is tied to the word "of" (its L_o row is E["of"]): captions tend to end after "of".
    """
    model = tiny_model(peak=1.0, end_bias=0.0)
    decoder = model.decoder
    with torch.no_grad():
        decoder.embedding.weight *= 30
        decoder.L_o.weight[END] = 0.3 * decoder.embedding.weight[WORD_MAP["of"]]
        decoder.L_o.bias[END] = end_bias
    return model


def tiny_images(n: int, seed: int = 0) -> torch.Tensor:
    """(n, 3, 32, 32) images that differ in colour, so the captions differ too."""
    g = torch.Generator().manual_seed(seed)
    shift = torch.linspace(-2, 2, n)[:, None, None, None] * torch.tensor([1.0, -1.0, 0.5])[None, :, None, None]
    return torch.randn(n, 3, 32, 32, generator=g) + shift


@torch.no_grad()
def greedy(model: torch.nn.Module, image: torch.Tensor, max_len: int) -> tuple[list[int], float, bool, torch.Tensor]:
    """Reference greedy decoding of one image (1, 3, S, S), written independently of beam_search."""
    decoder = model.decoder
    features = model.encoder(image)  # (1, L, D)
    features_proj = decoder.attention.project(features)
    state = decoder.init_state(features)
    word = torch.tensor([START])
    tokens, alphas, score = [], [], 0.0
    for _ in range(max_len):
        out = decoder.step(word, state, features, features_proj, "expected")
        log_probs = F.log_softmax(out.logits, dim=1)[0]  # (V,)
        word_id = int(log_probs.argmax())
        score += float(log_probs[word_id])
        if word_id == END:
            return tokens, score, True, torch.stack(alphas) if alphas else torch.empty(0, GRID * GRID)
        tokens.append(word_id)
        alphas.append(out.alpha[0])
        word, state = torch.tensor([word_id]), out.state
    return tokens, score, False, torch.stack(alphas)


def best_hypotheses(*args, **kwargs) -> list:
    """beam_search's best hypothesis per image (it returns a list of the n_best per image)."""
    per_image = beam_search(*args, **kwargs)
    assert all(len(hyps) == kwargs.get("n_best", 1) for hyps in per_image)
    return [hyps[0] for hyps in per_image]


MODELS = {  # both give a mix of finished and cut-off greedy captions on tiny_images(6)
    "deep_output": lambda: varied_model(end_bias=0.0),
    "linear_output": lambda: tiny_model(deep_output=False, end_bias=0.5),
}


@pytest.mark.parametrize("kind", MODELS)
def test_beam_size_1_is_greedy(kind):
    model = MODELS[kind]()
    images = tiny_images(6)
    hypotheses = best_hypotheses(model, images, WORD_MAP, beam_size=1, max_len=MAX_LEN)
    outcomes = set()
    for i, hyp in enumerate(hypotheses):
        tokens, score, done, alphas = greedy(model, images[i : i + 1], MAX_LEN)
        assert hyp.tokens == tokens, i
        assert hyp.finished == done, i
        assert hyp.score == pytest.approx(score, abs=1e-4), i
        assert torch.allclose(hyp.alphas.reshape(len(tokens), GRID * GRID), alphas, atol=1e-6), i
        outcomes.add(done)
    assert outcomes == {True, False}  # both a caption that ends and one cut at max_len were compared


def test_batch_size_invariance():
    model = varied_model(end_bias=0.0)
    images = tiny_images(6)
    batched = best_hypotheses(model, images, WORD_MAP, beam_size=3, max_len=MAX_LEN)
    single = [best_hypotheses(model, images[i : i + 1], WORD_MAP, beam_size=3, max_len=MAX_LEN)[0]
              for i in range(6)]
    assert [h.tokens for h in batched] == [h.tokens for h in single]
    assert [h.finished for h in batched] == [h.finished for h in single]
    for b, s in zip(batched, single):
        assert b.score == pytest.approx(s.score, abs=1e-4)
        assert torch.allclose(b.alphas, s.alphas, atol=1e-5)
    assert len({tuple(h.tokens) for h in batched}) > 1  # the images really get different captions


@pytest.mark.parametrize("deep_output", [True, False])
@pytest.mark.parametrize("beam_size", [1, 3])
def test_no_finish_falls_back_to_best_unfinished(beam_size, deep_output):
    model = tiny_model(deep_output=deep_output)
    with torch.no_grad():
        (model.decoder.L_o if deep_output else model.decoder.fc).bias[END] = -1e4  # <end> can never win
    hypotheses = best_hypotheses(model, tiny_images(3), WORD_MAP, beam_size=beam_size, max_len=7)
    assert len(hypotheses) == 3
    for hyp in hypotheses:
        assert len(hyp.tokens) == 7
        assert not hyp.finished
        assert END not in hyp.tokens
        assert hyp.alphas.shape == (7, GRID, GRID) and hyp.betas.shape == (7,)
        assert hyp.score < 0 and hyp.score > -1e3  # a real log-prob, not the -1e9 "unfinished" offset


@pytest.mark.parametrize("end_bias,beam_size", [(-3.0, 3), (-1.0, 5), (0.0, 3)])
def test_beam_scores_are_the_log_likelihood_of_the_returned_caption(end_bias, beam_size):
    """hyp.score is sum_t log p(y_t | a, y_<t) of its own tokens (+ <end>), recomputed by teacher forcing:
    this checks that beam search carries each beam's state, words and attention to the right child."""
    model = varied_model(end_bias)
    images = tiny_images(6)
    hypotheses = best_hypotheses(model, images, WORD_MAP, beam_size=beam_size, max_len=MAX_LEN)
    for i, hyp in enumerate(hypotheses):
        caption = [START, *hyp.tokens] + ([END] if hyp.finished else [])
        captions = torch.tensor([caption + [PAD]])  # (1, T+2): one pad so teacher forcing sees every target
        caplens = torch.tensor([len(caption)])
        with torch.no_grad():
            out = model.decoder(model.encoder(images[i : i + 1]), captions, caplens)
        log_lik = (target_log_probs(out["logits"], out["targets"]) * out["mask"]).sum(dim=1)  # (N,)
        assert float(log_lik[0]) == pytest.approx(hyp.score, abs=1e-4), i
        n = len(hyp.tokens)
        assert torch.allclose(hyp.alphas, out["alphas"][0, :n].view(n, GRID, GRID), atol=1e-5), i


def test_alphas_and_betas_per_word():
    model = varied_model(end_bias=-1.0)
    for hyp in best_hypotheses(model, tiny_images(4), WORD_MAP, beam_size=5, max_len=MAX_LEN):
        n = len(hyp.tokens)
        assert hyp.alphas.shape == (n, GRID, GRID)
        assert torch.allclose(hyp.alphas.sum(dim=(1, 2)), torch.ones(n), atol=1e-5)
        assert (hyp.alphas >= 0).all()
        assert hyp.betas.shape == (n,) and ((hyp.betas > 0) & (hyp.betas < 1)).all()  # sigmoid gate
        assert all(isinstance(t, int) and 4 <= t < len(WORD_MAP) for t in hyp.tokens)


def test_wider_beam_finds_at_least_the_greedy_log_prob():
    """Not a theorem (greedy's path can be pruned), so checked on this seeded case: for every image where
    both searches finish, beam 5's caption is at least as likely as greedy's, and better for some."""
    model = varied_model(end_bias=0.0)
    images = tiny_images(6)
    greedy_hyps = best_hypotheses(model, images, WORD_MAP, beam_size=1, max_len=MAX_LEN)
    beam_hyps = best_hypotheses(model, images, WORD_MAP, beam_size=5, max_len=MAX_LEN)
    both = [(g, b) for g, b in zip(greedy_hyps, beam_hyps) if g.finished and b.finished]
    assert len(both) >= 3
    assert all(b.score >= g.score - 1e-5 for g, b in both)
    assert any(b.score > g.score + 1e-3 for g, b in both)


# --------------------------------------------------------------------------------------------
# Length penalty: a decoder whose next-word distribution depends only on the previous word
# --------------------------------------------------------------------------------------------
# From <start>: <end> 0.50, "a" 0.45.  From "a": "red" 0.95.  From "red": <end> 0.95.
#   short: "" + <end>         raw log p = log .50                = -0.693, per token -0.693
#   long:  "a red" + <end>    raw log p = log .45 + 2 log .95    = -0.901, per token -0.300
_NEXT = {START: {END: 0.50, WORD_MAP["a"]: 0.45}, WORD_MAP["a"]: {WORD_MAP["red"]: 0.95},
         WORD_MAP["red"]: {END: 0.95}}


def controlled_step(table: dict[int, dict[int, float]]):
    """A stand-in for Decoder.step: p(y_t | y_{t-1}) from `table` (unlisted words share what is left)."""

    def step(words, state, features, features_proj, context_mode="expected"):
        vocab = len(WORD_MAP)
        logits = torch.empty(words.size(0), vocab)
        for row, word in enumerate(words.tolist()):
            probs = table.get(word, {END: 0.9})
            rest = (1.0 - sum(probs.values())) / (vocab - len(probs))
            logits[row] = torch.full((vocab,), rest).index_put_((torch.tensor(list(probs)),),
                                                                torch.tensor(list(probs.values()))).log()
        alpha = torch.full((words.size(0), features.size(1)), 1.0 / features.size(1))  # (B, L) uniform
        return StepOutput(logits, state, alpha, torch.ones(words.size(0), 1), None)

    return step


@pytest.mark.parametrize("length_penalty,expected", [(0.0, []), (1.0, ["a", "red"])])
def test_length_penalty_changes_the_ranking(length_penalty, expected, monkeypatch):
    model = tiny_model()
    monkeypatch.setattr(model.decoder, "step", controlled_step(_NEXT))
    rev = {v: k for k, v in WORD_MAP.items()}
    hyp = best_hypotheses(model, tiny_images(1), WORD_MAP, beam_size=3, max_len=6, length_penalty=length_penalty)[0]
    assert [rev[t] for t in hyp.tokens] == expected
    assert hyp.finished
    raw = {(): 0.50, ("a", "red"): 0.45 * 0.95 * 0.95}[tuple(expected)]
    assert hyp.score == pytest.approx(torch.tensor(raw).log().item(), abs=1e-5)
    length = len(expected) + 1  # words + <end>
    assert hyp.normalized_score == pytest.approx(hyp.score / length**length_penalty, abs=1e-5)


def test_a_finished_caption_outranks_a_likelier_unfinished_one(monkeypatch):
    """"a a a a" (cut at max_len) is likelier than "" + <end>, but only the latter is a complete caption."""
    a = WORD_MAP["a"]
    model = tiny_model()
    monkeypatch.setattr(model.decoder, "step", controlled_step({START: {a: 0.9, END: 0.05}, a: {a: 0.99, END: 0.001}}))
    hyp = best_hypotheses(model, tiny_images(1), WORD_MAP, beam_size=3, max_len=4)[0]
    assert hyp.tokens == [] and hyp.finished
    assert hyp.score == pytest.approx(torch.tensor(0.05).log().item(), abs=1e-5)
    greedy_hyp = best_hypotheses(model, tiny_images(1), WORD_MAP, beam_size=1, max_len=4)[0]  # never sees <end>
    assert greedy_hyp.tokens == [a] * 4 and not greedy_hyp.finished


# --------------------------------------------------------------------------------------------
# Hard attention decoding modes
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["expected", "argmax", "sample"])
def test_hard_attention_decodes_in_every_mode(mode):
    model = tiny_model(attention="hard", end_bias=1.5)
    images = tiny_images(4)
    torch.manual_seed(1)
    first = best_hypotheses(model, images, WORD_MAP, beam_size=3, max_len=MAX_LEN, context_mode=mode)
    torch.manual_seed(1)
    again = best_hypotheses(model, images, WORD_MAP, beam_size=3, max_len=MAX_LEN, context_mode=mode)
    assert [h.tokens for h in first] == [h.tokens for h in again]  # reproducible under a seed
    for hyp in first:
        n = len(hyp.tokens)
        assert hyp.alphas.shape == (n, GRID, GRID)
        assert torch.allclose(hyp.alphas.sum(dim=(1, 2)), torch.ones(n), atol=1e-5)
        assert -1e3 < hyp.score <= 0


def test_hard_expected_mode_equals_soft_attention_with_the_same_weights():
    hard = tiny_model(attention="hard", end_bias=1.5)
    soft = tiny_model(attention="soft", end_bias=1.5)
    soft.load_state_dict(hard.state_dict())  # same parameters; only the context rule differs
    images = tiny_images(4)
    h = best_hypotheses(hard, images, WORD_MAP, beam_size=3, max_len=MAX_LEN, context_mode="expected")
    # soft attention ignores the context mode
    s = best_hypotheses(soft, images, WORD_MAP, beam_size=3, max_len=MAX_LEN, context_mode="sample")
    assert [x.tokens for x in h] == [x.tokens for x in s]
    assert [x.score for x in h] == pytest.approx([x.score for x in s], abs=1e-5)


def test_hard_sample_mode_is_stochastic():
    """Sampled locations s_t change the context, so different seeds give different log-probs."""
    model = tiny_model(attention="hard", end_bias=1.5)
    images = tiny_images(4)
    scores = set()
    for seed in range(4):
        torch.manual_seed(seed)
        scores.add(tuple(round(h.score, 5) for h in best_hypotheses(model, images, WORD_MAP, beam_size=1,
                                                                     max_len=MAX_LEN, context_mode="sample")))
    assert len(scores) > 1


def test_rejects_bad_beam_size():
    with pytest.raises(ValueError, match="beam_size"):
        beam_search(tiny_model(), tiny_images(1), WORD_MAP, beam_size=0)
    with pytest.raises(ValueError, match=r"n_best=4 must be in 1..beam_size=3"):
        beam_search(tiny_model(), tiny_images(1), WORD_MAP, beam_size=3, n_best=4)


# --------------------------------------------------------------------------------------------
# n-best
# --------------------------------------------------------------------------------------------
def test_n_best_returns_the_final_beam_ranked():
    """n_best=k gives k distinct captions per image, best first (finished before unfinished, then by
    normalized score), the first being the n_best=1 answer; each score is its caption's own log-likelihood."""
    model = varied_model(end_bias=-1.0)
    images = tiny_images(4)
    best = best_hypotheses(model, images, WORD_MAP, beam_size=4, max_len=MAX_LEN, length_penalty=0.7)
    per_image = beam_search(model, images, WORD_MAP, beam_size=4, max_len=MAX_LEN, length_penalty=0.7, n_best=4)
    assert len(per_image) == 4
    for i, hyps in enumerate(per_image):
        assert len(hyps) == 4
        assert hyps[0].tokens == best[i].tokens and hyps[0].score == pytest.approx(best[i].score, abs=1e-5)
        assert len({(tuple(h.tokens), h.finished) for h in hyps}) == 4  # four different captions
        keys = [(h.finished, h.normalized_score) for h in hyps]
        assert keys == sorted(keys, reverse=True), i
        for hyp in hyps:
            assert hyp.normalized_score == pytest.approx(
                hyp.score / (len(hyp.tokens) + hyp.finished) ** 0.7, abs=1e-5)
            caption = [START, *hyp.tokens] + ([END] if hyp.finished else [])
            with torch.no_grad():
                out = model.decoder(model.encoder(images[i : i + 1]), torch.tensor([caption + [PAD]]),
                                    torch.tensor([len(caption)]))
            log_lik = (target_log_probs(out["logits"], out["targets"]) * out["mask"]).sum()
            assert float(log_lik) == pytest.approx(hyp.score, abs=1e-4), i
            assert hyp.alphas.shape == (len(hyp.tokens), GRID, GRID)
    assert any(hyps[0].finished and not hyps[-1].finished for hyps in per_image)  # both groups in one beam
    assert any(not hyps[0].finished for hyps in per_image)  # and the fallback to unfinished ones
