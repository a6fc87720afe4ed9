"""A local model hub: the few endpoints of the Hugging Face hub that `snapshot_download` uses,
serving directories of this machine, so that downloads are tested without the internet.

    with LocalHub({"lorasweep/tiny": Path("model")}) as hub:
        os.environ["HF_ENDPOINT"] = hub.url   # then snapshot_download("lorasweep/tiny")

Endpoints (huggingface_hub 2.4): `GET /api/models/<id>[/revision/<rev>]` (the commit and the
file list), `GET /api/models/<id>/tree/<rev>` (every file with its size and git blob id, one
page), `HEAD` and `GET /<id>/resolve/<rev>/<file>` (a file's commit, etag and size, then its
bytes). An unknown repository is a 401 with `X-Error-Code: RepoNotFound`, as on the hub
(which does not tell a missing repository from a private one). `downloads` counts the GETs of
each file.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from urllib.parse import unquote


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _blob_id(content: bytes) -> str:
    """The git blob id of a file's content: the hub's tree `oid` and a plain file's etag."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def _commit(root: Path) -> str:
    """A stable 40-hex commit for a directory's content (the hub's commit sha)."""
    digest = hashlib.sha1()
    for name in _files(root):
        digest.update(name.encode() + b"\0" + (root / name).read_bytes())
    return digest.hexdigest()


class LocalHub:
    def __init__(self, repos: dict[str, Path], host: str = "127.0.0.1") -> None:
        self.repos = repos
        self.downloads: Counter[tuple[str, str]] = Counter()  # (repo, file) -> GETs
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                hub._serve(self, body=True)

            def do_HEAD(self) -> None:
                hub._serve(self, body=False)

        self.server = ThreadingHTTPServer((host, 0), Handler)
        self.url = f"http://{host}:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> LocalHub:
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _repo(self, path: str) -> tuple[str, Path, str] | None:
        """(repo id, directory, rest of the path) for a path that starts with a known id."""
        for repo, root in self.repos.items():
            if path == repo or path.startswith(repo + "/"):
                return repo, root, path[len(repo) :].lstrip("/")
        return None

    def _serve(self, request: BaseHTTPRequestHandler, *, body: bool) -> None:
        path = unquote(request.path.split("?")[0]).lstrip("/")
        if path.startswith("api/models/"):
            found = self._repo(path.removeprefix("api/models/"))
            if found is None:
                return self._not_found(request, body)
            repo, root, rest = found
            if rest.startswith("tree/"):
                tree = [
                    {
                        "type": "file",
                        "path": name,
                        "size": (root / name).stat().st_size,
                        "oid": _blob_id((root / name).read_bytes()),
                    }
                    for name in _files(root)
                ]
                return self._send(request, 200, json.dumps(tree).encode(), {}, body)
            info = {
                "id": repo,
                "modelId": repo,
                "sha": _commit(root),
                "private": False,
                "siblings": [{"rfilename": name} for name in _files(root)],
            }
            return self._send(request, 200, json.dumps(info).encode(), {}, body)
        found = self._repo(path)
        parts = found[2].split("/", 2) if found else []
        if found is None or len(parts) != 3 or parts[0] != "resolve":
            return self._not_found(request, body)
        repo, root, _ = found
        file = root / parts[2]
        if parts[2] not in _files(root):
            return self._send(request, 404, b"", {"X-Error-Code": "EntryNotFound"}, body)
        content = file.read_bytes()
        headers = {
            "X-Repo-Commit": _commit(root),
            "ETag": f'"{_blob_id(content)}"',
        }
        if body:
            self.downloads[(repo, parts[2])] += 1
        return self._send(request, 200, content, headers, body)

    @staticmethod
    def _not_found(request: BaseHTTPRequestHandler, body: bool) -> None:
        message = json.dumps({"error": "Repository not found"}).encode()
        LocalHub._send(request, 401, message, {"X-Error-Code": "RepoNotFound"}, body)

    @staticmethod
    def _send(
        request: BaseHTTPRequestHandler,
        status: int,
        content: bytes,
        headers: dict[str, str],
        body: bool,
    ) -> None:
        request.send_response(status)
        for key, value in headers.items():
            request.send_header(key, value)
        request.send_header("Content-Length", str(len(content)))
        request.end_headers()
        if body:
            request.wfile.write(content)
