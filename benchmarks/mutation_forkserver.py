"""Run pytest for mutation testing without paying for torch's import on every mutant.

``serve SOCKET`` imports the heavy third-party libraries once (torch, lm-eval, pytest; never
dsmoe, which is the code being mutated) and, for each request, forks a child that runs
``pytest.main`` with the request's arguments: the child imports dsmoe afresh, so it sees the
mutant on disk. Without a server at SOCKET, ``run`` is plain pytest. ``run SOCKET ARGS...`` sends one request, prints the child's output and exits
with its status, as a plain ``python -m pytest ARGS...`` would. A client killed on cosmic-ray's
timeout closes its connection, and the server then kills the child.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import sys

EXIT_MARK = b"\n--forkserver-exit "


def serve(path: str) -> None:
    import lm_eval.api.model  # noqa: F401  (warm imports only: the child re-imports nothing of these)
    import numpy  # noqa: F401
    import pytest
    import torch  # noqa: F401

    if any(name == "dsmoe" or name.startswith("dsmoe.") for name in sys.modules):
        sys.exit("the fork server must not import dsmoe: the children would test the unmutated code")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    while True:
        conn, _ = server.accept()
        with conn:
            request = json.loads(conn.makefile("rb").readline())
            pid = os.fork()
            if pid == 0:
                server.close()
                os.dup2(conn.fileno(), 1)
                os.dup2(conn.fileno(), 2)
                os.chdir(request["cwd"])
                sys.dont_write_bytecode = True  # as cosmic-ray's own runs: no stale .pyc of a mutant
                sys.argv = ["pytest", *request["args"]]
                code = pytest.main(request["args"])
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(int(code))
            status = _wait_or_kill(pid, conn)
            try:
                conn.sendall(EXIT_MARK + str(os.waitstatus_to_exitcode(status)).encode())
            except OSError:
                pass  # the client is gone


def _wait_or_kill(pid: int, conn: socket.socket) -> int:
    """The child's wait status; a client that hangs up (cosmic-ray's timeout) kills the child."""
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        readable, _, _ = select.select([conn], [], [], 0.2)
        if readable and not conn.recv(1, socket.MSG_PEEK):
            os.kill(pid, signal.SIGKILL)
            return os.waitpid(pid, 0)[1]


def run(path: str, args: list[str]) -> int:
    if not os.path.exists(path):  # no server (a resumed `cosmic-ray exec`): plain pytest, slower
        os.execv(sys.executable, [sys.executable, "-m", "pytest", *args])
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(path)
    client.sendall(json.dumps({"cwd": os.getcwd(), "args": args}).encode() + b"\n")
    received = bytearray()
    while chunk := client.recv(65536):
        received += chunk
    output, mark, code = bytes(received).rpartition(EXIT_MARK)
    if not mark:
        sys.stdout.buffer.write(received)
        return 3  # the child died without a status: count it as a failure
    sys.stdout.buffer.write(output)
    return int(code)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2])
    else:
        sys.exit(run(sys.argv[2], sys.argv[3:]))
