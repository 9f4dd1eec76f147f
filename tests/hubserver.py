"""A small local stand-in for the Hugging Face Hub, for tests: file resolve, and enough upload API for HfApi.

Point ``HF_ENDPOINT`` at :attr:`HubServer.endpoint` and ``hf_hub_download`` and
``HfApi().create_repo / create_branch / upload_folder`` work against it. What it speaks (as
huggingface_hub 2.x reads it: ``file_download.get_hf_file_metadata``, ``utils._http.hf_raise_for_status``,
``_commit_api`` and ``lfs``):

- ``HEAD``/``GET /{owner}/{name}/resolve/{revision}/{filename}``; the revision is a branch name
  or a 40-hex commit id, percent-encoded by the client.
- Regular files: ``200`` with ``X-Repo-Commit``, ``ETag: "<git blob sha1>"`` and ``Content-Length``.
- LFS files (``*.safetensors``, ``*.bin``, ...): ``302`` to a second "CDN" server on another port with
  ``X-Repo-Commit``, ``X-Linked-Etag: "<sha256>"`` and ``X-Linked-Size``; the client does not follow
  redirects off the Hub origin and downloads from ``Location``.
- Errors: ``X-Error-Code: RepoNotFound`` (401 without a token, 404 with one, like the Hub),
  ``RevisionNotFound`` (404) and ``EntryNotFound`` (404, with ``X-Repo-Commit``).
- Anything under ``/not-a-hub/`` answers ``200`` without Hub headers (a misconfigured endpoint).
- Writes (a token is required, 401 otherwise): ``POST /api/repos/create`` (409 if it exists),
  ``/api/validate-yaml``, ``/api/models/{repo}/branch/{branch}``, ``/api/models/{repo}/preupload/{rev}``
  (LFS mode for LFS suffixes), ``/{repo}.git/info/lfs/objects/batch`` + an unauthenticated
  ``PUT /lfs-upload/{oid}`` on the "CDN" server (basic transfer, like a presigned S3 URL), and
  ``/api/models/{repo}/commit/{rev}`` (NDJSON ``header`` / ``file`` / ``lfsFile``). No Xet: uploads
  need ``HF_HUB_DISABLE_XET=1`` when ``hf_xet`` is installed.

Every request is recorded in :attr:`HubServer.requests` as ``(method, path)``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".onnx", ".npz")
GITATTRIBUTES = b"".join(b"*%s filter=lfs diff=lfs merge=lfs -text\n" % s.encode() for s in LFS_SUFFIXES)


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob, which the Hub sends as the ETag of regular files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubServer:
    """Serves repos from ``root`` (a temporary folder): ``root/{owner}/{name}/{commit}/{file}``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.refs: dict[str, dict[str, str]] = {}
        self.requests: list[tuple[str, str]] = []
        self._commits = 0
        self._lock = threading.RLock()
        self._hub = ThreadingHTTPServer(("127.0.0.1", 0), self._handler(cdn=False))
        self._cdn = ThreadingHTTPServer(("127.0.0.1", 0), self._handler(cdn=True))
        self._hub.daemon_threads = self._cdn.daemon_threads = True
        self._threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in (self._hub, self._cdn)]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._hub.server_address[1]}"

    @property
    def cdn(self) -> str:
        return f"http://127.0.0.1:{self._cdn.server_address[1]}"

    def start(self) -> HubServer:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        for s in (self._hub, self._cdn):
            s.shutdown()
            s.server_close()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def publish(self, repo_id: str, folder: str | Path, branch: str = "main") -> str:
        """Commit exactly the files of ``folder`` to ``repo_id`` on ``branch``; returns the commit id."""
        files = {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()}
        return self.commit(repo_id, branch, files, keep=False)

    def commit(self, repo_id: str, branch: str, files: dict[str, bytes], keep: bool = True) -> str:
        """Add ``files`` on top of ``branch`` (or replace its tree when ``keep`` is false); returns the commit id."""
        with self._lock:
            parent = self.refs.get(repo_id, {}).get(branch)
            tree = self.files(repo_id, parent) if keep and parent else {}
            tree |= files
            self._commits += 1
            digest = hashlib.sha1(f"{repo_id}\0{self._commits}".encode())
            for name in sorted(tree):
                digest.update(name.encode() + hashlib.sha256(tree[name]).digest())
            commit = digest.hexdigest()
            dest = self.root / repo_id / commit
            for name, data in tree.items():
                (dest / name).parent.mkdir(parents=True, exist_ok=True)
                (dest / name).write_bytes(data)
            dest.mkdir(parents=True, exist_ok=True)
            self.refs.setdefault(repo_id, {})[branch] = commit
        return commit

    def files(self, repo_id: str, revision: str) -> dict[str, bytes]:
        """The tree of ``repo_id`` at ``revision`` (branch or commit) as ``{path: content}``."""
        folder = self.root / repo_id / (self._resolve(repo_id, revision) or "missing")
        return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}

    def clear_log(self) -> None:
        with self._lock:
            self.requests.clear()

    def _resolve(self, repo_id: str, revision: str) -> str | None:
        refs = self.refs.get(repo_id, {})
        if revision in refs:
            return refs[revision]
        if len(revision) == 40 and (self.root / repo_id / revision).is_dir():
            return revision
        return None

    def _blob(self, sha256: str) -> Path | None:
        for p in [*self.root.glob("*/*/*/*"), *self.root.glob(".lfs/*")]:
            if p.is_file() and hashlib.sha256(p.read_bytes()).hexdigest() == sha256:
                return p
        return None

    def _handler(self, cdn: bool) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:
                self._dispatch(body=False)

            def do_GET(self) -> None:
                self._dispatch(body=True)

            def do_POST(self) -> None:
                self._dispatch(body=True)

            def do_PUT(self) -> None:
                self._dispatch(body=True)

            def _dispatch(self, body: bool) -> None:
                path = urlsplit(self.path).path
                with server._lock:
                    server.requests.append((self.command, ("cdn:" if cdn else "") + unquote(path)))
                if cdn and self.command == "PUT" and path.startswith("/lfs-upload/"):
                    self._lfs_upload(path.rsplit("/", 1)[-1], self._read_body())
                elif cdn:
                    self._serve_cdn(path, body)
                elif path.startswith("/not-a-hub/"):
                    self._send(200, {"Content-Type": "text/html"}, b"<html>not a hub</html>", body)
                elif self.command in ("POST", "PUT"):
                    self._write(path)
                else:
                    self._serve_resolve(path, body)

            def _send(self, status: int, headers: dict[str, str], data: bytes, body: bool = True) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def _json(self, status: int, payload: object) -> None:
                self._send(status, {"Content-Type": "application/json"}, json.dumps(payload).encode())

            def _error(self, status: int, code: str | None, message: str, body: bool = True, **extra: str) -> None:
                headers = {"Content-Type": "application/json", **extra}
                if code is not None:
                    headers |= {"X-Error-Code": code, "X-Error-Message": message}
                self._send(status, headers, json.dumps({"error": message}).encode(), body)

            def _read_body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while size := int(self.rfile.readline().split(b";")[0].strip(), 16):
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                    self.rfile.readline()
                    return b"".join(chunks)
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _serve_cdn(self, path: str, body: bool) -> None:
                blob = server._blob(path.rsplit("/", 1)[-1]) if path.startswith("/lfs/") else None
                if blob is None:
                    self._error(404, None, "NoSuchKey", body)
                    return
                data = blob.read_bytes()
                headers = {"Content-Type": "application/octet-stream", "ETag": f'"{hashlib.md5(data).hexdigest()}"'}
                self._send(200, headers, data, body)

            def _serve_resolve(self, path: str, body: bool) -> None:
                parts = path.lstrip("/").split("/")
                if len(parts) < 5 or parts[2] != "resolve":
                    self._error(404, None, "Not Found", body)
                    return
                repo_id, revision, filename = f"{parts[0]}/{parts[1]}", unquote(parts[3]), unquote("/".join(parts[4:]))
                if repo_id not in server.refs:
                    status = 404 if self.headers.get("Authorization") else 401
                    self._error(status, "RepoNotFound", "Repository not found", body)
                    return
                commit = server._resolve(repo_id, revision)
                if commit is None:
                    self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", body)
                    return
                file = server.root / repo_id / commit / filename
                if ".." in filename.split("/") or not file.is_file():
                    self._error(404, "EntryNotFound", "Entry not found", body, **{"X-Repo-Commit": commit})
                    return
                data = file.read_bytes()
                headers = {"X-Repo-Commit": commit, "Accept-Ranges": "bytes", "ETag": f'"{git_blob_sha1(data)}"'}
                if filename.endswith(LFS_SUFFIXES):
                    sha256 = hashlib.sha256(data).hexdigest()
                    headers |= {
                        "Location": f"{server.cdn}/lfs/{sha256}",
                        "X-Linked-Etag": f'"{sha256}"',
                        "X-Linked-Size": str(len(data)),
                    }
                    self._send(302, headers, b"", body)
                    return
                self._send(200, headers | {"Content-Type": "application/octet-stream"}, data, body)

            def _write(self, path: str) -> None:
                data = self._read_body()
                if not self.headers.get("Authorization", "").startswith("Bearer "):
                    self._error(401, None, "Invalid username or password.")
                    return
                parts = path.lstrip("/").split("/")
                routes: list[tuple[bool, Callable[[], None]]] = [
                    (path == "/api/repos/create", lambda: self._create_repo(json.loads(data))),
                    (path == "/api/validate-yaml", lambda: self._json(200, {"errors": [], "warnings": []})),
                    (path.endswith(".git/info/lfs/objects/batch"), lambda: self._lfs_batch(json.loads(data))),
                ]
                if len(parts) == 6 and parts[:2] == ["api", "models"]:
                    repo_id, action, rev = f"{parts[2]}/{parts[3]}", parts[4], unquote(parts[5])
                    if repo_id not in server.refs:
                        self._error(404, "RepoNotFound", "Repository not found")
                        return
                    routes += [
                        (action == "branch", lambda: self._branch(repo_id, rev, json.loads(data or b"{}"))),
                        (action == "preupload", lambda: self._preupload(json.loads(data))),
                        (action == "commit", lambda: self._commit(repo_id, rev, data)),
                    ]
                for matches, handle in routes:
                    if matches:
                        handle()
                        return
                self._error(404, None, "Not Found")

            def _create_repo(self, payload: dict) -> None:
                repo_id = f"{payload.get('organization')}/{payload['name']}"
                with server._lock:
                    if repo_id in server.refs:
                        message = "You already created this model repo"
                        payload = {"error": message, "url": f"{server.endpoint}/{repo_id}"}
                        self._send(
                            409,
                            {"Content-Type": "application/json", "X-Error-Message": message},
                            json.dumps(payload).encode(),
                        )
                        return
                    server.commit(repo_id, "main", {".gitattributes": GITATTRIBUTES})
                self._json(200, {"url": f"{server.endpoint}/{repo_id}", "name": repo_id})

            def _branch(self, repo_id: str, branch: str, payload: dict) -> None:
                with server._lock:
                    if branch in server.refs[repo_id]:
                        self._error(409, None, "Reference already exists")
                        return
                    start = server._resolve(repo_id, payload.get("startingPoint") or "main")
                    if start is None:
                        self._error(404, "RevisionNotFound", "Invalid rev id")
                        return
                    server.refs[repo_id][branch] = start
                self._json(200, {})

            def _preupload(self, payload: dict) -> None:
                files = [
                    {
                        "path": f["path"],
                        "uploadMode": "lfs" if f["path"].endswith(LFS_SUFFIXES) else "regular",
                        "shouldIgnore": False,
                    }
                    for f in payload["files"]
                ]
                self._json(200, {"files": files, "commitOid": None})

            def _lfs_batch(self, payload: dict) -> None:
                objects = [
                    {
                        "oid": o["oid"],
                        "size": o["size"],
                        "actions": {"upload": {"href": f"{server.cdn}/lfs-upload/{o['oid']}"}},
                    }
                    for o in payload["objects"]
                ]
                self._json(200, {"transfer": "basic", "objects": objects})

            def _lfs_upload(self, oid: str, data: bytes) -> None:
                if hashlib.sha256(data).hexdigest() != oid:
                    self._error(400, None, "sha256 mismatch")
                    return
                (server.root / ".lfs").mkdir(parents=True, exist_ok=True)
                (server.root / ".lfs" / oid).write_bytes(data)
                self._send(200, {}, b"")

            def _commit(self, repo_id: str, branch: str, data: bytes) -> None:
                files: dict[str, bytes] = {}
                for line in data.splitlines():
                    item = json.loads(line)
                    value = item["value"]
                    if item["key"] == "file":
                        files[value["path"]] = base64.b64decode(value["content"])
                    elif item["key"] == "lfsFile":
                        blob = server.root / ".lfs" / value["oid"]
                        if not blob.is_file():
                            self._error(400, None, f"LFS object {value['oid']} was not uploaded")
                            return
                        files[value["path"]] = blob.read_bytes()
                    elif item["key"] != "header":
                        self._error(400, None, f"unsupported commit operation {item['key']}")
                        return
                if branch not in server.refs[repo_id]:
                    self._error(404, "RevisionNotFound", f"Invalid rev id: {branch}")
                    return
                commit = server.commit(repo_id, branch, files)
                self._json(200, {"commitOid": commit, "commitUrl": f"{server.endpoint}/{repo_id}/commit/{commit}"})

        return Handler
