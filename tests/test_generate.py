"""Sampling settings, stop conditions and the text stream."""

from __future__ import annotations

import math

import pytest
import torch

from dsmoe import load
from dsmoe.errors import UsageError
from dsmoe.model.generate import Sampler, SamplingSettings, TextStream, generate_ids, stream_text


@pytest.fixture(scope="module")
def loaded(tiny_path):
    return load(tiny_path, dtype=torch.float32)


def test_unset_settings_stop_a_reply_at_256_new_tokens(loaded):
    """The documented default limit (SamplingSettings' docstring), counted on a run with no stop id."""
    model, tokenizer = loaded
    assert len(list(generate_ids(model, tokenizer.encode("The software"), SamplingSettings()))) == 256


def test_seeded_sampling_is_reproducible_and_differs_from_greedy(loaded):
    model, tokenizer = loaded
    prompt = tokenizer.encode("The software is provided")
    sampled = SamplingSettings(max_new_tokens=16, temperature=1.0, seed=7)
    first = list(generate_ids(model, prompt, sampled))
    again = list(generate_ids(model, prompt, SamplingSettings(max_new_tokens=16, temperature=1.0, seed=7)))
    greedy = list(generate_ids(model, prompt, SamplingSettings(max_new_tokens=16)))
    assert first == again
    assert first != greedy


def test_top_k_one_is_greedy(loaded):
    model, tokenizer = loaded
    prompt = tokenizer.encode("Permission is hereby granted")
    greedy = list(generate_ids(model, prompt, SamplingSettings(max_new_tokens=12)))
    top1 = list(generate_ids(model, prompt, SamplingSettings(max_new_tokens=12, temperature=0.8, top_k=1, seed=3)))
    assert top1 == greedy


def test_top_p_keeps_only_the_nucleus():
    logits = torch.tensor([4.0, 3.0, 0.0, -1.0])
    sampler = Sampler(SamplingSettings(temperature=1.0, top_p=0.5, seed=0))
    assert {sampler(logits, []) for _ in range(50)} == {0}


def _draws(logits: list[float], seeds: int = 2000, **settings: float) -> list[int]:
    return [Sampler(SamplingSettings(seed=seed, **settings))(torch.tensor(logits), []) for seed in range(seeds)]


def test_top_p_samples_an_unsorted_nucleus_in_proportion():
    # By hand: softmax of [0, 2, -1, 1.5, 1] is [.063, .463, .023, .281, .170]. Sorted, .463 < 0.7
    # and .463 + .281 = .744 >= 0.7, so the nucleus is tokens 1 and 3, renormalised to
    # e^2 / (e^2 + e^1.5) = 1 / (1 + e^-0.5) = 0.6225 and 0.3775.
    draws = _draws([0.0, 2.0, -1.0, 1.5, 1.0], temperature=1.0, top_p=0.7)
    assert set(draws) == {1, 3}
    share = draws.count(1) / len(draws)
    assert abs(share - 1 / (1 + math.exp(-0.5))) < 4 * math.sqrt(0.6225 * 0.3775 / len(draws))  # 4 sigma


def test_top_p_with_temperature_and_top_k():
    # Temperature 2 halves the logits [3, 0, 4, 2, 1]: softmax of [1.5, 0, 2, 1, .5] is
    # [.260, .058, .429, .158, .096]; top_k=3 keeps tokens 2, 0 and 3 ([.506, .307, .186]);
    # top_p=0.8 stops once .506 + .307 = .813 is reached: tokens 2 and 0, as e^2 : e^1.5.
    draws = _draws([3.0, 0.0, 4.0, 2.0, 1.0], temperature=2.0, top_k=3, top_p=0.8)
    assert set(draws) == {0, 2}
    share = draws.count(2) / len(draws)
    assert abs(share - 1 / (1 + math.exp(-0.5))) < 4 * math.sqrt(0.6225 * 0.3775 / len(draws))


def test_sampling_without_limits_follows_the_softmax():
    # Temperature 1, no top-k or top-p: every token, each as often as its softmax probability.
    logits = [1.0, 0.0, 2.0]
    probs = [math.exp(v) / sum(math.exp(w) for w in logits) for v in logits]
    draws = _draws(logits, temperature=1.0)
    for token, p in enumerate(probs):
        assert abs(draws.count(token) / len(draws) - p) < 4 * math.sqrt(p * (1 - p) / len(draws))


def test_repetition_penalty_discourages_seen_tokens():
    logits = torch.tensor([2.0, 1.9, -1.0])
    sampler = Sampler(SamplingSettings(repetition_penalty=2.0))
    assert sampler(logits.clone(), [0]) == 1
    assert sampler(logits.clone(), []) == 0


def test_stop_id_ends_generation(loaded):
    model, tokenizer = loaded
    prompt = tokenizer.encode("Redistribution")
    greedy = list(generate_ids(model, prompt, SamplingSettings(max_new_tokens=10)))
    stop = greedy[3]
    stopped = list(generate_ids(model, prompt, SamplingSettings(max_new_tokens=10, stop_ids=[stop])))
    assert stopped == greedy[: greedy.index(stop) + 1]


def test_stop_string_is_never_shown(loaded):
    model, tokenizer = loaded
    prompt = tokenizer.encode("Copyright")
    full = "".join(stream_text(model, tokenizer, prompt, SamplingSettings(max_new_tokens=30)))
    stop = full[10:13]
    cut = "".join(stream_text(model, tokenizer, prompt, SamplingSettings(max_new_tokens=30), stop_strings=[stop]))
    assert cut == full[: full.index(stop)]


