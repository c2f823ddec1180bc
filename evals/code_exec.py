"""pass@k for HumanEval and MBPP, computed here: each program runs with its tests in a subprocess.

lm-eval's own HumanEval and MBPP tasks score with Hugging Face ``evaluate``'s ``code_eval``, a
metric script that ``evaluate.load`` fetches from the hub when the task is built, so they cannot
run offline. Our task definitions (``tasks/humaneval.yaml``, ``tasks/mbpp.yaml``, same names,
prompts and result keys as lm-eval's) point at the functions here instead.

A program is the model's code followed by the benchmark's tests (``assert`` lines, or HumanEval's
``check`` function and its call). As in ``code_eval``, it passes when its code runs to the end
without an exception within the time limit: a small runner executes it and only then writes a
random token (given on stdin, never in the program or its environment) to a pipe, so a program
that calls ``exit(0)``, ``os._exit(0)`` or ``sys.exit()`` before its tests does not pass.

What contains a program (``containment()`` says which of these hold on this machine):

- always: a fresh ``python -I`` in an empty temporary folder, no stdin, an environment of only
  PATH, HOME/TMPDIR (the folder), locale and thread counts; limits on CPU seconds, memory
  (2 GiB) and file size (64 MiB); its own session and process group, killed after
  ``DSMOE_CODE_TIMEOUT`` seconds (default 5: code_eval's 3 plus starting an interpreter);
- with ``unshare`` and user namespaces (Linux): a new network namespace (no interfaces but a
  down loopback, so no sockets reach anything), a new PID namespace with its own ``/proc`` (the
  evaluator and every other process are invisible: their environment cannot be read, they
  cannot be signalled), and ``setsid`` is no escape: killing the namespace's first process kills
  every process in it;
- a process limit of ``MAX_PROCESSES``: a pids cgroup where one can be made (as root), else
  RLIMIT_NPROC (which the kernel does not apply to root).

Not contained: the file system (a program can read and write whatever the user can), CPU and
memory use below the limits, and, without ``unshare``, network access, the evaluator's
``/proc`` entries and processes that ``setsid`` away. It contains mistakes and the usual
runaway programs, not a determined attacker: running it needs ``--allow-code-execution``
(``dsmoe eval``) or ``HF_ALLOW_CODE_EVAL=1``.
"""

from __future__ import annotations

import functools
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from dsmoe.errors import EvalError

ALLOW_ENV = "HF_ALLOW_CODE_EVAL"
TIMEOUT_ENV = "DSMOE_CODE_TIMEOUT"
DEFAULT_TIMEOUT_S = 5.0
MEMORY_LIMIT = 2 << 30
FILE_SIZE_LIMIT = 64 << 20
MAX_WORKERS = 4
MAX_PROCESSES = 16
"""Processes (and threads, which the kernel counts alike) one program may have at once."""

PIDS_CGROUP = Path("/sys/fs/cgroup/pids")
UNSHARE = ("--user", "--map-root-user", "--net", "--pid", "--fork", "--mount-proc", "--kill-child")

# Runs the program; writes the token it read from stdin to the pipe only when the program ended normally.
_RUNNER = """
import os, sys
def _dsmoe_run():
    token = sys.stdin.readline().strip().encode()
    sys.stdin.close()
    fd, path = int(sys.argv[1]), sys.argv[2]
    del sys.argv[1:]
    with open(path, encoding="utf-8") as handle:
        code = compile(handle.read(), path, "exec")
    exec(code, {"__name__": "__main__", "__file__": path, "__builtins__": __builtins__})
    os.write(fd, token)
_dsmoe_run()
"""


@dataclass(frozen=True)
class Execution:
    """How one program ended: ``passed``, ``failed`` (with the last line of its stderr) or ``timed out``."""

    status: str
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@dataclass(frozen=True)
class Containment:
    """Which of the OS's walls this machine gives each program."""

    namespaces: bool
    """Network, PID and /proc namespaces through ``unshare``."""
    process_limit: str | None
    """``"cgroup"``, ``"rlimit"``, or None when neither applies (root without a writable pids cgroup)."""

    def describe(self) -> str:
        walls = ["no network, no view of other processes" if self.namespaces else
                 "network and other processes reachable (no unshare)"]
        walls.append(f"at most {MAX_PROCESSES} processes ({self.process_limit})" if self.process_limit
                     else "no process limit")
        return ", ".join(walls)


def _allowed() -> None:
    if os.environ.get(ALLOW_ENV) != "1":
        raise EvalError(
            "scoring HumanEval/MBPP runs the model's generated code; pass --allow-code-execution "
            f"(or set {ALLOW_ENV}=1 when calling lm-eval yourself)"
        )


def _timeout() -> float:
    value = os.environ.get(TIMEOUT_ENV)
    if not value:
        return DEFAULT_TIMEOUT_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        raise EvalError(f"{TIMEOUT_ENV}={value!r}: must be a positive number of seconds")
    return seconds


@functools.lru_cache(maxsize=1)
def containment() -> Containment:
    """Probe once what this machine allows: namespaces through unshare, a pids cgroup, RLIMIT_NPROC."""
    namespaces = False
    unshare = shutil.which("unshare")
    if unshare and sys.platform.startswith("linux"):
        try:
            probe = subprocess.run([unshare, *UNSHARE, sys.executable, "-c", "pass"], stdin=subprocess.DEVNULL,
                                   capture_output=True, timeout=30, check=False)
            namespaces = probe.returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            namespaces = False
    if _cgroup_usable():
        limit: str | None = "cgroup"
    elif os.name == "posix" and os.geteuid() != 0:
        limit = "rlimit"
    else:
        limit = None
    return Containment(namespaces=namespaces, process_limit=limit)


