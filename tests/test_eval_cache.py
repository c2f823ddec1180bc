"""The eval cache: plain typed data (a planted pickle never runs), chunked commits that survive
SIGKILL, and a key that follows the checkpoint's content."""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from lm_eval.api.instance import Instance
from lm_eval.api.model import LM
from safetensors.torch import load_file, save_file

from dsmoe.errors import EvalError
from dsmoe.evals.cache import CHUNK_REQUESTS, CachedLM, EvalCache, request_key
from dsmoe.checkpoint.reader import checkpoint_fingerprint

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
TINY = SHARED / "fixtures" / "tiny-deepseek"
DATA = SHARED / "evaldata"


class _Planted:
    """Unpickling this creates the marker file: proof that something unpickled it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (str(self.marker), "w"))


class CountingLM(LM):
    """Answers from a formula of the request, and records every batch it was asked to score."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[list[tuple]] = []

    def loglikelihood(self, requests):  # type: ignore[no-untyped-def]
        self.batches.append([r.args for r in requests])
        return [(-float(len(c) + len(k)), len(k) % 2 == 0) for c, k in (r.args for r in requests)]

    def loglikelihood_rolling(self, requests):  # type: ignore[no-untyped-def]
        self.batches.append([r.args for r in requests])
        return [-float(len(r.args[0])) for r in requests]

    def generate_until(self, requests):  # type: ignore[no-untyped-def]
        self.batches.append([r.args for r in requests])
        return [r.args[0].upper() for r in requests]


def _requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def _questions(n: int, choices: int = 4) -> list[tuple[str, str]]:
    return [(f"question {q}?", f" choice {c}") for q in range(n) for c in range(choices)]


def test_answers_come_back_typed_and_the_rerun_scores_nothing(tmp_path):
    args = _questions(20)
    first = CountingLM()
    cached = CachedLM(first, EvalCache(tmp_path / "c.sqlite"))
    got = cached.loglikelihood(_requests("loglikelihood", args))
    assert got == [(-float(len(c) + len(k)), len(k) % 2 == 0) for c, k in args]
    # Chunks end only between questions: the 4 choices of one question are scored together.
    sizes = [len(b) for b in first.batches]
    assert sum(sizes) == 80 and all(s % 4 == 0 for s in sizes) and max(sizes) <= CHUNK_REQUESTS["loglikelihood"] + 3
    assert len(first.batches) > 1
    rolling = cached.loglikelihood_rolling(_requests("loglikelihood_rolling", [("some text",)]))
    generated = cached.generate_until(_requests("generate_until", [("abc", {"until": ["\n"]})]))
    assert cached.use.scored == 82 and cached.use.reused == 0

    again = CountingLM()
    resumed = CachedLM(again, EvalCache(tmp_path / "c.sqlite"))
    assert resumed.loglikelihood(_requests("loglikelihood", args)) == got
    assert resumed.loglikelihood_rolling(_requests("loglikelihood_rolling", [("some text",)])) == rolling == [-9.0]
    assert resumed.generate_until(_requests("generate_until", [("abc", {"until": ["\n"]})])) == generated == ["ABC"]
    assert again.batches == [] and resumed.use.reused == 82


def test_sampled_generations_are_never_cached(tmp_path):
    lm = CountingLM()
    cached = CachedLM(lm, EvalCache(tmp_path / "c.sqlite"))
    request = _requests("generate_until", [("abc", {"do_sample": True, "temperature": 1.0})])
    cached.generate_until(request)
    cached.generate_until(request)
    assert len(lm.batches) == 2


def test_a_planted_pickle_is_never_unpickled(tmp_path):
    """A cache file crafted with a pickle where an answer goes: reported as corrupt, never run."""
    marker = tmp_path / "pwned"
    path = tmp_path / "c.sqlite"
    args = ("question?", " yes")
    db = sqlite3.connect(path)  # the attacker's table: no STRICT types, a BLOB in every column
    db.execute("CREATE TABLE answers (kind, request, number, flag, text, PRIMARY KEY (kind, request))")
    blob = pickle.dumps(_Planted(marker))
    db.execute("INSERT INTO answers VALUES (?, ?, ?, ?, ?)",
               ("loglikelihood", request_key("loglikelihood", args), blob, blob, blob))
    db.commit()
    db.close()
    cached = CachedLM(CountingLM(), EvalCache(path))
    with pytest.raises(EvalError, match="corrupt"):
        cached.loglikelihood(_requests("loglikelihood", [args]))
    assert not marker.exists()
    pickle.loads(blob)  # the payload is real: unpickling it does create the marker
    assert marker.exists()


def test_no_module_unpickles_or_uses_lm_evals_cache():
    """Nothing in dsmoe imports pickle or SqliteDict or hands lm-eval a cache path (it would pickle)."""
    banned = ("import pickle", "from pickle", "pickle.load", "import sqlitedict", "from sqlitedict", "SqliteDict(",
              "CachingLM(", "use_cache=", "torch.load(", "import dill", "cloudpickle")
    offenders = []
    for path in REPO.rglob("*.py"):
        if any(part in (".venv", "tests", "build") for part in path.relative_to(REPO).parts):
            continue
        text = path.read_text(encoding="utf-8")
        offenders += [f"{path.relative_to(REPO)}: {b}" for b in banned if b in text]
    assert offenders == []


