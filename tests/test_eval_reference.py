"""dsmoe eval against lm-eval's HF backend's behaviour (issue 19), the chat suite, progress and engines.

Expected values come from hand computations on the model's plain forward pass, the tokenizer
library's own decode, or text written out by hand from the data files.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from head_rows import HeadRows
from lm_eval.api.instance import Instance

from dsmoe import load
from dsmoe.errors import EvalError
from dsmoe.evals import DsmoeLM
from dsmoe.evals.runner import EvalSettings, _leaves, build, plan, task_manager
from dsmoe.model.generate import TextStream

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
TINY = SHARED / "fixtures" / "tiny-deepseek"
DATA = SHARED / "evaldata"
BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"

logging.getLogger("lm_eval").setLevel(logging.ERROR)


@pytest.fixture(scope="module")
def tiny():
    return load(TINY, dtype="fp32")


def _requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def _logprobs(model, ids: list[int]) -> torch.Tensor:
    return torch.log_softmax(model(torch.tensor([ids]))[0], dim=-1)


# ---------------------------------------------------------------------- section 1: lm-eval's behaviour


def test_rolling_scores_text_given_bos_and_the_hf_way_on_request(tiny):
    """The one-word text "a": p(a | BOS) by default; lm-eval's HF model's p(BOS a | BOS) with rolling_double_bos
    (its tokenizer call adds the document's BOS and get_rolling_token_windows puts the prefix BOS before it)."""
    model, tok = tiny
    bos, a = tok.bos_id, tok.encode("a", add_bos=False)[0]
    ours = DsmoeLM(model=model, tokenizer=tok).loglikelihood_rolling(_requests("loglikelihood_rolling", [("a",)]))[0]
    hf = DsmoeLM(model=model, tokenizer=tok, rolling_double_bos=True).loglikelihood_rolling(
        _requests("loglikelihood_rolling", [("a",)]))[0]
    by_hand = float(_logprobs(model, [bos, a])[0, a])
    by_hand_hf = float(_logprobs(model, [bos, bos])[0, bos]) + float(_logprobs(model, [bos, bos, a])[1, a])
    assert ours == pytest.approx(by_hand, abs=1e-4)
    assert hf == pytest.approx(by_hand_hf, abs=1e-4) and hf < ours - 1
    lm = DsmoeLM.create_from_arg_string(f"pretrained={TINY},dtype=fp32,rolling_double_bos=true")
    assert lm.rolling_double_bos and lm.get_model_info()["dsmoe_rolling_double_bos"]


def test_text_stream_keeps_what_no_later_token_can_complete(tiny):
    """The stream's text equals the tokenizer's decode of every token, as lm-eval's HF model keeps it."""
    _, tok = tiny
    e4, b8, ad = 163, 119, 258  # the bytes of 中 (E4 B8 AD), one byte token each
    ff = tok.backend.token_to_id("ÿ")  # byte FF: never valid UTF-8
    for ids in ([e4, b8], [e4, b8, ad], [ff, e4], [ff, ff, e4, b8], [ff, 67], [67, e4, b8, ad, e4]):
        stream = TextStream(tok)
        pieces = [stream.push(i) for i in ids]
        text = "".join(pieces) + stream.flush()
        assert text == tok.backend.decode(ids), ids
    stream = TextStream(tok)
    assert [stream.push(i) for i in (ff, e4, b8, ad)] == ["", "\ufffd", "", "中"]  # FF shows once it is known


def test_text_starting_with_bos_text_gets_no_second_bos(tiny):
    model, tok = tiny
    lm = DsmoeLM(model=model, tokenizer=tok)
    words = tok.backend.encode("The capital of France is", add_special_tokens=False).ids
    context, continuation = lm._encode_pair(BOS + "The capital of France is", " Paris")
    assert context == [1] + words and continuation == tok.backend.encode(" Paris", add_special_tokens=False).ids
    assert lm._encode_pair("The capital of France is", " Paris")[0] == [1] + words
    prompt, _, _ = lm._generation_prompt(BOS + "The capital of France is", {"until": []})
    assert prompt == [1] + words


@pytest.mark.parametrize("alias", ["max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens"])
def test_every_max_token_alias_limits_generation(tiny, alias):
    model, tok = tiny
    lm = DsmoeLM(model=model, tokenizer=tok)
    ids = tok.encode("Hello")
    for _ in range(3):  # three greedy tokens by the plain forward's argmax
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    expected = tok.backend.decode(ids[-3:])
    got = lm.generate_until(_requests("generate_until", [("Hello", {"until": [], alias: 3})]))[0]
    assert got == expected


def test_each_row_names_its_metric_and_the_report_scoring_is_followed():
    from dsmoe.cli.eval_cmd import _table

    settings = EvalSettings(model=str(TINY), tasks=[], suite="report")
    rows = plan(settings, task_manager([], "report"))
    metric = {r.label: r.metric_key.split(",")[0] for r in rows}
    assert {metric[n] for n in ("HellaSwag", "PIQA", "ARC-easy", "ARC-challenge")} == {"acc_norm"}
    assert metric["MMLU"] == metric["WinoGrande"] == "acc" and metric["Pile"] == "bits_per_byte"
    assert any("acc_norm" in n and "length" in n for n in next(r for r in rows if r.label == "PIQA").notes)
    assert any("rolling_double_bos" in n for n in next(r for r in rows if r.label == "Pile").notes)
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(_table(rows, "report"))
    lines = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in console.export_text().splitlines()
             if line.startswith("│")}
    assert lines["HellaSwag"] == "acc_norm" and lines["MMLU"] == "acc" and lines["CLUEWSC"] == "exact_match"