def _cgroup_usable() -> bool:
    try:
        folder = Path(tempfile.mkdtemp(prefix="dsmoe-probe-", dir=PIDS_CGROUP))
    except OSError:
        return False
    try:
        (folder / "pids.max").write_text(str(MAX_PROCESSES))
        return True
    except OSError:
        return False
    finally:
        _remove_cgroup(folder)


def _remove_cgroup(folder: Path) -> None:
    """A cgroup can be removed once its processes are gone; killed ones take a moment to be reaped."""
    for _ in range(50):
        try:
            folder.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.02)


def _user_tasks() -> int:
    """Tasks (processes and threads) this user runs now: what RLIMIT_NPROC counts against."""
    import psutil

    uid = os.getuid()
    total = 0
    for process in psutil.process_iter(["uids", "num_threads"]):
        uids, threads = process.info["uids"], process.info["num_threads"]
        if uids is not None and uids.real == uid:
            total += threads or 1
    return total


def _limits(timeout: float, cgroup: Path | None, nproc: int | None):
    """Applied in the child before it runs anything (POSIX only): resource limits, then the cgroup."""
    if os.name != "posix":
        return None
    procs = None if cgroup is None else str(cgroup / "cgroup.procs")

    def apply() -> None:
        import resource

        cpu = int(math.ceil(timeout)) + 1
        limits = [(resource.RLIMIT_CPU, cpu), (resource.RLIMIT_AS, MEMORY_LIMIT),
                  (resource.RLIMIT_FSIZE, FILE_SIZE_LIMIT), (resource.RLIMIT_CORE, 0)]
        if nproc is not None:
            limits.append((resource.RLIMIT_NPROC, nproc))
        for limit, value in limits:
            try:
                soft, hard = resource.getrlimit(limit)
                if hard != resource.RLIM_INFINITY:
                    value = min(value, hard)
                resource.setrlimit(limit, (value, hard))
            except (ValueError, OSError):
                pass
        if procs is not None:
            with open(procs, "w") as handle:
                handle.write(str(os.getpid()))

    return apply


def run_program(program: str, timeout: float | None = None, nproc: int | None = None) -> Execution:
    """Run ``program`` contained; it passes when it runs to its end before ``timeout``."""
    timeout = _timeout() if timeout is None else timeout
    walls = containment()
    if walls.process_limit == "rlimit" and nproc is None:
        nproc = _user_tasks() + MAX_PROCESSES
    with tempfile.TemporaryDirectory(prefix="dsmoe-code-", ignore_cleanup_errors=True) as folder:
        path = os.path.join(folder, "program.py")
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(program)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": folder, "TMPDIR": folder,
               "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONIOENCODING": "utf-8",
               "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        cgroup = None
        if walls.process_limit == "cgroup":
            cgroup = Path(tempfile.mkdtemp(prefix="dsmoe-code-", dir=PIDS_CGROUP))
            (cgroup / "pids.max").write_text(str(MAX_PROCESSES))
        token = secrets.token_hex(16)
        result_read, result_write = os.pipe()
        os.set_blocking(result_read, False)
        command = [sys.executable, "-I", "-B", "-c", _RUNNER, str(result_write), path]
        if walls.namespaces:
            command = [shutil.which("unshare") or "unshare", *UNSHARE, *command]
        try:
            # stderr goes to a file, not a pipe: the file-size limit bounds what a runaway program writes.
            with open(os.path.join(folder, "stderr"), "w+b") as err:
                proc = subprocess.Popen(
                    command, cwd=folder, env=env, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=err,
                    start_new_session=os.name == "posix", pass_fds=(result_write,),
                    preexec_fn=_limits(timeout, cgroup, nproc if walls.process_limit == "rlimit" else None),
                )
                os.close(result_write)
                result_write = -1
                try:
                    proc.stdin.write(token.encode() + b"\n")  # type: ignore[union-attr]  # started with stdin=PIPE
                    proc.stdin.close()  # type: ignore[union-attr]  # started with stdin=PIPE
                except OSError:
                    pass
                try:
                    proc.wait(timeout=timeout)
                    timed_out = False
                except subprocess.TimeoutExpired:
                    timed_out = True
                finally:
                    _kill(proc)  # and whatever it left running in its process group or namespace
                reached_end = _read_token(result_read) == token.encode()
                if reached_end:
                    return Execution("passed")
                if timed_out:
                    return Execution("timed out", f"no result after {timeout:g}s")
                err.seek(max(0, err.seek(0, os.SEEK_END) - 4096))
                lines = [line for line in err.read().decode("utf-8", "replace").splitlines() if line.strip()]
        finally:
            os.close(result_read)
            if result_write >= 0:
                os.close(result_write)
            if cgroup is not None:
                _remove_cgroup(cgroup)
    detail = lines[-1][:200] if lines else f"exit status {proc.returncode}"
    if proc.returncode == 0 and not lines:
        detail = "ended before its tests finished (exit called early)"
    if proc.returncode < 0:
        detail = f"killed by signal {-proc.returncode}" + (f" ({detail})" if lines else "")
    return Execution("failed", detail)


def _read_token(fd: int) -> bytes:
    """What the runner wrote to the result pipe (at most a token's length; never blocks)."""
    try:
        return os.read(fd, 64)
    except (BlockingIOError, OSError):
        return b""


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
        predictions = [[p] for p in predictions]
    return pass_at_k(references, predictions, [1]).get("pass@1", 0.0)  # type: ignore[arg-type]  # lists of lists by now


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
