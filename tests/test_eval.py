"""dsmoe eval: the lm-eval adapter's scores, local benchmark data, and the command end to end."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from lm_eval.api.instance import Instance
from typer.testing import CliRunner

from dsmoe import load
from dsmoe.errors import EvalError
from dsmoe.evals import DsmoeLM
from dsmoe.evals.runner import EvalSettings, build, plan, task_manager, write_json_atomic

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
TINY = SHARED / "fixtures" / "tiny-deepseek"
DATA = SHARED / "evaldata"

logging.getLogger("lm_eval").setLevel(logging.ERROR)


@pytest.fixture(scope="module")
def tiny():
    return load(TINY, dtype="fp32")


def _direct(model, ids: list[int], start: int) -> float:
    """Sum of log-probabilities of ids[start:], each given everything before it, from one forward pass."""
    logprobs = torch.log_softmax(model(torch.tensor([ids]))[0], dim=-1)
    return sum(float(logprobs[i - 1, ids[i]]) for i in range(start, len(ids)))


def _requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


@pytest.mark.parametrize("share", [True, False])
def test_loglikelihood_equals_direct_log_softmax(tiny, share):
    model, tok = tiny
    lm = DsmoeLM(model=model, tokenizer=tok, batch_size=3, share_context=share)
    args = [("The capital of France is", c) for c in (" Paris", " London", " a big city", " B")]
    args += [("Question: 2+2?\nAnswer:", " 4"), ("", "hello world")]
    got = lm.loglikelihood(_requests("loglikelihood", args))
    for (context, continuation), (score, _) in zip(args, got):
        ctx, cont = lm._encode_pair(context, continuation)
        assert score == pytest.approx(_direct(model, ctx + cont, len(ctx)), abs=1e-4)


@pytest.mark.parametrize("share", [True, False])
def test_loglikelihood_left_truncates_like_lm_eval(tiny, share):
    model, tok = tiny
    lm = DsmoeLM(model=model, tokenizer=tok, batch_size=2, max_length=16, share_context=share)
    context = "a long few-shot prompt that is cut at the left " * 3
    args = [(context, c) for c in (" yes", " no", " maybe not")]
    got = lm.loglikelihood(_requests("loglikelihood", args))
    for (c, k), (score, _) in zip(args, got):
        ctx, cont = lm._encode_pair(c, k)
        window = (ctx + cont)[-17:]
        assert score == pytest.approx(_direct(model, window, len(window) - len(cont)), abs=1e-4)


def test_greedy_flag_matches_argmax(tiny):
    model, tok = tiny
    lm = DsmoeLM(model=model, tokenizer=tok)
    ctx = tok.encode("Once upon a time")
    greedy = int(model(torch.tensor([ctx]))[0, -1].argmax())
    other = (greedy + 1) % model.config.vocab_size
    (_, is_greedy), (_, not_greedy) = lm.score_pairs([(ctx, [greedy]), (ctx, [other])])
    assert is_greedy and not not_greedy


def test_rolling_loglikelihood_equals_direct(tiny):
    model, tok = tiny
    text = "Bits per byte: every token of the document, the first predicted from bos alone."
    lm = DsmoeLM(model=model, tokenizer=tok)
    (got,) = lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(text,)]))
    ids = [tok.bos_id] + tok.encode(text, add_bos=False)
    assert got == pytest.approx(_direct(model, ids, 1), abs=1e-4)


def test_rolling_windows_cover_every_token_once(tiny):
    model, tok = tiny
    text = "A document longer than the window is scored in disjoint pieces. " * 2
    n = len(tok.encode(text, add_bos=False))
    lm = DsmoeLM(model=model, tokenizer=tok, max_length=8)
    seen: list[int] = []
    lm.progress = lambda kind, done, total: seen.append(total)
    lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(text,)]))
    assert seen[-1] == -(-n // 8)  # ceil(n / 8) windows of at most 8 predicted tokens


def test_generate_until_is_greedy_and_stops(tiny):
    model, tok = tiny
    lm = DsmoeLM(model=model, tokenizer=tok)
    free = lm.generate_until(_requests("generate_until", [("Hello", {"until": [], "max_gen_toks": 12})]))[0]
    again = lm.generate_until(_requests("generate_until", [("Hello", {"until": [], "max_gen_toks": 12})]))[0]
    assert free == again and free
    stop = free[len(free) // 2:][:2]
    cut = lm.generate_until(_requests("generate_until", [("Hello", {"until": [stop], "max_gen_toks": 12})]))[0]
    assert cut == free[: free.find(stop)]


def test_unknown_model_argument_is_one_clear_error():
    with pytest.raises(EvalError, match="unknown dsmoe model argument"):
        DsmoeLM(pretrained=str(TINY), no_such_budget="1GB")


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(EvalError, match="unknown task 'mmluu'.*MMLU"):
        plan(EvalSettings(model=str(TINY), tasks=["mmluu"]), task_manager(["mmluu"]))


def test_missing_data_file_is_named(tmp_path):
    (tmp_path / "mmlu" / "test").mkdir(parents=True)
    settings = EvalSettings(model=str(TINY), tasks=["mmlu_anatomy"], data_dir=str(tmp_path))
    manager = task_manager(["mmlu"])
    with pytest.raises(EvalError, match="missing data file .*anatomy_test.csv"):
        build(plan(settings, manager), settings, manager)


@pytest.mark.parametrize("suite", ["report", "report-chat"])
def test_every_suite_task_builds_requests_from_local_data(suite):
    settings = EvalSettings(model=str(TINY), tasks=[], suite=suite, limit=1, data_dir=str(DATA),
                            allow_code_execution=True)
    manager = task_manager([], suite)
    rows = plan(settings, manager)
    build(rows, settings, manager)
    skipped = {r.label: r.skipped for r in rows if r.skipped}
    no_local = {"RACE-middle", "RACE-high"} | ({"Pile"} if suite == "report" else {"BBH"})
    for label in no_local:
        assert "no local copy" in skipped.pop(label)
    # lm-eval's HumanEval and MBPP score with the hub's code_eval metric, which is not here offline.
    for label in ("HumanEval", "MBPP"):
        assert "code_eval" in skipped.pop(label)
    try:
        import math_verify  # noqa: F401
    except ImportError:  # lm-eval's MATH needs its [math] extra (sympy, math_verify, antlr4)
        assert "lm-eval[math]" in skipped.pop("MATH")
    assert not skipped
    for row in rows:
        if row.skipped:
            continue
        from dsmoe.evals.runner import _leaves

        for leaf in _leaves(row.built)[:2]:
            leaf.build_all_requests(limit=1, rank=0, world_size=1)
            assert leaf.instances, f"{row.label}: no requests"


def test_write_json_atomic_leaves_no_half_file(tmp_path):
    target = tmp_path / "results.json"
    looped: dict = {}
    looped["self"] = looped
    with pytest.raises(ValueError, match="Circular"):
        write_json_atomic(target, looped)
    assert not target.exists() and not list(tmp_path.iterdir())


def test_cli_mmlu_offline_end_to_end(tmp_path):
    from dsmoe.cli.main import app

    out = tmp_path / "results.json"
    result = CliRunner().invoke(app, [
        "eval", "--task", "mmlu", "--limit", "3", "--data-dir", str(DATA), "--model", str(TINY),
        "--dtype", "fp32", "--output", str(out), "--cache-dir", str(tmp_path / "cache"),
    ])
    assert result.exit_code == 0, result.output
    assert "MMLU" in result.output and "45.0" in result.output
    record = json.loads(out.read_text())
    (row,) = record["rows"]
    assert row["shots"] == 5 and 0 <= row["score"] <= 100
    assert record["complete"] is False and record["lm_eval_version"]
    assert record["lm_eval"]["n-samples"]["mmlu_anatomy"]["effective"] == 3
