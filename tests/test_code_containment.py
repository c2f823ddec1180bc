"""The code scorer: a program passes only by running its tests to the end (as HF code_eval scores),
and each of the walls ``containment()`` reports holds against a program that tries to get out."""

from __future__ import annotations

import os
import time

import pytest

from dsmoe.errors import EvalError
from dsmoe.evals import code_exec
from dsmoe.evals.code_exec import MAX_PROCESSES, containment, run_program

WALLS = containment()
needs_namespaces = pytest.mark.skipif(not WALLS.namespaces, reason="unshare with user namespaces is not available")


@pytest.mark.parametrize("early_exit", ["exit()", "quit()", "import sys; sys.exit(0)", "raise SystemExit",
                                        "import os; os._exit(0)"])
def test_a_program_that_exits_before_its_tests_fails(early_exit):
    program = f"def add(a, b):\n    return a - b\n{early_exit}\nassert add(1, 2) == 3\n"
    result = run_program(program, timeout=10)
    assert result.status == "failed", result


def test_passing_failing_and_timed_out_programs():
    assert run_program("def add(a, b):\n    return a + b\nassert add(1, 2) == 3\n", timeout=10).passed
    failed = run_program("def add(a, b):\n    return a - b\nassert add(1, 2) == 3\n", timeout=10)
    assert failed.status == "failed" and "AssertionError" in failed.detail
    assert run_program("while True:\n    pass\n", timeout=1).status == "timed out"


def test_the_environment_is_scrubbed(monkeypatch):
    monkeypatch.setenv("DSMOE_TEST_SECRET", "hunter2")
    program = "import os\nassert 'DSMOE_TEST_SECRET' not in os.environ, 'leaked'\nassert set(os.environ) <= {" \
              "'PATH', 'HOME', 'TMPDIR', 'LANG', 'PYTHONDONTWRITEBYTECODE', 'PYTHONIOENCODING', 'OMP_NUM_THREADS', " \
              "'OPENBLAS_NUM_THREADS', 'MKL_NUM_THREADS', 'LC_CTYPE'}, sorted(os.environ)\n"
    assert run_program(program, timeout=10).passed


@needs_namespaces
def test_the_evaluators_environment_and_process_are_out_of_reach(monkeypatch):
    monkeypatch.setenv("DSMOE_TEST_SECRET", "hunter2")
    me = os.getpid()
    program = (
        "import os, signal\n"
        f"for pid in ({me}, os.getppid()):\n"
        "    try:\n"
        "        data = open(f'/proc/{pid}/environ', 'rb').read()\n"
        "    except OSError:\n"
        "        continue\n"
        "    assert b'hunter2' not in data, 'read the evaluator environment'\n"
        "visible = [p for p in os.listdir('/proc') if p.isdigit()]\n"
        "assert len(visible) <= 3, visible\n"
        "try:\n"
        f"    os.kill({me}, signal.SIGTERM)\n"
        "except ProcessLookupError:\n"
        "    pass\n"
    )
    assert run_program(program, timeout=10).passed
    assert os.environ["DSMOE_TEST_SECRET"] == "hunter2"  # and we are still here to check


@needs_namespaces
def test_no_network():
    program = (
        "import socket\n"
        "for address in [('127.0.0.1', 9), ('8.8.8.8', 53)]:\n"
        "    s = socket.socket()\n"
        "    s.settimeout(2)\n"
        "    try:\n"
        "        s.connect(address)\n"
        "    except OSError:\n"
        "        pass\n"
        "    else:\n"
        "        raise AssertionError(f'connected to {address}')\n"
        "names = [n for _, n in socket.if_nameindex()]\n"
        "assert names == ['lo'], names\n"
    )
    assert run_program(program, timeout=10).passed


@needs_namespaces
def test_setsid_is_no_escape(tmp_path):
    """A grandchild in a new session outlives neither the time limit nor its program."""
    marker = tmp_path / "escaped"
    program = (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    time.sleep(1.5)\n"
        f"    open({str(marker)!r}, 'w').write('still running')\n"
        "    os._exit(0)\n"
    )
    assert run_program(program, timeout=10).passed
    time.sleep(2.5)
    assert not marker.exists()


@pytest.mark.skipif(WALLS.process_limit is None, reason="neither a pids cgroup nor RLIMIT_NPROC applies here")
def test_forks_stop_at_the_process_limit():
    """A bounded loop of 40 forks (each child sleeps, then exits): at most MAX_PROCESSES succeed."""
    program = (
        "import os, time\n"
        "children = []\n"
        "for _ in range(40):\n"
        "    try:\n"
        "        pid = os.fork()\n"
        "    except OSError:\n"
        "        break\n"
        "    if pid == 0:\n"
        "        time.sleep(2)\n"
        "        os._exit(0)\n"
        "    children.append(pid)\n"
        f"assert 1 <= len(children) < {MAX_PROCESSES}, len(children)\n"
    )
    result = run_program(program, timeout=10)
    assert result.passed, result


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "0", "soon"])
def test_a_bad_timeout_is_one_error(monkeypatch, value):
    monkeypatch.setenv(code_exec.TIMEOUT_ENV, value)
    with pytest.raises(EvalError, match="DSMOE_CODE_TIMEOUT"):
        code_exec._timeout()


def test_containment_says_what_holds():
    text = WALLS.describe()
    assert ("no network" in text) == WALLS.namespaces
    assert ("no process limit" in text) == (WALLS.process_limit is None)
