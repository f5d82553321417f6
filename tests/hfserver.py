"""A tiny Hugging Face hub on 127.0.0.1: one model repo served from a local folder.

Enough of the hub's HTTP API for `huggingface_hub.snapshot_download` / `hf_hub_download`
(reached through `HF_ENDPOINT`, as a user reaches a mirror): revision info, the
recursive tree listing, and `resolve` (HEAD + GET) with the commit, ETag and size
headers. Every request is counted, so tests can assert what was downloaded and how often.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


class HubServer:
    def __init__(self, repo: str, folder: Path, commit: str, branch: str = "main") -> None:
        self.repo, self.folder, self.commit, self.branch = repo, folder, commit, branch
        self.files = sorted(
            p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()
        )
        self.downloads: Counter[str] = Counter()  # GET of a file's bytes
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:
                server._serve(self, body=False)

            def do_GET(self) -> None:
                server._serve(self, body=True)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self._httpd.shutdown()

    def _revision_ok(self, rev: str) -> bool:
        return rev in (self.commit, self.branch)

    def _serve(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlsplit(h.path).path)
        self.requests.append(f"{h.command} {path}")
        info = f"/api/models/{self.repo}/revision/"
        tree = f"/api/models/{self.repo}/tree/"
        resolve = f"/{self.repo}/resolve/"
        if path.startswith(info) and self._revision_ok(path[len(info) :]):
            siblings = [{"rfilename": f} for f in self.files]
            return self._json(h, {"id": self.repo, "sha": self.commit, "siblings": siblings})
        if path.startswith(tree):
            rev, _, sub = path[len(tree) :].partition("/")
            if self._revision_ok(rev):
                entries = [self._entry(f) for f in self.files if f.startswith(sub)]
                return self._json(h, entries)
        if path.startswith(resolve):
            rev, _, name = path[len(resolve) :].partition("/")
            if self._revision_ok(rev) and name in self.files:
                data = (self.folder / name).read_bytes()
                h.send_response(200)
                h.send_header("X-Repo-Commit", self.commit)
                h.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                h.send_header("Content-Length", str(len(data)))
                h.send_header("Content-Type", "application/octet-stream")
                h.end_headers()
                if body:
                    self.downloads[name] += 1
                    h.wfile.write(data)
                return None
        h.send_response(404)
        h.send_header(
            "X-Error-Code", "RevisionNotFound" if path.startswith(info) else "EntryNotFound"
        )
        h.send_header("Content-Length", "0")
        h.end_headers()
        return None

    def _entry(self, name: str) -> dict:
        data = (self.folder / name).read_bytes()
        return {
            "type": "file",
            "path": name,
            "size": len(data),
            "oid": hashlib.sha1(data).hexdigest(),
        }

    @staticmethod
    def _json(h: BaseHTTPRequestHandler, payload) -> None:
        data = json.dumps(payload).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if h.command == "GET":
            h.wfile.write(data)
