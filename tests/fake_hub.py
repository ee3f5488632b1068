"""A loopback stand-in for the Hugging Face Hub: the routes huggingface_hub uses to list, resolve and download files.

    GET  /api/models/{repo}[/revision/{rev}]     -> {"id", "sha", "siblings"}
    HEAD /{repo}/resolve/{rev}/{file}            -> X-Repo-Commit, ETag, Content-Length
    GET  /{repo}/resolve/{rev}/{file}            -> the bytes; `Range: bytes=a-b` / `bytes=a-` -> 206 + Content-Range
Errors carry `X-Error-Code` (RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo) as the real Hub's do.
Every request is logged with the number of body bytes sent, except huggingface_hub's own agent-harness lookup.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


@dataclass
class FakeRepo:
    commits: dict[str, dict[str, bytes]]  # commit sha -> file name -> content
    refs: dict[str, str]  # branch or tag -> commit sha
    gated: bool = False  # listing works, downloads need an accepted token (401 without one, 403 with one)
    private: bool = False  # everything answers 401 without a token


@dataclass(frozen=True)
class Request:
    method: str
    repo: str
    revision: str | None
    file: str | None  # None for API calls
    range: str | None
    status: int
    sent: int  # body bytes sent


@dataclass
class FakeHub:
    repos: dict[str, FakeRepo] = field(default_factory=dict)
    log: list[Request] = field(default_factory=list)
    #: file name -> how many more downloads of it to cut off mid-body (a resumed download gets no bytes at all)
    broken: dict[str, int] = field(default_factory=dict)
    #: called as on_download(repo, file) when a download (not a header range read) of a file starts
    on_download: Callable[[str, str], None] | None = None

    def __post_init__(self) -> None:
        hub = self

        class Handler(_Handler):
            fake = hub

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def add_repo(self, repo_id: str, commits: dict[str, dict[str, bytes]], refs: dict[str, str], **flags) -> None:
        self.repos[repo_id] = FakeRepo(commits, refs, **flags)

    def downloads(self, file: str | None = None) -> list[Request]:
        """GETs of files that were not header range reads (`bytes=a-b`)."""
        return [
            r for r in self.log
            if r.method == "GET" and r.file is not None and file in (None, r.file) and not _closed_range(r.range)
        ]


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def etag(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _closed_range(value: str | None) -> bool:
    return value is not None and re.fullmatch(r"bytes=\d+-\d+", value) is not None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in separate writes: no 40 ms delayed-ACK stalls
    fake: FakeHub

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        parts = [unquote(p) for p in urlsplit(self.path).path.strip("/").split("/")]
        if parts == ["api", "agent-harnesses"]:  # huggingface_hub's own user-agent lookup, not a repo request
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif parts[:2] == ["api", "models"] and len(parts) in (4, 6) and (len(parts) == 4 or parts[4] == "revision"):
            self._api("/".join(parts[2:4]), parts[5] if len(parts) == 6 else None)
        elif len(parts) >= 5 and parts[2] == "resolve":
            self._resolve("/".join(parts[:2]), parts[3], "/".join(parts[4:]))
        else:
            self._send(404, {}, b"", self.path, None, None)

    do_HEAD = do_GET

    @property
    def _authorised(self) -> bool:
        return self.headers.get("Authorization") is not None

    def _repo(self, repo_id: str, revision: str | None, file: str | None) -> tuple[FakeRepo, str] | None:
        """The repo and commit, or None after answering with the error the Hub would give."""
        repo = self.fake.repos.get(repo_id)
        if repo is None or (repo.private and not self._authorised):
            self._send(401 if repo else 404, {"X-Error-Code": "RepoNotFound"}, b"", repo_id, revision, file)
            return None
        commit = repo.refs.get(revision or "main", revision if revision in repo.commits else None)
        if commit is None:
            self._send(404, {"X-Error-Code": "RevisionNotFound"}, b"", repo_id, revision, file)
            return None
        return repo, commit

    def _api(self, repo_id: str, revision: str | None) -> None:
        found = self._repo(repo_id, revision, None)
        if found:
            repo, commit = found
            siblings = [{"rfilename": name} for name in sorted(repo.commits[commit])]
            info = {"id": repo_id, "modelId": repo_id, "sha": commit, "private": repo.private, "siblings": siblings}
            self._send(200, {"Content-Type": "application/json"}, json.dumps(info).encode(), repo_id, revision, None)

    def _resolve(self, repo_id: str, revision: str, file: str) -> None:
        found = self._repo(repo_id, revision, file)
        if not found:
            return
        repo, commit = found
        if repo.gated:
            self._send(403 if self._authorised else 401, {"X-Error-Code": "GatedRepo"}, b"", repo_id, revision, file)
            return
        data = repo.commits[commit].get(file)
        headers = {"X-Repo-Commit": commit}
        if data is None:
            self._send(404, {**headers, "X-Error-Code": "EntryNotFound"}, b"", repo_id, revision, file)
            return
        headers |= {"ETag": f'"{etag(data)}"', "Accept-Ranges": "bytes"}
        requested = self.headers.get("Range")
        start, end = 0, len(data)
        status = 200
        if requested:
            match = re.fullmatch(r"bytes=(\d+)-(\d*)", requested)
            start = int(match[1])
            end = min(int(match[2]) + 1, len(data)) if match[2] else len(data)
            if start >= len(data):
                self._send(416, {**headers, "Content-Range": f"bytes */{len(data)}"}, b"", repo_id, revision, file)
                return
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
        if self.command == "GET" and not _closed_range(requested):
            if self.fake.on_download:
                self.fake.on_download(repo_id, file)
            if self.fake.broken.get(file, 0) > 0:
                self.fake.broken[file] -= 1
                cut = (end - start) // 2 if not requested else 0
                self._send(status, headers, data[start:end], repo_id, revision, file, requested, cut=cut)
                return
        self._send(status, headers, data[start:end], repo_id, revision, file, requested)

    def _send(self, status: int, headers: dict[str, str], data: bytes, repo: str, revision: str | None,
              file: str | None, requested: str | None = None, cut: int | None = None) -> None:
        """Answer with `data` (headers only for HEAD); with `cut`, send only `cut` bytes, then drop the connection."""
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        sent = b"" if self.command == "HEAD" else data if cut is None else data[:cut]
        self.wfile.write(sent)
        self.wfile.flush()
        if cut is not None:
            self.close_connection = True
        self.fake.log.append(Request(self.command, repo, revision, file, requested, status, len(sent)))