def test_corrupt_or_unwritable_cache_is_one_error(tmp_path):
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"this is not a database" * 100)
    with pytest.raises(EvalError, match="corrupt.*--no-cache"):
        EvalCache(garbage)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(EvalError, match="cannot write the eval cache"):
        EvalCache(blocker / "c.sqlite")


def test_fingerprint_follows_the_weights_not_the_path(tmp_path):
    copy = tmp_path / "tiny"
    shutil.copytree(TINY, copy)
    before = checkpoint_fingerprint(copy)
    assert checkpoint_fingerprint(copy) == before
    shard = copy / "model-00001-of-00002.safetensors"
    tensors = load_file(str(shard))
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 1  # same names, shapes and sizes: only the values change
    stat = shard.stat()
    save_file(tensors, str(shard), metadata={"format": "pt"})
    assert shard.stat().st_size == stat.st_size
    assert checkpoint_fingerprint(copy) != before
    config = json.loads((copy / "config.json").read_text())
    config["rope_theta"] = 20000.0
    (copy / "config.json").write_text(json.dumps(config))
    assert checkpoint_fingerprint(copy) != before


def _eval(args: list[str], **kwargs) -> subprocess.Popen:  # type: ignore[no-untyped-def]
    command = [sys.executable, "-c", "from dsmoe.cli.main import main; main()", "eval", *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def _answers(path: Path) -> int:
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1)
        try:
            return int(db.execute("SELECT count(*) FROM answers").fetchone()[0])
        finally:
            db.close()
    except sqlite3.Error:
        return 0


def test_sigkill_mid_run_then_the_rerun_scores_only_the_rest(tmp_path):
    """kill -9 while MMLU anatomy is scored; the rerun reuses every committed chunk and gives the
    numbers of a run that was never interrupted. A pickle planted where lm-eval's cache would be is
    never opened."""
    limit = 24  # 96 requests: three loglikelihood chunks
    common = ["--task", "mmlu_anatomy", "--limit", str(limit), "--data-dir", str(DATA), "--model", str(TINY),
              "--dtype", "fp32"]
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    marker = tmp_path / "pwned"
    old_key = json.dumps([str(TINY.resolve()), "fp32", None, None, 64])
    for key in (old_key, "x"):  # SqliteDict files with pickled values, as lm-eval's CachingLM keeps them
        name = hashlib.sha256(key.encode()).hexdigest()[:16] + "_rank0.db"
        db = sqlite3.connect(cache_dir / name)
        db.execute("CREATE TABLE unnamed (key TEXT PRIMARY KEY, value BLOB)")
        db.execute("INSERT INTO unnamed VALUES (?, ?)", ("k", pickle.dumps(_Planted(marker))))
        db.commit()
        db.close()

    # The uninterrupted reference runs beside the one that is killed (two cores, half the wall time).
    fresh = _eval([*common, "--no-cache", "--output", str(tmp_path / "fresh.json"),
                   "--log-samples", str(tmp_path / "fresh.jsonl")])
    killed = _eval([*common, "--cache-dir", str(cache_dir), "--output", str(tmp_path / "killed.json")])
    deadline = time.monotonic() + 600
    at_kill = 0
    while time.monotonic() < deadline and killed.poll() is None:
        files = list(cache_dir.glob("*.sqlite"))
        at_kill = _answers(files[0]) if files else 0
        if at_kill:
            killed.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    killed.wait(timeout=60)
    assert killed.returncode == -signal.SIGKILL, "the run ended before it could be killed mid-way"
    assert not (tmp_path / "killed.json").exists()
    (cache_file,) = cache_dir.glob("*.sqlite")
    kept = _answers(cache_file)
    assert 0 < kept < 4 * limit and kept % 4 == 0

    resumed = _eval([*common, "--cache-dir", str(cache_dir), "--output", str(tmp_path / "resumed.json"),
                     "--log-samples", str(tmp_path / "resumed.jsonl")])
    for proc in (resumed, fresh):
        _, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err
    record = json.loads((tmp_path / "resumed.json").read_text())
    assert record["cache"]["reused"] == kept and record["cache"]["reused"] + record["cache"]["scored"] == 4 * limit
    reference = json.loads((tmp_path / "fresh.json").read_text())
    assert record["lm_eval"]["results"] == reference["lm_eval"]["results"]
    assert record["rows"][0]["score"] == reference["rows"][0]["score"]
    answers = [[json.loads(line)["resps"] for line in (tmp_path / f"{run}.jsonl").read_text().splitlines()]
               for run in ("resumed", "fresh")]
    assert answers[0] == answers[1] and len(answers[0]) == limit  # every log-probability, bit for bit
    assert not marker.exists()


@pytest.mark.parametrize("flag", ["--use_cache", "-c", "--cache_requests", "--cache_requests=true"])
def test_lm_evals_pickling_caches_are_refused_on_its_command_line(capsys, flag):
    from dsmoe.evals.lm_eval_cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--model", "dsmoe", "--tasks", "mmlu", flag, "x"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "pickles" in err and err.count("\n") == 1
