"""A local stand-in for the Hugging Face Hub, on 127.0.0.1, serving folders in the hub's URL layout.

It answers what huggingface_hub's ``snapshot_download`` asks (read from huggingface_hub's source):
``GET /api/models/{repo}/revision/{rev}`` (the commit sha), ``GET /api/models/{repo}/tree/{sha}``
(the file list), and ``HEAD``/``GET /{repo}/resolve/{sha}/{file}`` with ``X-Repo-Commit``, ``ETag``
and ``Content-Length``, byte ranges for resumed downloads. ``cut`` names files whose downloads
from the first byte are cut off halfway, as a dropped connection would; a resumed one completes.
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


class FakeHub:
    def __init__(self, repos: dict[str, Path]) -> None:
        self.repos = repos
        self.commits = {repo: hashlib.sha1(repo.encode()).hexdigest() for repo in repos}
        self.requests: list[tuple[str, str, str | None]] = []  # method, path, Range header
        self.cut: set[str] = set()  # files whose downloads from the first byte drop halfway
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:
                hub._serve(self, body=False)

            def do_GET(self) -> None:
                hub._serve(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)

    def _json(self, handler: BaseHTTPRequestHandler, data: object, status: int = 200) -> None:
        payload = json.dumps(data).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        if handler.command == "GET":
            handler.wfile.write(payload)

    def _files(self, repo: str) -> list[Path]:
        root = self.repos[repo]
        return sorted(p for p in root.rglob("*") if p.is_file())

    def _serve(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlparse(handler.path).path)
        self.requests.append((handler.command, path, handler.headers.get("Range")))
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("revision", "tree"):
            repo = "/".join(parts[2:4])
            if repo not in self.repos:
                return self._json(handler, {"error": "Repository not found"}, 404)
            sha = self.commits[repo]
            if parts[4] == "revision":
                siblings = [{"rfilename": str(p.relative_to(self.repos[repo]))} for p in self._files(repo)]
                return self._json(handler, {"id": repo, "modelId": repo, "sha": sha, "private": False,
                                            "siblings": siblings})
            tree = [{"type": "file", "path": str(p.relative_to(self.repos[repo])), "size": p.stat().st_size,
                     "oid": hashlib.sha1(p.read_bytes()).hexdigest()} for p in self._files(repo)]
            return self._json(handler, tree)
        if len(parts) >= 5 and parts[2] == "resolve":
            repo, filename = "/".join(parts[:2]), "/".join(parts[4:])
            file = self.repos.get(repo, Path("/nonexistent")) / filename
            if repo not in self.repos or not file.is_file():
                handler.send_response(404)
                handler.send_header("X-Error-Code", "EntryNotFound")
                handler.send_header("Content-Length", "0")
                handler.end_headers()
                return None
            data = file.read_bytes()
            start = 0
            ranged = handler.headers.get("Range")
            if ranged and ranged.startswith("bytes="):
                start = int(ranged[len("bytes="):].split("-")[0])
            handler.send_response(206 if start else 200)
            handler.send_header("X-Repo-Commit", self.commits[repo])
            handler.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
            handler.send_header("Content-Length", str(len(data) - start))
            if start:
                handler.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            handler.send_header("Accept-Ranges", "bytes")
            handler.end_headers()
            if body:
                if filename in self.cut and not start:
                    handler.wfile.write(data[: len(data) // 2])
                    handler.wfile.flush()
                    handler.close_connection = True
                    return None
                handler.wfile.write(data[start:])
            return None
        handler.send_response(404)
        handler.send_header("Content-Length", "0")
        handler.end_headers()
        return None
