"""The lm-eval adapter's progress, estimates and work order, on scripted clocks and hand-counted tokens.

Requests are token ids written out here, so every row's length, every batch and every lm_head
call is counted by hand in the comments; time comes from a scripted clock, so the warm-up's moment
is known exactly.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from head_rows import HeadRows

from dsmoe import load
from dsmoe.errors import EvalError
from dsmoe.evals import DsmoeLM, lm_model
from dsmoe.evals.lm_model import Estimate

TINY = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "tiny-deepseek"

logging.getLogger("lm_eval").setLevel(logging.ERROR)


@pytest.fixture(scope="module")
def tiny():
    return load(TINY, dtype="fp32")


def _clock(monkeypatch, readings: list[float]) -> None:
    """The adapter's perf_counter returns these readings in turn (the meter's start, then one per step)."""
    it = iter(readings)
    monkeypatch.setattr(lm_model, "time", SimpleNamespace(perf_counter=lambda: next(it)))


def _recording(model, tok, **kwargs):
    estimates: list[Estimate] = []
    progress: list[tuple[str, int, int]] = []
    lm = DsmoeLM(model=model, tokenizer=tok, estimate=estimates.append,
                 progress=lambda *a: progress.append(a), **kwargs)
    return lm, estimates, progress


def test_projected_seconds_by_hand():
    assert Estimate("k", 4, 120, 30, 3.0).projected_seconds == 12.0  # 120 tokens at 10 per second
    assert Estimate("k", 4, 120, 1, 3.0).projected_seconds == 360.0  # one token warmed up is enough
    assert Estimate("k", 4, 120, 30, 0.0).projected_seconds is None  # no time measured
    assert Estimate("k", 4, 120, 0, 3.0).projected_seconds is None  # nothing done yet
    assert Estimate("k", 4, 120).projected_seconds is None
    with pytest.raises(dataclasses.FrozenInstanceError):  # estimates handed out are values, not shared state
        Estimate("k", 4, 120).tokens = 1  # type: ignore[misc]


# Hand-made requests (ids < the fixture's 512-token vocabulary; 1 is its BOS). Each row reads its
# tokens but the last (the last is only predicted):
#   S1, S2: one 6-token context, continuations of 2 and 3 -> shared: prefill 5 tokens, then the rows
#           [14, 20] and [14, 22, 23] -> reads 5 + 2 + 3 = 10; lm_head: 1 (prefill's last), 2 x 3 = 6
#   A: a 4-token context asked once, 2 tokens -> unshared, reads 5
#   B: 2 + 6 tokens -> unshared, reads 7
#   C: 3 + 2 tokens -> unshared, reads 4
#   L1, L2, L3: one-token choices after a 5-token context (two) and a 2-token one -> one row each: reads 5 + 2 = 7,
#           lm_head 2 (one row per context)
#   E: an empty continuation: log p = 0, greedily "generated"; the model never sees it
# Longest first, two rows a batch: [B, A] (rows of 7 and 5, widths 6 and 2: lm_head 2 x 6 = 12, reads 12),
# S (6-token context), the one-token contexts [5, 2] (5), [C] (4: lm_head 2, reads 4).
S1, S2 = ([1, 10, 11, 12, 13, 14], [20, 21]), ([1, 10, 11, 12, 13, 14], [22, 23, 24])
A, B, C = ([1, 30, 31, 32], [33, 34]), ([1, 40], [41, 42, 43, 44, 45, 46]), ([1, 50, 51], [52, 53])
L1, L2, L3 = ([1, 60, 61, 62, 63], [64]), ([1, 60, 61, 62, 63], [65]), ([1, 70], [71])
E = ([1, 80], [])
PAIRS = [C, L3, A, S1, E, L1, B, S2, L2]  # not in any order the schedule uses
HEAD_CALLS = [12, 1, 6, 2, 2]
DONE = [2, 4, 7, 8]  # requests answered after each unit: [B, A], S, L, C
FED = [12, 10, 7, 4]  # tokens read by each unit


@pytest.mark.parametrize("warm_step", [1, 2, 3, 4])
def test_score_pairs_schedule_counts_and_warm_up(tiny, monkeypatch, warm_step):
    """The warm-up's estimate comes at the first step 3 s in, with the tokens read so far; none when all is done."""
    model, tok = tiny
    _clock(monkeypatch, [100.0] + [101.0] * (warm_step - 1) + [103.0] * (5 - warm_step))
    lm, estimates, progress = _recording(model, tok, batch_size=2)
    with HeadRows(model) as head:
        results = lm.score_pairs(PAIRS)
    assert head.calls == HEAD_CALLS
    assert results[PAIRS.index(E)] == (0.0, True)
    assert progress == [("loglikelihood", d, 8) for d in DONE]
    assert estimates[0] == Estimate("loglikelihood", 8, sum(FED), 0, 0.0)
    if warm_step < 4:
        assert estimates[1:] == [Estimate("loglikelihood", 8, sum(FED), sum(FED[:warm_step]), 3.0)]
    else:
        assert estimates[1:] == []  # everything was answered by the warm-up's end: nothing to project


def test_without_sharing_one_context_is_one_unshared_batch(tiny):
    model, tok = tiny
    lm = DsmoeLM(model=model, tokenizer=tok, batch_size=2, share_context=False)
    with HeadRows(model) as head:
        lm.score_pairs([S1, S2])
    assert head.calls == [2 * 3]  # both rows in one batch, as wide as the longer continuation; no prefill