# ---------------------------------------------------------------------- section 3: scored positions, batching


def test_one_token_choices_one_row_per_question_batched_across_questions(tiny):
    model, tok = tiny
    questions = ["Question: 2+2?\nAnswer:", "The sky is", "Pick a letter: A, B, C or D.\nAnswer:"]
    args = [(q, c) for q in questions for c in (" A", " a", " the", " is")]  # one token each here
    lm = DsmoeLM(model=model, tokenizer=tok, batch_size=2)
    with HeadRows(model) as head:
        got = lm.loglikelihood(_requests("loglikelihood", args))
    assert head.calls == [2, 1]  # three questions' last positions, two to a batch: 12 requests, 3 rows
    for (q, c), (score, _) in zip(args, got):
        ctx, cont = lm._encode_pair(q, c)
        assert score == pytest.approx(float(_logprobs(model, ctx + cont)[len(ctx) - 1, cont[0]]), abs=1e-4)


def test_unshared_rows_project_only_the_continuations(tiny):
    model, tok = tiny
    args = [("The capital of France is", " Paris"), ("Once upon a time there was", " a big old city by the sea")]
    lm = DsmoeLM(model=model, tokenizer=tok, batch_size=2, share_context=False)
    with HeadRows(model) as head:
        got = lm.loglikelihood(_requests("loglikelihood", args))
    longest = max(len(lm._encode_pair(*a)[1]) for a in args)
    assert head.calls == [2 * longest]
    for (context, continuation), (score, _) in zip(args, got):
        ctx, cont = lm._encode_pair(context, continuation)
        lp = _logprobs(model, ctx + cont)
        assert score == pytest.approx(sum(float(lp[len(ctx) + k - 1, t]) for k, t in enumerate(cont)), abs=1e-4)


