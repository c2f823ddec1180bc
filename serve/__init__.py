"""``dsmoe serve``: an OpenAI-compatible HTTP server over one loaded model."""

from dsmoe.serve.app import ServerOptions, create_app
from dsmoe.serve.engine import Engine
from dsmoe.serve.metrics import Metrics
from dsmoe.serve.server import Server, check_exposure
from dsmoe.serve.worker import Worker

__all__ = ["Engine", "Metrics", "Server", "ServerOptions", "Worker", "check_exposure", "create_app"]
