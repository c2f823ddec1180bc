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
from lm_eval_peer import LmEvalPeer

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
def test_loglikelihood_equals_lm_eval_over_a_plain_forward_pass(tiny, share):
    model, tok = tiny
    lm = DsmoeLM(model=model, tokenizer=tok, batch_size=3, share_context=share)
    args = [("The capital of France is", c) for c in (" Paris", " London", " a big city", " B")]
    args += [("Question: 2+2?\nAnswer:", " 4"), ("", "hello world"), ("The capital of France is ", "Rome")]
    got = lm.loglikelihood(_requests("loglikelihood", args))
    expected = LmEvalPeer(model, tok).loglikelihood(_requests("loglikelihood", args), disable_tqdm=True)
    for (score, greedy), (want, want_greedy) in zip(got, expected):
        assert score == pytest.approx(want, abs=1e-4) and greedy == want_greedy


# Chosen boundaries, each continuation's tokens derived by hand from the byte-level vocabulary
# (a space is "Ġ", a newline "Ċ", UTF-8 bytes map one to one: é = C3 A9 = "Ã©", 語 = E8 AA 9E = "èªŀ").
BOUNDARIES = [
    (("The capital of France is", " Paris"), ["ĠP", "ar", "is"]),  # a leading-space token
    (("The capital of France is ", "Paris"), ["ĠP", "ar", "is"]),  # trailing space moved to the continuation
    (("Answer:  ", "B"), ["Ġ", "Ġ", "B"]),  # two trailing spaces
    (("x\n\n", "y"), ["Ċ", "Ċ", "y"]),  # rstrip takes newlines too
    (("Le prix: caf", "é"), ["Ã", "©"]),  # one character, two byte tokens
    (("日本", "語"), ["è", "ª", "ŀ"]),  # a three-byte character
    (("Réponse :", " à"), ["Ġ", "Ã", "ł"]),
    (("Question: 2+2?\nAnswer:", " 4"), ["Ġ", "4"]),
    (("", "hello world"), ["h", "e", "ll", "o", "Ġw", "or", "l", "d"]),  # empty context: bos is the context
]


def test_token_boundaries_follow_lm_eval(tiny):
    model, tok = tiny
    lm = DsmoeLM(model=model, tokenizer=tok)
    peer = LmEvalPeer(model, tok)
    peer.loglikelihood(_requests("loglikelihood", [pair for pair, _ in BOUNDARIES]), disable_tqdm=True)
    for (pair, by_hand), lm_eval_pair in zip(BOUNDARIES, peer.pairs):
        context, continuation = lm._encode_pair(*pair)
        assert (context, continuation) == lm_eval_pair, pair
        assert [tok.backend.id_to_token(i) for i in continuation] == by_hand, pair
        assert tok.decode(context + continuation) == pair[0] + pair[1]


@pytest.mark.parametrize("share", [True, False])
def test_loglikelihood_left_truncates_like_lm_eval(tiny, share):
    model, tok = tiny
    lm = DsmoeLM(model=model, tokenizer=tok, batch_size=2, max_length=16, share_context=share)
    context = "a long few-shot prompt that is cut at the left " * 3
    args = [(context, c) for c in (" yes", " no", " maybe not")]
    got = lm.loglikelihood(_requests("loglikelihood", args))
    expected = LmEvalPeer(model, tok, max_length=16).loglikelihood(_requests("loglikelihood", args), disable_tqdm=True)
    for (score, _), (want, _) in zip(got, expected):
        assert score == pytest.approx(want, abs=1e-4)


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