def test_estimate_counts_requests_and_tokens_then_projects(tiny, monkeypatch):
    from dsmoe.evals import lm_model

    monkeypatch.setattr(lm_model, "WARMUP_SECONDS", 0.0)  # project right after the first batch
    model, tok = tiny
    seen = []
    lm = DsmoeLM(model=model, tokenizer=tok, batch_size=1, share_context=False, estimate=seen.append)
    args = [("Hello there, my old", " friend"), ("A", " b")]
    lm.loglikelihood(_requests("loglikelihood", args))
    rows = [len(lm._encode_pair(*a)[0]) + len(lm._encode_pair(*a)[1]) - 1 for a in args]  # tokens each row reads
    first, warmed = seen
    assert (first.requests, first.tokens, first.projected_seconds) == (2, sum(rows), None)
    assert warmed.warmup_tokens == max(rows)  # longest first
    assert warmed.projected_seconds == pytest.approx(warmed.warmup_seconds * sum(rows) / max(rows))
    assert lm.answered["loglikelihood"] == 2


# ---------------------------------------------------------------------- section 2: the chat suite as chat


def test_chat_template_methods_render_the_chat_models_format(tiny):
    model, tok = tiny
    lm = DsmoeLM(model=model, tokenizer=tok)
    turns = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}, {"role": "user", "content": "3+3?"}]
    assert lm.apply_chat_template(turns) == f"{BOS}User: 2+2?\n\nAssistant: 4{EOS}User: 3+3?\n\nAssistant:"
    open_answer = lm.apply_chat_template(turns[:2], add_generation_prompt=False)
    assert open_answer == f"{BOS}User: 2+2?\n\nAssistant: 4"
    assert lm.chat_template(True) == tok.chat_template and lm.chat_template(False) is None
    assert lm.tokenizer_name.startswith("dsmoe-") and len(lm.tokenizer_name) == 22


def test_report_chat_suite_builds_every_request_through_the_chat_template(tiny):
    """--suite report-chat --limit 2: each task's first prompt is a chat, its shots earlier turns."""
    model, tok = tiny
    lm = DsmoeLM(model=model, tokenizer=tok)
    settings = EvalSettings(model=str(TINY), tasks=[], suite="report-chat", limit=2, data_dir=str(DATA),
                            allow_code_execution=True)
    assert settings.chat
    manager = task_manager([], "report-chat")
    rows = plan(settings, manager)
    build(rows, settings, manager)
    prompts = {}
    for row in rows:
        if row.skipped:
            continue
        leaf = _leaves(row.built)[0]
        leaf.build_all_requests(limit=2, rank=0, world_size=1, apply_chat_template=True, fewshot_as_multiturn=True,
                                chat_template=lm.apply_chat_template, tokenizer_name=lm.tokenizer_name)
        prompt = leaf.instances[0].args[0]
        prompts[row.label] = prompt
        assert prompt.startswith(BOS) and prompt.count(BOS) == 1, row.label
        assert prompt.endswith("Assistant:"), (row.label, prompt[-80:])
        assert prompt.count("User: ") == (row.shots or 0) + 1, row.label  # one turn per shot, then the question
        assert prompt.count(f"{EOS}User: ") == (row.shots or 0), row.label
    assert {r.label for r in rows if r.skipped} == {"BBH", "RACE-middle", "RACE-high"}
    # MMLU, 0-shot in the chat table: abstract_algebra's first test question, written out from the csv;
    # lm-eval's description (ending in a blank line) is the system message, which the template follows
    # with another blank line.
    assert prompts["MMLU"] == (
        f"{BOS}The following are multiple choice questions (with answers) about abstract algebra.\n\n\n\n"
        "User: Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.\n"
        "A. 0\nB. 4\nC. 2\nD. 6\nAnswer:\n\nAssistant:")


# ---------------------------------------------------------------------- the command: progress, cache, engines


