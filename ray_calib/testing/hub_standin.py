"""A local TEST STAND-IN for the Hugging Face Hub: the subset of its HTTP API that push/pull use.

This is not the Hub and not a mirror of it. It exists because the Hub cannot be reached from the build
machine, so the real `huggingface_hub` client calls of `ray-calib push/pull` are exercised against it:

    GET  /api/whoami-v2                                  token check
    POST /api/repos/create, /api/validate-yaml           create_repo, README metadata check
    GET  /api/{type}s/{id}[/revision/{rev}]              repo_info (snapshot_download)
    GET  /api/{type}s/{id}/tree/{rev}[/{path}]           list_repo_tree
    POST /api/{type}s/{id}/preupload/{rev}               upload modes: "lfs" for binary or > 64 KiB files
    POST /{id}.git/info/lfs/objects/batch, PUT /lfs/{oid} LFS basic transfer
    POST /api/{type}s/{id}/commit/{rev}                  NDJSON commit (file, lfsFile, deletedFile)
    HEAD/GET /[{type}s/]{id}/resolve/{rev}/{path}        file download (Range supported)

One branch (`main`), no history. It does not speak the Xet protocol: its clients, `ray-calib push`
included, run with `HF_HUB_DISABLE_XET=1` (`CLIENT_ENV`; its Xet token route answers 501 saying so). Start it with
`python -m ray_calib.testing.hub_standin --port P --root DIR [--token T]`, or `StandinHub(root).start()` in tests.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

from ray_calib import atomic

DEFAULT_TOKEN = "hf_standin_token"
DEFAULT_USER = "standin"
CLIENT_ENV = {"HF_HUB_DISABLE_XET": "1"}  # what a huggingface_hub client needs here: plain LFS, no Xet
_LFS_THRESHOLD = 64 * 1024
_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_API_REPO = re.compile(
    r"^/api/(models|datasets|spaces)/([^/]+/[^/]+)(?:/(revision|tree|preupload|commit|xet-write-token)(?:/([^/]+))?(/.*)?)?$"
)
_RESOLVE = re.compile(r"^/(?:(datasets|spaces)/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")
_LFS_BATCH = re.compile(r"^/(?:(datasets|spaces)/)?([^/]+/[^/]+?)\.git/info/lfs/objects/batch$")


@dataclass
class StandinHub:
    root: Path
    tokens: dict[str, str] = field(default_factory=dict)  # token -> user name; empty: the default token
    host: str = "127.0.0.1"
    port: int = 0

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.tokens = self.tokens or {DEFAULT_TOKEN: DEFAULT_USER}
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> StandinHub:
        """Serve in a daemon thread (tests); `port=0` picks a free port."""
        self._server = ThreadingHTTPServer((self.host, self.port), _handler(self))
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server:
            self._server.shutdown()
            self._server.server_close()

    # ---- storage: repos/<type>/<id>/repo.json + content-addressed objects/<sha256> ----

    def repo_file(self, repo_type: str, repo_id: str) -> Path:
        return self.root / "repos" / repo_type / repo_id / "repo.json"

    def load(self, repo_type: str, repo_id: str) -> dict[str, Any] | None:
        path = self.repo_file(repo_type, repo_id)
        return json.loads(path.read_text()) if path.exists() else None

    def save(self, repo_type: str, repo_id: str, repo: dict[str, Any]) -> None:
        atomic.write_json(self.repo_file(repo_type, repo_id), repo)

    def object_path(self, sha256: str) -> Path:
        return self.root / "objects" / sha256

    def store(self, data: bytes) -> str:
        sha256 = hashlib.sha256(data).hexdigest()
        if not self.object_path(sha256).exists():
            atomic.write_bytes(self.object_path(sha256), data)
        return sha256


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _handler(hub: StandinHub) -> type[BaseHTTPRequestHandler]:
    class Handler(_Handler):
        pass

    Handler.hub = hub
    return Handler


class _Handler(BaseHTTPRequestHandler):
    hub: StandinHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet: tests and the demo read stdout
        pass

    # ---- plumbing ----

    def _user(self) -> str | None:
        auth = self.headers.get("authorization", "")
        return self.hub.tokens.get(auth[7:]) if auth.lower().startswith("bearer ") else None

    def _body(self) -> bytes:
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            chunks = []
            while (size := int(self.rfile.readline().split(b";")[0], 16)) > 0:
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            self.rfile.readline()
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("content-length") or 0))

    def _send(
        self, status: int, body: Any = None, headers: dict[str, str] | None = None, *, raw: bytes | None = None
    ) -> None:
        data = raw if raw is not None else json.dumps(body if body is not None else {}).encode()
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if raw is None:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _error(self, status: int, message: str, code: str | None = None) -> None:
        self._send(status, {"error": message}, {"X-Error-Message": message, **({"X-Error-Code": code} if code else {})})

    def _repo(self, repo_type: str, repo_id: str, *, write: bool = False) -> dict[str, Any] | None:
        """The repo if this caller may see (or with `write`, change) it; otherwise answers the error."""
        repo, user = self.hub.load(repo_type, repo_id), self._user()
        if write and user is None:
            self._error(401, "Invalid credentials in Authorization header")
            return None
        if repo is None or (repo["private"] and user != repo["owner"]):
            self._error(404, f"Repository Not Found for {repo_type}s/{repo_id}", "RepoNotFound")
            return None
        if write and user != repo["owner"]:
            self._error(403, f"You don't have the rights to write to {repo_id}")
            return None
        return repo

    # ---- routes ----

    def do_GET(self) -> None:
        self._route()

    def do_HEAD(self) -> None:
        self._route()

    def do_POST(self) -> None:
        self._route()

    def do_PUT(self) -> None:
        self._route()

    def _route(self) -> None:
        url = urlparse(self.path)
        path, query = unquote(url.path), parse_qs(url.query)
        if path == "/api/whoami-v2":
            return self._whoami()
        if path == "/api/repos/create" and self.command == "POST":
            return self._create(json.loads(self._body() or b"{}"))
        if path == "/api/validate-yaml":
            self._body()
            return self._send(200, {"errors": [], "warnings": []})
        if path.startswith("/lfs/") and self.command == "PUT":
            return self._lfs_put(path[len("/lfs/") :])
        if m := _API_REPO.match(path):
            return self._api_repo(_TYPES[m[1]], m[2], m[3], m[4] or "main", (m[5] or "").strip("/"), query)
        if m := _LFS_BATCH.match(path):
            return self._lfs_batch(_TYPES[m[1] or "models"], m[2])
        if m := _RESOLVE.match(path):
            return self._resolve(_TYPES[m[1] or "models"], m[2], m[4])
        self._error(404, f"no route for {self.command} {path} in the ray-calib Hub stand-in")

    def _whoami(self) -> None:
        user = self._user()
        if user is None:
            return self._error(401, "Invalid credentials in Authorization header")
        self._send(
            200,
            {
                "type": "user",
                "name": user,
                "fullname": user,
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "standin", "role": "write"}},
            },
        )

    def _create(self, payload: dict[str, Any]) -> None:
        user = self._user()
        if user is None:
            return self._error(401, "Invalid credentials in Authorization header")
        namespace = payload.get("organization") or user
        if namespace != user:
            return self._error(403, f"You don't have the rights to create a repo under the namespace '{namespace}'")
        repo_type, repo_id = payload.get("type") or "model", f"{namespace}/{payload['name']}"
        url = f"{self.hub.url}/{'' if repo_type == 'model' else repo_type + 's/'}{repo_id}"
        with self.hub.lock:
            if self.hub.load(repo_type, repo_id):
                return self._send(409, {"error": "You already created this repo", "url": url})
            private = payload.get("visibility", "private" if payload.get("private") else "public") != "public"
            self.hub.save(repo_type, repo_id, {"owner": user, "private": private, "sha": "0" * 40, "files": {}})
        self._send(200, {"url": url, "name": repo_id, "id": repo_id})

    def _api_repo(self, repo_type: str, repo_id: str, action: str | None, rev: str, sub: str, query: dict) -> None:
        if action == "xet-write-token":
            return self._error(
                501, "the ray-calib Hub stand-in does not implement Xet storage: set HF_HUB_DISABLE_XET=1"
            )
        write = action in ("preupload", "commit")
        repo = self._repo(repo_type, repo_id, write=write)
        if repo is None:
            return
        if rev not in ("main", repo["sha"]):
            return self._error(404, f"Revision Not Found: {rev}", "RevisionNotFound")
        if action == "preupload":
            return self._preupload(repo, json.loads(self._body()))
        if action == "commit":
            return self._commit(repo_type, repo_id, self._body())
        if action == "tree":
            return self._tree(repo, sub, "recursive" in query and query["recursive"][0].lower() == "true")
        siblings = [{"rfilename": p} for p in sorted(repo["files"])]
        self._send(
            200,
            {
                "id": repo_id,
                "modelId": repo_id,
                "sha": repo["sha"],
                "private": repo["private"],
                "author": repo["owner"],
                "siblings": siblings,
                "tags": [],
                "downloads": 0,
                "likes": 0,
            },
        )

    def _preupload(self, repo: dict[str, Any], payload: dict[str, Any]) -> None:
        files = []
        for entry in payload.get("files", []):
            sample = base64.b64decode(entry.get("sample", ""))
            lfs = entry.get("size", 0) > _LFS_THRESHOLD or b"\0" in sample
            known = repo["files"].get(entry["path"])
            oid = (known["lfs"] if lfs else known["blob"]) if known else None
            files.append(
                {"path": entry["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid}
            )
        self._send(200, {"files": files, "commitOid": repo["sha"]})

    def _lfs_batch(self, repo_type: str, repo_id: str) -> None:
        payload = json.loads(self._body())
        if self._repo(repo_type, repo_id, write=True) is None:
            return
        objects = []
        for obj in payload.get("objects", []):
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if not self.hub.object_path(obj["oid"]).exists():
                entry["actions"] = {"upload": {"href": f"{self.hub.url}/lfs/{obj['oid']}", "expires_in": 3600}}
            objects.append(entry)
        self._send(200, {"transfer": "basic", "objects": objects})

    def _lfs_put(self, oid: str) -> None:
        data = self._body()
        if hashlib.sha256(data).hexdigest() != oid:
            return self._error(400, f"content does not match oid {oid}")
        self.hub.store(data)
        self._send(200, {})

    def _commit(self, repo_type: str, repo_id: str, body: bytes) -> None:
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        with self.hub.lock:
            repo = self.hub.load(repo_type, repo_id)
            assert repo is not None, "_api_repo found it"
            for item in lines:
                key, value = item["key"], item["value"]
                if key == "file":
                    data = base64.b64decode(value["content"])
                    repo["files"][value["path"]] = {
                        "size": len(data),
                        "blob": _git_blob_sha1(data),
                        "sha256": self.hub.store(data),
                        "lfs": None,
                    }
                elif key == "lfsFile":
                    if not self.hub.object_path(value["oid"]).exists():
                        return self._error(400, f"LFS object {value['oid']} of {value['path']} was never uploaded")
                    data = self.hub.object_path(value["oid"]).read_bytes()
                    repo["files"][value["path"]] = {
                        "size": len(data),
                        "blob": _git_blob_sha1(data),
                        "sha256": value["oid"],
                        "lfs": value["oid"],
                    }
                elif key == "deletedFile":
                    repo["files"].pop(value["path"], None)
                elif key == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    repo["files"] = {p: f for p, f in repo["files"].items() if not p.startswith(prefix)}
            repo["sha"] = hashlib.sha1((repo["sha"] + body.decode(errors="replace")).encode()).hexdigest()
            self.hub.save(repo_type, repo_id, repo)
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        self._send(
            200,
            {
                "commitUrl": f"{self.hub.url}/{prefix}{repo_id}/commit/{repo['sha']}",
                "commitOid": repo["sha"],
                "pullRequestUrl": None,
            },
        )

    def _tree(self, repo: dict[str, Any], sub: str, recursive: bool) -> None:
        prefix = f"{sub}/" if sub else ""
        entries, dirs = [], set()
        for path, info in sorted(repo["files"].items()):
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix) :]
            if "/" in rest and not recursive:
                dirs.add(prefix + rest.split("/")[0])
                continue
            parts = path.split("/")
            dirs.update("/".join(parts[:i]) for i in range(len(prefix.split("/")), len(parts)) if recursive)
            entry = {"type": "file", "oid": info["blob"], "size": info["size"], "path": path}
            if info["lfs"]:
                entry["lfs"] = {"oid": info["lfs"], "size": info["size"], "pointerSize": 134}
            entries.append(entry)
        dirs.discard("")
        dirs.discard(sub)
        listing = [{"type": "directory", "oid": "0" * 40, "size": 0, "path": d} for d in sorted(dirs)] + entries
        self._send(200, listing)

    def _resolve(self, repo_type: str, repo_id: str, file_path: str) -> None:
        repo = self._repo(repo_type, repo_id)
        if repo is None:
            return
        info = repo["files"].get(file_path)
        if info is None:
            return self._error(404, f"Entry Not Found: {file_path}", "EntryNotFound")
        data = self.hub.object_path(info["sha256"]).read_bytes()
        headers = {"X-Repo-Commit": repo["sha"], "ETag": f'"{info["lfs"] or info["blob"]}"', "Accept-Ranges": "bytes"}
        if info["lfs"]:
            headers.update({"X-Linked-Etag": f'"{info["lfs"]}"', "X-Linked-Size": str(info["size"])})
        start = _range_start(self.headers.get("range"))
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            return self._send(206, headers=headers, raw=data[start:])
        self._send(200, headers=headers, raw=data)


def _range_start(header: str | None) -> int:
    m = re.match(r"bytes=(\d+)-$", header or "")
    return int(m[1]) if m else 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m ray_calib.testing.hub_standin", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--root", type=Path, required=True, help="Where repos and objects are stored.")
    parser.add_argument("--token", action="append", help=f"Accepted token (repeatable) [default: {DEFAULT_TOKEN}].")
    parser.add_argument("--user", default=DEFAULT_USER, help="User name the tokens belong to.")
    args = parser.parse_args(argv)
    hub = StandinHub(args.root, {t: args.user for t in args.token or [DEFAULT_TOKEN]}, host=args.host, port=args.port)
    hub.start()
    print(
        f"ray-calib Hub TEST STAND-IN (not the Hugging Face Hub) serving {args.root} at {hub.url}\n"
        f"use it with: export HF_ENDPOINT={hub.url} HF_TOKEN=<one of the --token values>",
        flush=True,
    )
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        hub.stop()


if __name__ == "__main__":
    main()