def test_offload_budgets_as_model_args_give_the_resident_scores(tiny):
    """lm-eval's own model_args string with an expert store of one slot per layer: same numbers."""
    from dsmoe.offload import store_of

    model, tok = tiny
    args = [("The capital of France is", c) for c in (" Paris", " London")] + [("Question:", " 4")]
    resident = DsmoeLM(model=model, tokenizer=tok, batch_size=2).loglikelihood(_requests("loglikelihood", args))
    lm = DsmoeLM.create_from_arg_string(f"pretrained={TINY},dtype=fp32,expert_cache=1,policy=lfu,batch_size=2")
    store = store_of(lm.model)
    assert store is not None and store.plan.device_slots == 1
    offloaded = lm.loglikelihood(_requests("loglikelihood", args))
    assert [score for score, _ in offloaded] == [score for score, _ in resident]
    assert store.stats.misses() > 0
    with pytest.raises(EvalError, match="max_ram must be a number"):
        DsmoeLM(pretrained=str(TINY), max_ram="lots")


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
    # HumanEval and MBPP are ours (scored offline by dsmoe.evals.code_exec), and MATH's scoring
    # packages (sympy, math_verify, antlr4 4.11) are dependencies: all of them build.
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
    # 43 of the 171 questions: derived without the adapter by tests/derive_mmlu_score.py (lm-eval's
    # own requests and aggregation over one plain forward pass per request).
    assert row["shots"] == 5 and row["score"] == pytest.approx(100 * 43 / 171, abs=1e-9)
    assert "25.1" in result.output
    assert record["complete"] is False and record["lm_eval_version"]
    assert record["lm_eval"]["n-samples"]["mmlu_anatomy"]["effective"] == 3


# ---------------------------------------------------------------------- code, MATH, quiet output


def _built_leaf(name: str, **settings_kwargs):
    """The lm-eval task `dsmoe eval --task name --data-dir DATA` runs, built from the local data."""
    settings = EvalSettings(model=str(TINY), tasks=[name], data_dir=str(DATA), limit=1, **settings_kwargs)
    manager = task_manager([name])
    (row,) = plan(settings, manager)
    build([row], settings, manager)
    from dsmoe.evals.runner import _leaves

    return row, _leaves(row.built)


def _score(task, doc_index: int, response: str) -> dict:
    """Score one model response the way lm-eval's evaluator does: filters, then process_results."""
    task.build_all_requests(limit=doc_index + 1, rank=0, world_size=1)
    instances = [i for i in task.instances if i.doc_id == doc_index]
    for instance in task.instances:
        instance.resps = [response if instance.doc_id == doc_index else ""]
    task.apply_filters()
    (filter_key,) = instances[0].filtered_resps
    return task.process_results(instances[0].doc, [i.filtered_resps[filter_key] for i in instances])


@pytest.fixture
def code_allowed(monkeypatch):
    monkeypatch.setenv("HF_ALLOW_CODE_EVAL", "1")
    monkeypatch.setenv("DSMOE_CODE_TIMEOUT", "3")


def test_humaneval_pass_at_1_runs_the_program(code_allowed):
    row, (task,) = _built_leaf("humaneval", allow_code_execution=True)
    assert row.metric_key == "pass@1,create_test" and task.config.dataset_path == "openai/openai_humaneval"
    task.build_all_requests(limit=1, rank=0, world_size=1)
    doc = task.instances[0].doc
    assert doc["task_id"] == "HumanEval/0"
    body = "    for i, a in enumerate(numbers):\n        for b in numbers[i + 1:]:\n" \
           "            if abs(a - b) < threshold:\n                return True\n    return False\n"
    assert _score(task, 0, body) == {"pass@1": 1.0}
    assert _score(task, 0, body.replace("<", ">")) == {"pass@1": 0.0}  # wrong comparison: check() fails
    assert _score(task, 0, "    while True:\n        pass\n") == {"pass@1": 0.0}  # killed at the time limit
    assert _score(task, 0, "    return (\n") == {"pass@1": 0.0}  # syntax error


def test_mbpp_pass_at_1_runs_the_program(code_allowed):
    row, (task,) = _built_leaf("mbpp", allow_code_execution=True)
    assert row.metric_key == "pass_at_1,none"
    right = "def remove_Occ(s, ch):\n    s = s.replace(ch, '', 1)\n    i = s.rfind(ch)\n    return s if i < 0 else s[:i] + s[i + 1:]\n"
    assert _score(task, 0, right) == {"pass_at_1": 1.0}
    assert _score(task, 0, "def remove_Occ(s, ch):\n    return s.replace(ch, '', 1)\n") == {"pass_at_1": 0.0}