def test_progress_lines_with_stdout_in_a_file_and_the_cache_said(tmp_path):
    log = tmp_path / "log.txt"
    args = [str(Path(sys.executable).with_name("dsmoe")), "eval", "--task", "mmlu_anatomy", "--limit", "1",
            "--data-dir", str(DATA), "--model", str(TINY), "--dtype", "fp32", "--cache-dir", str(tmp_path / "cache")]
    env = {**os.environ, "COLUMNS": "200"}
    for _ in range(2):
        with log.open("w") as out:
            subprocess.run(args, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=300, check=True)
        text = log.read_text()
        if _ == 0:
            assert "loglikelihood: 4 requests," in text and "tokens to compute" in text
            assert "loglikelihood: 4/4 requests" in text  # the plain progress line, no terminal needed
            assert "from the cache" not in text
    assert "4 of 4 loglikelihood answers came from the cache" in text and "4/4 requests" not in text


def test_vllm_model_args_and_the_refusal_without_vllm():
    from typer.testing import CliRunner

    from dsmoe.cli.main import app
    from dsmoe.evals.vllm_engine import vllm_model_args

    assert vllm_model_args("deepseek-ai/deepseek-moe-16b-chat", "bf16", tensor_parallel=2, data_parallel=4) == {
        "pretrained": "deepseek-ai/deepseek-moe-16b-chat", "dtype": "bfloat16", "tensor_parallel_size": 2,
        "data_parallel_size": 4, "batch_size": "auto", "trust_remote_code": False}
    assert vllm_model_args("m", "fp16", max_length=2048)["max_model_len"] == 2048
    with pytest.raises(EvalError, match="--tensor-parallel must be at least 1"):
        vllm_model_args("m", tensor_parallel=0)
    result = CliRunner().invoke(app, ["eval", "--engine", "vllm", "--task", "mmlu", "--model", str(TINY)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    if __import__("importlib.util").util.find_spec("vllm") is None:
        assert "--engine vllm needs vLLM, which is not installed: pip install vllm on a machine with GPUs" in result.output
        assert len(result.output.strip().splitlines()) <= 2  # one line (rich may wrap it once)
    result = CliRunner().invoke(app, ["eval", "--engine", "vllm", "--bits", "4", "--task", "mmlu", "--model", str(TINY)])
    assert result.exit_code != 0 and "--bits" in result.output


def test_results_record_names_what_came_from_the_cache(tmp_path):
    """The JSON says it too (from_cache per request kind)."""
    from typer.testing import CliRunner

    from dsmoe.cli.main import app

    out = tmp_path / "r.json"
    args = ["eval", "--task", "arc_easy", "--limit", "1", "--data-dir", str(DATA), "--model", str(TINY),
            "--dtype", "fp32", "--cache-dir", str(tmp_path / "c"), "--output", str(out)]
    assert CliRunner().invoke(app, args).exit_code == 0
    assert json.loads(out.read_text())["from_cache"] == {"loglikelihood": 0}
    assert CliRunner().invoke(app, args).exit_code == 0
    assert json.loads(out.read_text())["from_cache"] == {"loglikelihood": 4}


def test_report_chat_suite_asks_lm_eval_for_chat_prompts(tiny, monkeypatch):
    """run() hands lm-eval the chat switches for report-chat (and only there, unless asked)."""
    import lm_eval

    from dsmoe.evals import runner

    asked = []

    def fake_evaluate(**kwargs):
        asked.append((kwargs["apply_chat_template"], kwargs["fewshot_as_multiturn"]))
        return {"results": {}}

    monkeypatch.setattr(lm_eval, "simple_evaluate", fake_evaluate)
    model, tok = tiny
    lm = DsmoeLM(model=model, tokenizer=tok)
    row = runner.PlannedTask(label="x", task="x", shots=0, metric_key=None, built=[])
    for suite, switch in (("report-chat", None), ("report", None), ("report", True), ("report-chat", False)):
        settings = EvalSettings(model=str(TINY), tasks=[], suite=suite, cache_dir=None, apply_chat_template=switch)
        runner.run(lm, settings, [row], task_manager(["mmlu"]))
    assert asked == [(True, True), (False, False), (True, True), (False, False)]


# ---------------------------------------------------------------------- section 4: lm-eval's rules, edge by edge


def test_empty_context_splits_a_leading_prefix_token_off_like_lm_eval(tiny):
    """TemplateLM.loglikelihood with context "": BOS is the context, unless the continuation starts with it."""
    from lm_eval_peer import LmEvalPeer

    model, tok = tiny
    lm = DsmoeLM(model=model, tokenizer=tok)
    peer = LmEvalPeer(model, tok)
    pairs = [("", BOS + "hello"), ("", "<pad>hello"), ("", "hello")]  # <pad> is id 0, below BOS's 1
    peer.loglikelihood(_requests("loglikelihood", pairs), disable_tqdm=True)
    hello = tok.backend.encode("hello", add_special_tokens=False).ids
    assert peer.pairs == [([1], hello), ([1], [0] + hello), ([1], hello)]  # lm-eval's own answer, spelled out
    assert [lm._encode_pair(*p) for p in pairs] == peer.pairs


class _LargeIdTokenizer:
    """Characters as ids 1000 + code point, BOS text "^" as id 100000 (DeepSeek's BOS id), or no BOS at all."""

    def __init__(self, bos: bool) -> None:
        self.bos_id, self.eos_id = (100000 if bos else None), 100001
        self.bos_token = "^" if bos else None

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        # int(str(...)): an equal id in a new object (the module's constants are one object), so an
        # adapter comparing ids with `is` fails here
        ids = [int(str(self.bos_id)) if self.bos_id and c == "^" else 1000 + ord(c) for c in text]
        return ([self.bos_id] if self.bos_id and add_bos is not False else []) + ids


def test_empty_context_rule_with_large_ids_and_without_bos(tiny):
    model, _ = tiny
    lm = DsmoeLM(model=model, tokenizer=_LargeIdTokenizer(bos=True))  # type: ignore[arg-type]
    ab = [1000 + ord("a"), 1000 + ord("b")]
    assert lm._encode_pair("", "^ab") == ([100000], ab)  # the same BOS id, computed twice: equal, not identical
    assert lm._encode_pair("", "ab") == ([100000], ab)
    lm = DsmoeLM(model=model, tokenizer=_LargeIdTokenizer(bos=False))  # type: ignore[arg-type]
    assert lm._encode_pair("", "ab") == ([100001], ab)  # lm-eval's prefix_token_id falls back to EOS


def test_generation_kwargs_read_as_lm_eval_s_hf_model_reads_them(tiny):
    """HFLM: max_gen_toks 256 by default; temperature 0.0 unless given; lm-eval's normalize_gen_kwargs
    samples when do_sample is true or a positive temperature is given without it; the prompt
    left-truncated to max_length - max_gen_toks."""
    model, tok = tiny

    def settings(**kwargs):
        return DsmoeLM(model=model, tokenizer=tok)._generation_prompt("Hello", {"until": [], **kwargs})[1]

    assert settings().max_new_tokens == 256
    assert settings(do_sample=True).temperature == 0.0  # HFLM's generation_kwargs.get("temperature", 0.0)
    assert settings(temperature=0.7).temperature == 0.7
    assert settings(do_sample=True, temperature=0.7).temperature == 0.7
    assert settings(do_sample=False, temperature=0.7).temperature == 0.0
    assert settings(do_sample=True, temperature=0).temperature == 0.0
    plain = settings(do_sample=True, temperature=0.7)  # neither given: no nucleus, no top-k (vLLM's defaults)
    assert (plain.top_p, plain.top_k) == (1.0, 0)
    assert (settings(do_sample=True, temperature=0.7, top_p=0.9, top_k=5).top_p, settings(top_k=5).top_k) == (0.9, 5)
    loose = settings(do_sample=True, temperature=0.7, top_p=None, top_k=None)  # None: no limit, as in HF
    assert (loose.top_p, loose.top_k) == (1.0, 0)
    text = "one two three four five six seven eight nine ten"
    ids = tok.encode(text)
    lm = DsmoeLM(model=model, tokenizer=tok, max_length=8)
    assert lm._generation_prompt(text, {"until": [], "max_gen_toks": 3})[0] == ids[-5:]  # 8 - 3 = 5 kept
    assert lm._generation_prompt(text, {"until": [], "max_gen_toks": 8})[0] == ids[-1:]  # HFLM refuses; we keep one


def test_chat_template_edges(tiny):
    model, tok = tiny
    lm = DsmoeLM(model=model, tokenizer=tok)
    turns = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
             {"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "6"}]
    assert lm.apply_chat_template(turns, add_generation_prompt=False) == (
        f"{BOS}User: 2+2?\n\nAssistant: 4{EOS}User: 3+3?\n\nAssistant: 6")  # the last message stays open
    # "A" is also in the template's "Assistant:": the cut is at the answer, not after a generation prompt.
    answer = [{"role": "user", "content": "Pick one"}, {"role": "assistant", "content": "A"}]
    assert lm.apply_chat_template(answer, add_generation_prompt=False) == f"{BOS}User: Pick one\n\nAssistant: A"
    # An empty answer: the closed render, as the template writes it (nothing to leave open).
    empty = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]
    assert lm.apply_chat_template(empty, add_generation_prompt=False) == f"{BOS}User: hi\n\nAssistant: {EOS}"
    # Roles read from a file are equal strings, not the same objects.
    assert lm.apply_chat_template(json.loads(json.dumps(turns)), add_generation_prompt=False).endswith("Assistant: 6")
    assert lm.apply_chat_template([], add_generation_prompt=False) == BOS
    assert lm.apply_chat_template(turns[:1], add_generation_prompt=False) == f"{BOS}User: 2+2?\n\n"
    assert lm.apply_chat_template(turns[:2]) == f"{BOS}User: 2+2?\n\nAssistant: 4{EOS}Assistant:"  # a new answer
    assert lm.chat_template() is None  # lm-eval's default: chat templating off
    assert lm.chat_template(None) is None and lm.chat_template("chatml") == tok.chat_template  # a name: our one template


def test_model_args_as_lm_eval_passes_them(tiny):
    """simple_evaluate calls create_from_arg_string with batch_size, max_batch_size and device added;
    model_args values arrive as strings; the model is registered under the name "dsmoe"."""
    from lm_eval.api.model import CacheHook, hash_args
    from lm_eval.api.registry import get_model

    assert get_model("dsmoe") is DsmoeLM
    model, tok = tiny
    lm = DsmoeLM(model=model, tokenizer=tok, device="cpu", max_batch_size=64)
    assert lm.batch_size == 8  # the default
    assert DsmoeLM(model=model, tokenizer=tok, batch_size=None).batch_size == 8
    assert DsmoeLM(model=model, tokenizer=tok, batch_size="auto:4").batch_size == 8
    assert DsmoeLM(model=model, tokenizer=tok, share_context="false").share_context is False
    assert DsmoeLM(model=model, tokenizer=tok, share_context="True").share_context is True
    hook = CacheHook(None)
    hook.dbdict = {}  # type: ignore[assignment]  # a dict stands in for lm-eval's sqlite cache
    lm.set_cache_hook(hook)
    args = ("The sky is", " blue")
    (result,) = lm.loglikelihood(_requests("loglikelihood", [args]))
    (total,) = lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [("The sky",)]))
    assert hook.dbdict == {hash_args("loglikelihood", args): result, hash_args("loglikelihood_rolling", ("The sky",)): total}
    for bad in ("eight", 0):
        with pytest.raises(EvalError, match="batch_size must be a positive integer"):
            DsmoeLM(model=model, tokenizer=tok, batch_size=bad)