class _CharTokenizer:
    """Decodes ids as characters, enough to exercise the stream's hold-back rules."""

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i) for i in ids)


def test_text_stream_holds_back_a_possible_stop_prefix():
    stream = TextStream(_CharTokenizer(), stop_strings=["END"])  # type: ignore[arg-type]
    shown = [stream.push(ord(c)) for c in "abEN"]
    assert "".join(shown) == "ab"
    assert stream.push(ord("x")) == "ENx"
    assert stream.push(ord("E")) == "" and stream.push(ord("N")) == ""
    assert stream.push(ord("D")) == "" and stream.stopped
    assert stream.text == "abENx"


def test_bad_settings_are_usage_errors():
    with pytest.raises(UsageError, match="top_p"):
        SamplingSettings(top_p=0)
    with pytest.raises(UsageError, match="max_new_tokens"):
        SamplingSettings(max_new_tokens=-1)
    for bad in ({"temperature": -0.1}, {"top_p": 1.01}, {"top_k": -1}, {"repetition_penalty": 0.0}):
        with pytest.raises(UsageError, match=next(iter(bad))):
            SamplingSettings(**bad)
    # The edges that are allowed: no new tokens, greedy, the whole distribution, no top-k.
    SamplingSettings(max_new_tokens=0, temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=0.01)


def test_top_p_stops_at_a_nucleus_that_reaches_p_exactly():
    # Two equal tokens (0.5 each) and top_p 0.5: the first alone reaches p, so one token is ever drawn.
    assert len(set(_draws([0.0, 0.0], seeds=200, temperature=1.0, top_p=0.5))) == 1


def test_repetition_penalty_pushes_negative_scores_further_down():
    # A seen token's negative logit is multiplied by the penalty: -1.0 becomes -2.0, below -1.1.
    sampler = Sampler(SamplingSettings(repetition_penalty=2.0))
    assert sampler(torch.tensor([-1.0, -1.1, -5.0]), [0]) == 1
    assert sampler(torch.tensor([-1.0, -1.1, -5.0]), [2]) == 0


def test_temperature_sharpens_and_flattens():
    # Temperature 0.5 doubles the logit gap [0, 1]: shares e^0 : e^2 = 0.119 : 0.881.
    draws = _draws([0.0, 1.0], temperature=0.5)
    assert abs(draws.count(1) / len(draws) - 1 / (1 + math.exp(-2))) < 4 * math.sqrt(0.881 * 0.119 / len(draws))


def test_repetition_penalty_divides_positive_scores_by_the_penalty():
    # The CTRL rule (as Hugging Face's RepetitionPenaltyLogitsProcessor): a seen token's positive
    # logit is divided by the penalty. 3.3 / 1.5 = 2.2 still beats an unseen 2.1 (3.3 - 1.5 = 1.8
    # would not, nor 3.3 // 1.5 = 2.0); 0.8 / 2 = 0.4 falls below an unseen 0.5 (0.8 * 2 would not).
    assert Sampler(SamplingSettings(repetition_penalty=1.5))(torch.tensor([3.3, 2.1]), [0]) == 0
    assert Sampler(SamplingSettings(repetition_penalty=2.0))(torch.tensor([0.8, 0.5]), [0]) == 1
    # And a negative one is multiplied however close to 0: -0.5 * 2 = -1.0 falls below -0.6.
    assert Sampler(SamplingSettings(repetition_penalty=2.0))(torch.tensor([-0.5, -0.6]), [0]) == 1
    # Multiplied, not shifted: -1.0 * 1.5 = -1.5 stays above an unseen -2.0 (-1.0 - 1.5 would not).
    assert Sampler(SamplingSettings(repetition_penalty=1.5))(torch.tensor([-1.0, -2.0]), [0]) == 0



def test_a_penalty_below_one_favours_seen_tokens():
    # The same rule with penalty 0.5 (allowed: any value > 0): 1.0 / 0.5 = 2.0 overtakes an unseen 1.5.
    assert Sampler(SamplingSettings(repetition_penalty=0.5))(torch.tensor([1.0, 1.5]), [0]) == 0


def test_settings_by_default_penalize_nothing():
    # Penalty 1 is no penalty (the CTRL rule's neutral value, Hugging Face's default too): a seen
    # token keeps its lead of 0.1.
    assert Sampler(SamplingSettings())(torch.tensor([2.0, 1.9]), [0, 0, 0]) == 0


def test_top_p_of_zero_or_below_is_a_usage_error_whatever_its_type():
    for bad in (0.0, -0.5, -1):
        with pytest.raises(UsageError, match="top_p"):
            SamplingSettings(top_p=bad)


def test_top_k_keeps_exactly_the_k_largest():
    # top_k=3 of unsorted [1, 3, 0, 2, -1]: tokens 1, 3 and 0 only, as e^3 : e^2 : e^1
    # (0.665 : 0.245 : 0.090).
    draws = _draws([1.0, 3.0, 0.0, 2.0, -1.0], seeds=400, temperature=1.0, top_k=3)
    assert set(draws) == {0, 1, 3}
    share = draws.count(1) / len(draws)
    assert abs(share - 0.665) < 4 * math.sqrt(0.665 * 0.335 / len(draws))


def test_a_negative_repetition_penalty_is_a_usage_error():
    with pytest.raises(UsageError, match="repetition_penalty"):
        SamplingSettings(repetition_penalty=-1.0)
