"""One thread owns the model and serves requests in the order they came, from a bounded queue.

Handlers run on the event loop; the worker runs the engine in its own thread and hands each event
back through the loop (``call_soon_threadsafe``), so decoding never blocks the server from
accepting, refusing or cancelling other requests. A request whose client has gone is taken out
of the queue at once, or stopped at its next token if it is running.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import torch

from dsmoe.errors import DsmoeError
from dsmoe.serve.engine import Engine, Event, Finished, Generation
from dsmoe.serve.schema import ApiError

log = logging.getLogger("dsmoe.serve")


@dataclass
class Failed:
    """The request ended with an error (sent as the response, or as the stream's last event)."""

    error: ApiError


END = None
"""The last item on a job's event queue."""


class Job:
    """One request's generations and the queue its events come back on (read on the event loop)."""

    def __init__(self, generations: list[Generation], loop: asyncio.AbstractEventLoop) -> None:
        self.generations = generations
        self.loop = loop
        self.events: asyncio.Queue[Event | Failed | None] = asyncio.Queue()
        self.submitted = time.perf_counter()
        self.started: float | None = None
        self.stop_reason: str | None = None
        self._stop = threading.Event()

    def stop(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
        self._stop.set()

    def stopping(self) -> bool:
        return self._stop.is_set()

    def emit(self, item: Event | Failed | None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the loop has closed: nobody is listening any more
            pass


class Worker:
    """Runs jobs one at a time; at most ``max_queue`` wait behind the running one."""

    def __init__(self, engine: Engine, max_queue: int,
                 on_finished: Callable[[Finished], None] = lambda done: None) -> None:
        self.engine = engine
        self.max_queue = max_queue
        self.on_finished = on_finished
        """Called for every generation that ends, cancelled ones too: the work was done either way."""
        self.running: Job | None = None
        self.closed = False
        self._waiting: deque[Job] = deque()
        self._cond = threading.Condition()
        self._threads = torch.get_num_threads()
        self._thread = threading.Thread(target=self._loop, name="dsmoe-serve-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def depth(self) -> int:
        """Requests waiting for their turn (the running one not counted)."""
        return len(self._waiting)

    def submit(self, job: Job) -> None:
        with self._cond:
            if self.closed:
                raise ApiError(503, "the server is shutting down", kind="server_error", code="shutting_down")
            if len(self._waiting) >= self.max_queue:
                raise ApiError(429, f"the server is busy: {len(self._waiting)} requests are waiting "
                                    f"(--max-queue {self.max_queue}); retry later",
                               kind="rate_limit_error", code="queue_full")
            self._waiting.append(job)
            self._cond.notify()

    def cancel(self, job: Job, reason: str = "client disconnected") -> None:
        """Stop ``job``: out of the queue if it waits, at its next token if it runs."""
        job.stop(reason)
        with self._cond:
            if job in self._waiting:
                self._waiting.remove(job)
                job.emit(END)

    def close(self, timeout: float = 10.0) -> None:
        """Refuse new jobs, fail the waiting ones, stop the running one and wait for the thread."""
        with self._cond:
            self.closed = True
            waiting, self._waiting = list(self._waiting), deque()
            if self.running is not None:
                self.running.stop("shutdown")
            self._cond.notify_all()
        for job in waiting:
            job.stop("shutdown")
            job.emit(Failed(ApiError(503, "the server is shutting down", kind="server_error", code="shutting_down")))
            job.emit(END)
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _loop(self) -> None:
        torch.set_num_threads(self._threads)
        while True:
            with self._cond:
                while not self._waiting and not self.closed:
                    self._cond.wait()
                if self.closed:
                    return
                job = self._waiting.popleft()
                self.running = job
            try:
                self._run(job)
            finally:
                with self._cond:
                    self.running = None
                job.emit(END)

    def _run(self, job: Job) -> None:
        job.started = time.perf_counter()
        try:
            for index, generation in enumerate(job.generations):
                for event in self.engine.run(index, generation, job.stopping):
                    job.emit(event)
                    if isinstance(event, Finished):
                        self.on_finished(event)
                        if event.finish_reason == "cancelled":
                            return
        except ApiError as exc:
            job.emit(Failed(exc))
        except DsmoeError as exc:
            job.emit(Failed(ApiError(400, str(exc))))
        except Exception as exc:  # a bug: logged with its traceback, the client gets one line
            log.exception("request failed")
            job.emit(Failed(ApiError(500, f"internal error ({type(exc).__name__})", kind="server_error")))
