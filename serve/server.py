"""Running the app under uvicorn: one worker, a callback once listening, a clean stop on a signal."""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from types import FrameType
from typing import TYPE_CHECKING, Callable

import uvicorn

from dsmoe.errors import UsageError
from dsmoe.serve.app import ServerOptions, create_app
from dsmoe.serve.engine import Engine
from dsmoe.serve.metrics import Metrics
from dsmoe.serve.worker import Worker

if TYPE_CHECKING:
    from dsmoe.model.deepseek import DeepseekForCausalLM
    from dsmoe.model.tokenizer import Tokenizer
    from dsmoe.offload import ExpertStore


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, api_key: str | None, insecure_no_key: bool) -> None:
    """Any address but loopback needs a key, or the user saying in so many words that they want none."""
    if not is_loopback(host) and not api_key and not insecure_no_key:
        raise UsageError(f"--host {host} lets other machines in: give --api-key KEY (or --insecure-no-key "
                         f"to serve without one)")


class _Server(uvicorn.Server):
    """uvicorn's server, telling the worker to stop as soon as a signal arrives (so streams end now)."""

    def __init__(self, config: uvicorn.Config, worker: Worker, on_listening: Callable[[str, int], None]) -> None:
        super().__init__(config)
        self.worker = worker
        self.on_listening = on_listening

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and self.servers:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            self.on_listening(host, port)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.worker.close(timeout=0)
        super().handle_exit(sig, frame)


class Server:
    """A model behind the API: ``run`` blocks (signals stop it), or ``start``/``stop`` from another thread."""

    def __init__(
        self,
        model: "DeepseekForCausalLM",
        tokenizer: "Tokenizer",
        *,
        model_name: str,
        host: str = "127.0.0.1",
        port: int = 8000,
        api_key: str | None = None,
        max_queue: int = 64,
        context: int | None = None,
        default_max_tokens: int = 512,
        store: "ExpertStore | None" = None,
        on_listening: Callable[[str, int], None] = lambda host, port: None,
    ) -> None:
        engine = Engine(model, tokenizer, context=context, default_max_tokens=default_max_tokens)
        metrics = Metrics(lambda: self.worker.depth, lambda: int(self.worker.running is not None), store)
        self.worker = Worker(engine, max_queue, on_finished=metrics.finished)
        app = create_app(self.worker, ServerOptions(model_name=model_name, api_key=api_key), metrics)
        config = uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False, lifespan="off",
                                timeout_graceful_shutdown=5)
        self._listener = listen(host, port)
        self.host, self.port = self._listener.getsockname()[:2]
        self._uvicorn = _Server(config, self.worker, on_listening)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def run(self) -> None:
        """Serve until SIGINT/SIGTERM; in-flight requests end with an error event, then the port is released."""
        self.worker.start()
        try:
            self._uvicorn.run(sockets=[self._listener])
        finally:
            self.worker.close()
            self._listener.close()

    def start(self, timeout: float = 30.0) -> None:
        """Serve from a background thread; returns once it accepts connections."""
        self._thread = threading.Thread(target=self.run, name="dsmoe-serve", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._uvicorn.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.01)

    def stop(self, timeout: float = 10.0) -> None:
        self.worker.close(timeout=0)
        self._uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so a port in use is one clear error rather than a log line."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, reuse_port=False)
    except OSError as exc:
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