def test_code_scorer_estimator_and_consent(monkeypatch):
    from dsmoe.evals import code_exec

    assert code_exec.estimate_pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert code_exec.estimate_pass_at_k(4, 1, 2) == pytest.approx(0.5)
    assert code_exec.estimate_pass_at_k(3, 2, 2) == 1.0
    monkeypatch.setenv("HF_ALLOW_CODE_EVAL", "1")
    got = code_exec.pass_at_k(["assert f() == 1"] * 2, [["def f(): return 1", "def f(): return 2"]] * 2, k=[1, 2])
    assert got == {"pass@1": pytest.approx(0.5), "pass@2": 1.0}
    monkeypatch.delenv("HF_ALLOW_CODE_EVAL")
    with pytest.raises(EvalError, match="--allow-code-execution"):
        code_exec.pass_at_1("assert True", "pass")


@pytest.mark.parametrize("name", ["humaneval", "mbpp"])
def test_code_tasks_refused_without_allow_code_execution(name):
    from dsmoe.cli.main import app

    result = CliRunner().invoke(app, ["eval", "--task", name, "--limit", "1", "--data-dir", str(DATA),
                                      "--model", str(TINY), "--no-cache"])
    assert result.exit_code != 0
    assert f"{name} runs the model's generated code; pass --allow-code-execution" in result.output
    assert "Traceback" not in result.output


def test_math_scoring_packages_work_offline():
    row, leaves = _built_leaf("math")
    assert row.metric_key == "exact_match,none" and len(leaves) == 7
    task = next(t for t in leaves if t.config.task == "minerva_math_algebra")
    right = "The denominator is zero at two points.\\nFinal Answer: The final answer is $2$. I hope it is correct."
    assert _score(task, 0, right.replace("\\n", "\n")) == {"exact_match": 1, "math_verify": 1}
    assert _score(task, 0, "Final Answer: The final answer is $3$. I hope it is correct.") == {"exact_match": 0, "math_verify": 0}


def test_cli_code_task_end_to_end_without_library_noise(tmp_path):
    """Generation, the program run and the score, offline; no tqdm bars or lm-eval logs in the output."""
    from dsmoe.cli.main import app

    out = tmp_path / "results.json"
    result = CliRunner().invoke(app, [
        "eval", "--task", "humaneval", "--limit", "1", "--data-dir", str(DATA), "--model", str(TINY),
        "--dtype", "fp32", "--allow-code-execution", "--no-cache", "--output", str(out),
    ])
    assert result.exit_code == 0, result.output
    assert "HumanEval" in result.output and "26.8" in result.output
    for noise in ("it/s]", "Map:", "%|", "WARNING", "INFO"):
        assert noise not in result.output, result.output
    (row,) = json.loads(out.read_text())["rows"]
    assert row["metric_key"] == "pass@1,create_test" and row["score"] == 0.0


def test_quiet_libraries_hides_bars_and_warnings_then_restores(capsys, caplog):
    import sys

    import tqdm

    from dsmoe.evals.quiet import quiet_libraries

    lm_logger = logging.getLogger("lm_eval.api.task")
    before = logging.getLogger("lm_eval").level
    caplog.set_level(logging.DEBUG)  # pytest's handler takes every level: only the loggers' own levels filter
    logging.getLogger("lm_eval").setLevel(logging.NOTSET)
    with quiet_libraries():
        list(tqdm.tqdm(range(3), desc="hidden-bar", file=sys.stderr))
        lm_logger.warning("hidden-warning")
        lm_logger.error("visible-error")
    assert "hidden-bar" not in capsys.readouterr().err
    assert [r.getMessage() for r in caplog.records if r.name.startswith("lm_eval")] == ["visible-error"]
    assert logging.getLogger("lm_eval").level == logging.NOTSET
    logging.getLogger("lm_eval").setLevel(before)
    list(tqdm.tqdm(range(3), desc="shown-bar", file=sys.stderr))
    assert "shown-bar" in capsys.readouterr().err
