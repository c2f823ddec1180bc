"""pass@k for HumanEval and MBPP, computed here: each program runs with its tests in a subprocess.

lm-eval's own HumanEval and MBPP tasks score with Hugging Face ``evaluate``'s ``code_eval``, a
metric script that ``evaluate.load`` fetches from the hub when the task is built, so they cannot
run offline. Our task definitions (``tasks/humaneval.yaml``, ``tasks/mbpp.yaml``, same names,
prompts and result keys as lm-eval's) point at the functions here instead.

A program passes when ``python program.py`` exits 0 within the time limit, the program being the
model's code followed by the benchmark's tests (``assert`` lines, or HumanEval's ``check``
function and its call), as in ``code_eval``. Each program runs in a fresh interpreter, in its own
empty temporary folder and process group, with no stdin, a minimal environment, and (on POSIX)
limits on CPU seconds, memory (2 GiB) and file size; after ``DSMOE_CODE_TIMEOUT`` seconds (default
5: code_eval's 3 for the program, plus starting an interpreter) the whole group is killed. That
contains mistakes, not malice: it is not a sandbox, which is why running it needs
``--allow-code-execution`` (``dsmoe eval``) or ``HF_ALLOW_CODE_EVAL=1``.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from dsmoe.errors import EvalError

ALLOW_ENV = "HF_ALLOW_CODE_EVAL"
TIMEOUT_ENV = "DSMOE_CODE_TIMEOUT"
DEFAULT_TIMEOUT_S = 5.0
MEMORY_LIMIT = 2 << 30
FILE_SIZE_LIMIT = 64 << 20
MAX_WORKERS = 4


@dataclass(frozen=True)
class Execution:
    """How one program ended: ``passed``, ``failed`` (with the last line of its stderr) or ``timed out``."""

    status: str
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _allowed() -> None:
    if os.environ.get(ALLOW_ENV) != "1":
        raise EvalError(
            "scoring HumanEval/MBPP runs the model's generated code; pass --allow-code-execution "
            f"(or set {ALLOW_ENV}=1 when calling lm-eval yourself)"
        )


def _timeout() -> float:
    value = os.environ.get(TIMEOUT_ENV)
    try:
        return float(value) if value else DEFAULT_TIMEOUT_S
    except ValueError:
        raise EvalError(f"{TIMEOUT_ENV}={value!r}: not a number of seconds") from None


def _limits(timeout: float):  # type: ignore[no-untyped-def]
    """Resource limits applied in the child before it runs Python (POSIX only)."""
    if os.name != "posix":
        return None

    def apply() -> None:
        import resource

        cpu = int(math.ceil(timeout)) + 1
        for limit, value in ((resource.RLIMIT_CPU, cpu), (resource.RLIMIT_AS, MEMORY_LIMIT),
                             (resource.RLIMIT_FSIZE, FILE_SIZE_LIMIT), (resource.RLIMIT_CORE, 0)):
            try:
                soft, hard = resource.getrlimit(limit)
                if hard != resource.RLIM_INFINITY:
                    value = min(value, hard)
                resource.setrlimit(limit, (value, hard))
            except (ValueError, OSError):
                pass

    return apply


def run_program(program: str, timeout: float | None = None) -> Execution:
    """Run ``program`` in a fresh Python subprocess; it passes when it exits 0 before ``timeout``."""
    timeout = _timeout() if timeout is None else timeout
    with tempfile.TemporaryDirectory(prefix="dsmoe-code-", ignore_cleanup_errors=True) as folder:
        path = os.path.join(folder, "program.py")
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(program)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": folder, "TMPDIR": folder,
               "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONIOENCODING": "utf-8",
               "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        # stderr goes to a file, not a pipe: the file-size limit bounds what a runaway program writes.
        with open(os.path.join(folder, "stderr"), "w+b") as err:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-B", path], cwd=folder, env=env, stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=err, start_new_session=os.name == "posix",
                preexec_fn=_limits(timeout),
            )
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                return Execution("timed out", f"no result after {timeout:g}s")
            finally:
                _kill(proc)  # and whatever it left running in its process group
            if proc.returncode == 0:
                return Execution("passed")
            err.seek(max(0, err.seek(0, os.SEEK_END) - 4096))
            lines = [line for line in err.read().decode("utf-8", "replace").splitlines() if line.strip()]
    detail = lines[-1][:200] if lines else f"exit status {proc.returncode}"
    if proc.returncode < 0:
        detail = f"killed by signal {-proc.returncode}" + (f" ({detail})" if lines else "")
    return Execution("failed", detail)


def _kill(proc: subprocess.Popen) -> None:
    """Kill the program and anything it started (its own process group), then reap it."""
    try:
        if os.name == "posix":
            os.killpg(proc.pid, signal.SIGKILL)
        elif proc.poll() is None:
            proc.kill()
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def estimate_pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem from n samples of which c pass (Chen et al., 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def check(references: list[str], predictions: list[list[str]]) -> list[list[Execution]]:
    """Run every candidate program of every problem with that problem's tests."""
    _allowed()
    if len(references) != len(predictions):
        raise EvalError(f"{len(predictions)} prediction lists for {len(references)} test sets")
    programs = [(i, candidate + "\n" + test) for i, (test, candidates) in enumerate(zip(references, predictions))
                for candidate in candidates]
    timeout = _timeout()
    if len(programs) == 1:
        outcomes = [run_program(programs[0][1], timeout)]
    else:
        with ThreadPoolExecutor(max_workers=min(MAX_WORKERS, len(programs) or 1)) as pool:
            outcomes = list(pool.map(lambda p: run_program(p[1], timeout), programs))
    results: list[list[Execution]] = [[] for _ in references]
    for (i, _), outcome in zip(programs, outcomes):
        results[i].append(outcome)
    return results


