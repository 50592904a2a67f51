"""A stand-in Hugging Face Hub: the endpoints `huggingface_hub` uses to download a model repository,
served from a directory, so downloads (progress, resume, gated and missing repos) are tested with
the hub's own client and `HF_ENDPOINT` pointing here. Not the Hub: no uploads, no Xet, no search.

    python -m watchdog_llm.standin.hfhub ROOT [--port N] [--bytes-per-s N] [--token T]

ROOT/ORG/NAME/... is repo ORG/NAME at revision `main`; a file `ROOT/ORG/NAME/.gated` makes the repo
gated (401 without `--token`'s bearer token, as the Hub answers). What `huggingface_hub` 2.x sends
and expects, checked against its source (`hf_api.py`, `file_download.py`, `utils/_http.py`):

- GET  /api/models/ORG/NAME/revision/REV  -> {"id", "sha", "siblings": [{"rfilename"}], ...}
- GET  /api/models/ORG/NAME/tree/SHA?recursive=true -> [{"type": "file", "path", "size", "oid"}]
- HEAD /ORG/NAME/resolve/REV/PATH  -> 200, X-Repo-Commit, ETag (X-Linked-Etag), Content-Length
- GET  /ORG/NAME/resolve/REV/PATH  -> the bytes; `Range: bytes=N-` gives 206 (a resumed download)
- errors carry X-Error-Code (RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo) and a JSON
  {"error"}: the client maps them to its exceptions.

`--bytes-per-s` paces file bodies, so a download takes long enough to watch, cancel and interrupt.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

CHUNK = 64 * 1024


class Repo:
    def __init__(self, root: Path, repo_id: str) -> None:
        self.id = repo_id
        self.dir = root / repo_id
        self.gated = (self.dir / ".gated").exists()

    def files(self) -> list[Path]:
        return sorted(p for p in self.dir.rglob("*") if p.is_file() and not p.name.startswith("."))

    def rel(self, p: Path) -> str:
        return p.relative_to(self.dir).as_posix()

    @property
    def sha(self) -> str:
        h = hashlib.sha1()
        for p in self.files():
            h.update(self.rel(p).encode() + b"\0" + str(p.stat().st_size).encode() + b"\0")
        return h.hexdigest()

    @staticmethod
    def oid(p: Path) -> str:
        return hashlib.sha1(p.read_bytes()).hexdigest()


class Hub(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path, port: int, bytes_per_s: int, token: str) -> None:
        self.root = root
        self.bytes_per_s = bytes_per_s
        self.token = token
        self.requests: list[str] = []  # "METHOD path range", for tests
        self.mu = threading.Lock()
        super().__init__(("127.0.0.1", port), _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: Hub
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args: Any) -> None:
        pass

    def do_HEAD(self) -> None:
        self._route(head=True)

    def do_GET(self) -> None:
        self._route(head=False)

    def _route(self, *, head: bool) -> None:
        url = urllib.parse.urlsplit(self.path)
        path = urllib.parse.unquote(url.path)
        with self.server.mu:
            self.server.requests.append(f"{self.command} {path} {self.headers.get('Range', '')}".strip())
        parts = path.strip("/").split("/")
        if len(parts) >= 5 and parts[0] == "api" and parts[1] == "models" and parts[4] in ("revision", "tree"):
            repo = self._repo(f"{parts[2]}/{parts[3]}")
            if repo is None:
                return
            rev = parts[5] if len(parts) > 5 else "main"
            if rev not in ("main", repo.sha):
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            if parts[4] == "revision":
                return self._json(
                    {
                        "_id": repo.id,
                        "id": repo.id,
                        "modelId": repo.id,
                        "sha": repo.sha,
                        "private": False,
                        "gated": "manual" if repo.gated else False,
                        "siblings": [{"rfilename": repo.rel(p)} for p in repo.files()],
                        "tags": [],
                    }
                )
            return self._json(
                [
                    {"type": "file", "path": repo.rel(p), "size": p.stat().st_size, "oid": repo.oid(p)}
                    for p in repo.files()
                ]
            )
        if len(parts) >= 5 and parts[2] == "resolve":
            repo = self._repo(f"{parts[0]}/{parts[1]}")
            if repo is None:
                return
            rev, rel = parts[3], "/".join(parts[4:])
            if rev not in ("main", repo.sha):
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            f = repo.dir / rel
            if not f.is_file() or f.name.startswith(".") or ".." in rel.split("/"):
                return self._error(404, "EntryNotFound", f"{rel} does not exist on {rev}")
            return self._file(repo, f, head)
        self._error(404, "RepoNotFound", "Repository not found")

    def _repo(self, repo_id: str) -> Repo | None:
        repo = Repo(self.server.root, repo_id)
        if not repo.dir.is_dir() or ".." in repo_id:
            self._error(401, "RepoNotFound", "Repository Not Found for url: invalid username or password.")
            return None
        if repo.gated and self.headers.get("Authorization") != f"Bearer {self.server.token}":
            self._error(
                401,
                "GatedRepo",
                f"Access to model {repo_id} is restricted. You must have access to it and be authenticated "
                "to access it.",
            )
            return None
        return repo

    def _file(self, repo: Repo, f: Path, head: bool) -> None:
        size = f.stat().st_size
        start = 0
        rng = self.headers.get("Range", "")
        if rng.startswith("bytes=") and rng[6:].split("-")[0].isdigit():
            start = min(int(rng[6:].split("-")[0]), size)
        self.send_response(206 if start else 200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(size - start))
        self.send_header("ETag", f'"{repo.oid(f)}"')
        self.send_header("X-Repo-Commit", repo.sha)
        self.send_header("Accept-Ranges", "bytes")
        if start:
            self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        self.end_headers()
        if head:
            return
        pace = self.server.bytes_per_s
        with f.open("rb") as fh:
            fh.seek(start)
            while chunk := fh.read(CHUNK):
                try:
                    self.wfile.write(chunk)
                except OSError:
                    return  # the client went away: an interrupted download
                if pace:
                    time.sleep(len(chunk) / pace)

    def _json(self, doc: Any) -> None:
        body = json.dumps(doc).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, code: str, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="hfhub-standin", description=__doc__.split("\n\n")[0])
    p.add_argument("root", type=Path, help="ROOT/ORG/NAME/... is the repo ORG/NAME")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--bytes-per-s", type=int, default=0, help="pace file bodies (0: as fast as possible)")
    p.add_argument("--token", default=os.environ.get("STANDIN_HF_TOKEN", ""), help="the token gated repos want")
    a = p.parse_args(argv)
    hub = Hub(a.root, a.port, a.bytes_per_s, a.token)
    print(f"STAND-IN hub: http://127.0.0.1:{hub.server_address[1]} serving {a.root}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        hub.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