def test_many_requests_done_in_one_step_get_no_projection(tiny, monkeypatch):
    """300 one-token choices of one context: one row, answered in one step after the warm-up time."""
    model, tok = tiny
    _clock(monkeypatch, [0.0, 10.0])
    lm, estimates, progress = _recording(model, tok)
    lm.score_pairs([([1, 74], [k]) for k in range(300)])
    assert estimates == [Estimate("loglikelihood", 300, 2)]  # the one row reads BOS and token 74
    assert progress == [("loglikelihood", 300, 300)]


def test_a_continuation_longer_than_max_length_is_refused(tiny):
    """lm-eval's HF model asserts len(continuation) <= max_length; its first tokens would have no position."""
    model, tok = tiny
    for share in (True, False):
        lm = DsmoeLM(model=model, tokenizer=tok, max_length=4, share_context=share)
        assert lm.score_pairs([([1, 5], [6, 7, 8, 9])])[0][0] < 0  # four tokens fit
        with pytest.raises(EvalError, match="5 tokens does not fit max_length=4"):
            lm.score_pairs([([1, 5], [6, 7, 8, 9, 10]), ([1, 5], [6, 7, 8, 9, 11])])


def test_generation_estimate_and_warm_up_on_a_scripted_clock(tiny, monkeypatch):
    """Prompts plus each request's token limit; warm-up exactly 3 s in, at the second of three requests."""
    model, tok = tiny
    prompts = {"Hello": 2, "Hi there": 3, "A": 1}  # prompt -> max_gen_toks
    lengths = [1 + len(tok.backend.encode(p, add_special_tokens=False).ids) for p in prompts]  # BOS + words
    _clock(monkeypatch, [100.0, 102.0, 103.0, 105.0])
    lm, estimates, progress = _recording(model, tok)
    requests = [_generate_request(p, {"until": [], "max_gen_toks": n}, i) for i, (p, n) in enumerate(prompts.items())]
    lm.generate_until(requests)
    per_request = [n + m for n, m in zip(lengths, prompts.values())]
    assert estimates == [Estimate("generate_until", 3, sum(per_request)),
                         Estimate("generate_until", 3, sum(per_request), per_request[0] + per_request[1], 3.0)]
    assert progress == [("generate_until", d, 3) for d in (1, 2, 3)]


def _generate_request(context: str, gen_kwargs: dict, idx: int):
    from lm_eval.api.instance import Instance

    return Instance(request_type="generate_until", doc={}, arguments=(context, gen_kwargs), idx=idx)


def test_rows_read_are_lm_eval_s_left_truncated_windows(tiny):
    """HFLM reads (context + continuation)[-(max_length + 1):][:-1]; with max_length 4 and the context
    [1, 10, ..., 15]: [12, 13, 14, 15] before the one-token choice 20, and [13, 14, 15, 20] / [13, 14, 15, 22]
    for the two-token choices, whose shared part [13, 14, 15] is prefilled ([13, 14]) once."""
    model, tok = tiny
    read: list[list[list[int]]] = []
    hook = model.model.embed_tokens.register_forward_hook(lambda _m, args, _out: read.append(args[0].tolist()))
    context = [1, 10, 11, 12, 13, 14, 15]
    try:
        DsmoeLM(model=model, tokenizer=tok, max_length=4).score_pairs([(context, [20])])
        assert read == [[[12, 13, 14, 15]]]
        read.clear()
        DsmoeLM(model=model, tokenizer=tok, max_length=4).score_pairs([(context, [20, 21]), (context, [22, 23])])
        assert read == [[[13, 14]], [[15, 20], [15, 22]]]
    finally:
        hook.remove()


def test_a_one_token_row_batched_with_a_longer_continuation(tiny):
    """Unshared rows [1] and [1, 2, 3, 4]: the short row's unused positions stay inside it."""
    model, tok = tiny
    lm = DsmoeLM(model=model, tokenizer=tok, batch_size=2, share_context=False)
    (short, _), (long, _) = lm.score_pairs([([1], [5]), ([1, 2], [3, 4, 5])])
    logprobs = torch.log_softmax(model(torch.tensor([[1, 2, 3, 4]]))[0], dim=-1)
    assert short == pytest.approx(float(logprobs[0, 5]), abs=1e-4)
    assert long == pytest.approx(float(logprobs[1, 3] + logprobs[2, 4] + logprobs[3, 5]), abs=1e-4)


def test_padding_with_a_bos_id_of_zero(tiny):
    """A tokenizer whose BOS is id 0 (the prefix, and the padding): rows of unequal length still score."""
    model, _ = tiny
    lm = DsmoeLM(model=model, tokenizer=SimpleNamespace(bos_id=0, eos_id=2), batch_size=2,  # type: ignore[arg-type]
                 share_context=False)
    (short, _), (long, _) = lm.score_pairs([([0, 5], [6]), ([0, 5, 7, 8], [9])])
    logprobs = torch.log_softmax(model(torch.tensor([[0, 5, 7, 8]]))[0], dim=-1)
    assert short == pytest.approx(float(logprobs[1, 6]), abs=1e-4)
    assert long == pytest.approx(float(logprobs[3, 9]), abs=1e-4)