def pass_at_k(references: list[str], predictions: list[list[str]], k: list[int] | int | None = None) -> dict[str, float]:
    """``{"pass@K": mean over problems}`` for each K no larger than every problem's sample count.

    The same inputs and result as ``evaluate.load("code_eval").compute(...)[0]``: lm-eval's
    HumanEval calls it with one test program per problem and its candidate programs.
    """
    ks = [1] if k is None else [k] if isinstance(k, int) else list(k)
    results = check(references, predictions)
    totals = [len(r) for r in results]
    correct = [sum(e.passed for e in r) for r in results]
    return {f"pass@{kk}": sum(estimate_pass_at_k(n, c, kk) for n, c in zip(totals, correct)) / len(results)
            for kk in ks if results and all(n >= kk for n in totals)}


def pass_at_1(references: str | list[str], predictions: str | list[str] | list[list[str]]) -> float:
    """MBPP's metric: pass@1 with one program per problem (lm-eval passes plain strings)."""
    if isinstance(references, str):
        references = [references]
    if isinstance(predictions, str):
        predictions = [predictions]
    if predictions and isinstance(predictions[0], str):
        predictions = [[p] for p in predictions]  # type: ignore[misc]
    return pass_at_k(references, predictions, [1]).get("pass@1", 0.0)  # type: ignore[arg-type]


# ---------------------------------------------------------------------- HumanEval


def humaneval_predictions(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    """HumanEval's completions are function bodies: the prompt (signature, docstring) goes first."""
    return [[doc["prompt"] + r for r in resp] for resp, doc in zip(resps, docs)]


# ---------------------------------------------------------------------- MBPP


def mbpp_fewshot_samples() -> list[dict]:
    """MBPP's three prompt examples (task ids 2-4 of its prompt split), as lm-eval's MBPP uses them."""
    return [
        {
            "task_id": 2,
            "text": "Write a function to find the similar elements from the given two tuple lists.",
            "code": "def similar_elements(test_tup1, test_tup2):\r\n  res = tuple(set(test_tup1) & set(test_tup2))\r\n  return (res) ",
            "test_list": [
                "assert similar_elements((3, 4, 5, 6),(5, 7, 4, 10)) == (4, 5)",
                "assert similar_elements((1, 2, 3, 4),(5, 4, 3, 7)) == (3, 4)",
                "assert similar_elements((11, 12, 14, 13),(17, 15, 14, 13)) == (13, 14)",
            ],
            "is_fewshot": True,
        },
        {
            "task_id": 3,
            "text": "Write a python function to identify non-prime numbers.",
            "code": "import math\r\ndef is_not_prime(n):\r\n    result = False\r\n    for i in range(2,int(math.sqrt(n)) + 1):\r\n        if n % i == 0:\r\n            result = True\r\n    return result",
            "test_list": [
                "assert is_not_prime(2) == False",
                "assert is_not_prime(10) == True",
                "assert is_not_prime(35) == True",
            ],
            "is_fewshot": True,
        },
        {
            "task_id": 4,
            "text": "Write a function to find the largest integers from a given list of numbers using heap queue algorithm.",
            "code": "import heapq as hq\r\ndef heap_queue_largest(nums,n):\r\n  largest_nums = hq.nlargest(n, nums)\r\n  return largest_nums",
            "test_list": [
                "assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],3)==[85, 75, 65] ",
                "assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],2)==[85, 75] ",
                "assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],5)==[85, 75, 65, 58, 35]",
            ],
            "is_fewshot": True,
        },
    ]
