"""A local stand-in for the Hugging Face Hub, for tests: a real HTTP server on 127.0.0.1 in a thread.

It answers the endpoints ``huggingface_hub``'s own client calls (read from its source, version in
constraints.txt) for what ``studio.app.hub`` does, with the Hub's status codes and error headers:

    POST /api/repos/create                           create_repo (409 + url when it exists)
    POST /api/validate-yaml                          create_commit's README.md front matter check
    GET  /api/models/{repo}[/revision/{rev}]         model_info / repo_info (?blobs=true: sizes, LFS oids)
    GET  /api/models/{repo}/refs                     list_repo_refs
    POST /api/models/{repo}/preupload/{rev}          upload modes (lfs for .safetensors and images)
    POST /{repo}.git/info/lfs/objects/batch          LFS batch API (basic transfer)
    PUT  /lfs-upload/{oid}                           the LFS object itself (S3's role; sha256 checked)
    POST /lfs-verify                                 LFS verify
    POST /api/models/{repo}/commit/{rev}             the ndjson commit (file, lfsFile, deletedFile)
    POST /api/models/{repo}/tag/{rev}                create_tag (409 when the tag exists)
    HEAD/GET /{repo}/resolve/{rev}/{path}            hf_hub_download (X-Repo-Commit, ETag, X-Linked-*)

Writes need ``Authorization: Bearer <token>`` with a token of the repo's owner (401 unknown token,
403 someone else's namespace); private repos read like missing ones without it. :meth:`FakeHub.fail`
makes chosen requests answer an error status and :meth:`FakeHub.drop` closes the connection in the
middle of a request body; :meth:`FakeHub.put_files` commits files straight onto a branch (a repo holding
files the studio did not publish). Every request is recorded (Authorization header removed) so tests can check
what was sent. State lives in memory; nothing touches the network beyond 127.0.0.1.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

_REPO_PART = r"[A-Za-z0-9][A-Za-z0-9_.-]*"
_LFS_SUFFIXES = (".safetensors", ".bin", ".png", ".jpg", ".jpeg", ".webp")
LICENSES = {"apache-2.0", "mit", "openrail", "openrail++", "creativeml-openrail-m", "cc-by-4.0", "cc-by-sa-4.0",
            "cc-by-nc-4.0", "cc0-1.0", "bigscience-openrail-m", "other", "unknown"}


def _now() -> str:
    """The Hub's date format: ISO 8601 with milliseconds and 'Z' (what huggingface_hub parses)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def git_blob_oid(data: bytes) -> str:
    """git's object id of a blob (what the Hub reports for regular files)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Entry:
    size: int
    content: bytes | None = None  # regular files
    lfs_oid: str | None = None  # sha256 of LFS files

    @property
    def oid(self) -> str:
        """What preupload reports and the client compares: sha256 for LFS, git sha1 for regular files."""
        return self.lfs_oid if self.lfs_oid else git_blob_oid(self.content or b"")


@dataclass
class Repo:
    owner: str
    private: bool
    commits: dict[str, dict[str, Entry]] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    created_at: str = field(default_factory=_now)


@dataclass
class Fault:
    method: str
    pattern: re.Pattern
    status: int | None  # None: drop the connection
    times: int
    after_bytes: int = 0
    message: str = "injected failure"


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


class FakeHub:
    """The server's state and controls. ``tokens`` maps token -> user name (each user owns its namespace)."""

    def __init__(self, tokens: dict[str, str] | None = None) -> None:
        self.tokens = dict(tokens or {})
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.faults: list[Fault] = []
        self.report_sizes = True  # False: ?blobs=true lists files without sizes (a mirror that omits them)
        self.requests: list[Request] = []
        self.lock = threading.RLock()
        self._counter = itertools.count(1)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---- controls ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            state = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def fail(self, method: str, path_regex: str, status: int, *, times: int = 1, message: str = "injected") -> None:
        """Answer the next ``times`` requests matching ``method`` and ``path_regex`` with ``status``."""
        self.faults.append(Fault(method, re.compile(path_regex), status, times, message=message))

    def drop(self, method: str, path_regex: str, *, times: int = 1, after_bytes: int = 1024) -> None:
        """Close the connection of the next ``times`` matching requests after reading ``after_bytes`` of the body."""
        self.faults.append(Fault(method, re.compile(path_regex), None, times, after_bytes=after_bytes))

    def file(self, repo_id: str, revision: str, path: str) -> bytes:
        """The bytes of ``path`` at ``revision`` (branch, tag or commit)."""
        repo = self.repos[repo_id]
        entry = repo.commits[self._resolve(repo, revision)][path]
        return entry.content if entry.lfs_oid is None else self.lfs[entry.lfs_oid]

    def files(self, repo_id: str, revision: str) -> list[str]:
        repo = self.repos[repo_id]
        return sorted(repo.commits[self._resolve(repo, revision)])

    def put_files(self, repo_id: str, files: dict[str, bytes | None], *, branch: str = "main",
                  message: str = "files written by the test") -> str:
        """Commit ``files`` (path -> bytes; None deletes) straight onto ``branch``, creating the repo (public,
        owned by the first part of ``repo_id``) when missing: how a test makes a repo that holds files the
        studio did not publish (foreign weights, a hostile record or image). Returns the new commit."""
        with self.lock:
            repo = self.repos.get(repo_id)
            if repo is None:
                repo = self.repos[repo_id] = Repo(owner=repo_id.split("/")[0], private=False)
                repo.branches[branch] = self._new_commit(repo, {}, "initial commit")
            tree = dict(repo.commits[repo.branches[branch]])
            for path, data in files.items():
                if data is None:
                    tree.pop(path, None)
                elif path.lower().endswith(_LFS_SUFFIXES):
                    oid = hashlib.sha256(data).hexdigest()
                    self.lfs[oid] = data
                    tree[path] = Entry(len(data), lfs_oid=oid)
                else:
                    tree[path] = Entry(len(data), content=data)
            repo.branches[branch] = self._new_commit(repo, tree, message)
            return repo.branches[branch]

    def _take_fault(self, method: str, path: str) -> Fault | None:
        with self.lock:
            for fault in self.faults:
                if fault.times > 0 and fault.method == method and fault.pattern.search(path):
                    fault.times -= 1
                    return fault
        return None

    # ---- model ------------------------------------------------------------------------------

    def _new_commit(self, repo: Repo, files: dict[str, Entry], message: str) -> str:
        seed = f"{next(self._counter)}:{message}:{sorted((p, e.oid) for p, e in files.items())}"
        oid = hashlib.sha1(seed.encode()).hexdigest()
        repo.commits[oid] = files
        return oid

    @staticmethod
    def _resolve(repo: Repo, revision: str) -> str:
        if revision in repo.branches:
            return repo.branches[revision]
        if revision in repo.tags:
            return repo.tags[revision]
        if revision in repo.commits:
            return revision
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def user(self, headers) -> str | None:
        auth = headers.get("Authorization") or headers.get("authorization") or ""
        if not auth:
            return None
        token = auth.removeprefix("Bearer ").strip()
        if token not in self.tokens:
            raise HubError(401, "Invalid credentials in Authorization header")
        return self.tokens[token]

    def repo(self, repo_id: str, headers, *, write: bool = False) -> Repo:
        user = self.user(headers)
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and user != repo.owner):
            if user is None:
                raise HubError(401, "Repository not found", "RepoNotFound")
            raise HubError(404, "Repository not found", "RepoNotFound")
        if write:
            if user is None:
                raise HubError(401, "You must be authenticated to do this")
            if user != repo.owner:
                raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo


class _Handler(BaseHTTPRequestHandler):
    state: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args) -> None:  # noqa: A002 - the base class's name
        pass

    # ---- plumbing ---------------------------------------------------------------------------

    def _body(self, fault: Fault | None) -> bytes | None:
        """The request body (Content-Length or chunked); None when a drop fault closed the connection."""
        limit = fault.after_bytes if fault is not None and fault.status is None else None
        chunks, total = [], 0
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
                total += size
                if limit is not None and total >= limit:
                    return self._drop()
        else:
            length = int(self.headers.get("Content-Length") or 0)
            if limit is not None:
                self.rfile.read(min(limit, length))
                return self._drop()
            chunks.append(self.rfile.read(length))
        if limit is not None:
            return self._drop()
        return b"".join(chunks)

    def _drop(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        return None

    def _send(self, status: int, payload=None, *, headers: dict | None = None, raw: bytes | None = None,
              head: bool = False) -> None:
        data = raw if raw is not None else (json.dumps(payload).encode() if payload is not None else b"")
        self.send_response(status)
        self.send_header("Content-Type", "application/json" if raw is None else "application/octet-stream")
        for k, v in (headers or {}).items():
            self.send_header(k, str(v))
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if not head:
            self.wfile.write(data)

    def _handle(self, method: str) -> None:
        split = urlsplit(self.path)
        path, query = split.path, parse_qs(split.query)
        fault = self.state._take_fault(method, path)
        body = b"" if method in ("GET", "HEAD") else self._body(fault)
        if body is None:
            return  # dropped
        headers = {k: v for k, v in self.headers.items() if k.lower() != "authorization"}
        with self.state.lock:
            self.state.requests.append(Request(method, path, headers, body))
        if fault is not None and fault.status is not None:
            self._send(fault.status, {"error": fault.message}, headers={"X-Error-Message": fault.message},
                       head=method == "HEAD")
            return
        try:
            with self.state.lock:
                status, payload, extra = self._route(method, path, query, body)
        except HubError as e:
            hdrs = {"X-Error-Message": e.message, **e.headers}
            if e.code:
                hdrs["X-Error-Code"] = e.code
            self._send(e.status, {"error": e.message}, headers=hdrs, head=method == "HEAD")
            return
        if isinstance(payload, bytes):
            self._send(status, raw=payload, headers=extra, head=method == "HEAD")
        else:
            self._send(status, payload, headers=extra, head=method == "HEAD")

    def do_GET(self):  # noqa: N802 - BaseHTTPRequestHandler's names
        self._handle("GET")

    def do_HEAD(self):  # noqa: N802
        self._handle("HEAD")

    def do_POST(self):  # noqa: N802
        self._handle("POST")

    def do_PUT(self):  # noqa: N802
        self._handle("PUT")

    # ---- routes -----------------------------------------------------------------------------

    def _route(self, method: str, path: str, query: dict, body: bytes):
        hub = self.state
        parts = [unquote(p) for p in path.split("/")[1:]]
        if method == "POST" and path == "/api/repos/create":
            return self._create_repo(json.loads(body))
        if method == "POST" and path == "/api/validate-yaml":
            return self._validate_yaml(json.loads(body))
        if method == "PUT" and len(parts) == 2 and parts[0] == "lfs-upload":
            data = body
            if hashlib.sha256(data).hexdigest() != parts[1]:
                raise HubError(400, "uploaded bytes do not match the object id")
            hub.lfs[parts[1]] = data
            return 200, {}, {}
        if method == "POST" and path == "/lfs-verify":
            req = json.loads(body)
            if req.get("oid") not in hub.lfs or len(hub.lfs[req["oid"]]) != req.get("size"):
                raise HubError(404, "object not uploaded")
            return 200, {}, {}
        if len(parts) >= 3 and parts[0] == "api" and parts[1] == "models":
            repo_id = f"{parts[2]}/{parts[3]}" if len(parts) >= 4 else ""
            rest = parts[4:]
            if method == "GET" and not rest:
                return self._model_info(repo_id, "main", query)
            if method == "GET" and len(rest) == 2 and rest[0] == "revision":
                return self._model_info(repo_id, rest[1], query)
            if method == "GET" and rest == ["refs"]:
                return self._refs(repo_id)
            if method == "POST" and len(rest) == 2 and rest[0] == "preupload":
                return self._preupload(repo_id, rest[1], json.loads(body))
            if method == "POST" and len(rest) == 2 and rest[0] == "commit":
                return self._commit(repo_id, rest[1], body)
            if method == "POST" and len(rest) == 2 and rest[0] == "tag":
                return self._tag(repo_id, rest[1], json.loads(body))
        if method == "POST" and len(parts) == 6 and parts[1].endswith(".git") and parts[2:] == ["info", "lfs",
                                                                                                "objects", "batch"]:
            return self._lfs_batch(f"{parts[0]}/{parts[1][:-4]}", json.loads(body))
        if method in ("GET", "HEAD") and len(parts) >= 5 and parts[2] == "resolve":
            return self._resolve_file(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
        raise HubError(404, f"no route for {method} {path}")

    def _create_repo(self, req: dict):
        hub = self.state
        user = hub.user(self.headers)
        if user is None:
            raise HubError(401, "You must be authenticated to create a repo")
        owner = req.get("organization") or user
        name = req.get("name") or ""
        if not re.fullmatch(_REPO_PART, owner) or not re.fullmatch(_REPO_PART, name):
            raise HubError(400, "invalid repo name")
        repo_id = f"{owner}/{name}"
        url = f"{self.state.url}/{repo_id}"
        if owner != user:
            raise HubError(403, f"You don't have the rights to create a model under the namespace {owner}")
        if repo_id in hub.repos:
            return 409, {"error": "You already created this model repo", "url": url}, {}
        repo = Repo(owner=owner, private=req.get("visibility") == "private")
        attributes = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
        first = hub._new_commit(repo, {".gitattributes": Entry(len(attributes), content=attributes)},
                                "initial commit")
        repo.branches["main"] = first
        hub.repos[repo_id] = repo
        return 200, {"url": url, "name": repo_id, "id": first}, {}

    def _validate_yaml(self, req: dict):
        errors = []
        match = re.match(r"^---\n(.*?)\n---\n", req.get("content") or "", re.S)
        meta = yaml.safe_load(match.group(1)) if match else None
        if not isinstance(meta, dict):
            errors.append("the README.md has no YAML front matter")
            meta = {}
        base = meta.get("base_model")
        for b in ([base] if isinstance(base, str) else base or []):
            if not isinstance(b, str) or not re.fullmatch(rf"{_REPO_PART}/{_REPO_PART}", b):
                errors.append(f'"base_model" must be a Hub model id, got {b!r}')
        if "license" in meta and meta["license"] not in LICENSES:
            errors.append(f'"license" must be one of the Hub licenses, got {meta["license"]!r}')
        if "tags" in meta and not (isinstance(meta["tags"], list) and all(isinstance(t, str) for t in meta["tags"])):
            errors.append('"tags" must be a list of strings')
        for w in meta.get("widget") or []:
            if not isinstance(w, dict) or not isinstance(w.get("text"), str):
                errors.append('"widget" entries need a "text" string')
            elif "output" in w and not isinstance((w["output"] or {}).get("url"), str):
                errors.append('"widget.output" needs a "url" string')
        for key in ("instance_prompt", "library_name"):
            if key in meta and not isinstance(meta[key], str):
                errors.append(f'"{key}" must be a string')
        if errors:
            return 400, {"errors": [{"message": m} for m in errors]}, {}
        return 200, {"errors": [], "warnings": []}, {}

    def _model_info(self, repo_id: str, revision: str, query: dict):
        hub = self.state
        repo = hub.repo(repo_id, self.headers)
        commit = hub._resolve(repo, revision)
        blobs = (query.get("blobs") or ["false"])[0].lower() == "true"
        siblings = []
        for p, e in sorted(repo.commits[commit].items()):
            s = {"rfilename": p}
            if blobs and hub.report_sizes:
                s.update(size=e.size, blobId=git_blob_oid(e.content or e.lfs_oid.encode()))
                if e.lfs_oid:
                    s["lfs"] = {"sha256": e.lfs_oid, "size": e.size, "pointerSize": 134}
            siblings.append(s)
        return 200, {"_id": repo_id, "id": repo_id, "modelId": repo_id, "author": repo.owner, "sha": commit,
                     "private": repo.private, "disabled": False, "gated": False, "tags": [], "siblings": siblings,
                     "createdAt": repo.created_at, "lastModified": _now()}, {}

    def _refs(self, repo_id: str):
        repo = self.state.repo(repo_id, self.headers)
        return 200, {"branches": [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": c}
                                  for b, c in sorted(repo.branches.items())],
                     "converts": [],
                     "tags": [{"name": t, "ref": f"refs/tags/{t}", "targetCommit": c}
                              for t, c in sorted(repo.tags.items())]}, {}

    def _preupload(self, repo_id: str, revision: str, req: dict):
        hub = self.state
        repo = hub.repo(repo_id, self.headers, write=True)
        files = repo.commits[hub._resolve(repo, revision)]
        out = []
        for f in req.get("files") or []:
            sample = base64.b64decode(f["sample"])
            lfs = f["path"].lower().endswith(_LFS_SUFFIXES) or b"\0" in sample or f["size"] > 10 * 1024 * 1024
            existing = files.get(f["path"])
            out.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                        "oid": existing.oid if existing else None})
        return 200, {"files": out, "commitOid": repo.branches.get(revision)}, {}

    def _lfs_batch(self, repo_id: str, req: dict):
        hub = self.state
        hub.repo(repo_id, self.headers, write=True)
        objects = []
        for o in req.get("objects") or []:
            entry = {"oid": o["oid"], "size": o["size"]}
            if o["oid"] not in hub.lfs:
                entry["authenticated"] = True
                entry["actions"] = {"upload": {"href": f"{hub.url}/lfs-upload/{o['oid']}"},
                                    "verify": {"href": f"{hub.url}/lfs-verify"}}
            objects.append(entry)
        return 200, {"transfer": "basic", "objects": objects}, {"Content-Type": "application/vnd.git-lfs+json"}

    def _commit(self, repo_id: str, revision: str, body: bytes):
        hub = self.state
        repo = hub.repo(repo_id, self.headers, write=True)
        if revision not in repo.branches:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "the commit payload must start with a header line")
        header = lines[0]["value"]
        head = repo.branches[revision]
        if header.get("parentCommit") and header["parentCommit"] != head:
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(repo.commits[head])
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            if key == "file":
                data = base64.b64decode(value["content"])
                files[value["path"]] = Entry(len(data), content=data)
            elif key == "lfsFile":
                if value["oid"] not in hub.lfs:
                    raise HubError(422, f"LFS object {value['oid']} was never uploaded")
                files[value["path"]] = Entry(len(hub.lfs[value["oid"]]), lfs_oid=value["oid"])
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
            else:
                raise HubError(400, f"unsupported operation {key}")
        oid = hub._new_commit(repo, files, header.get("summary") or "")
        repo.branches[revision] = oid
        return 200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{oid}", "commitOid": oid,
                     "pullRequestUrl": None}, {}

    def _tag(self, repo_id: str, revision: str, req: dict):
        hub = self.state
        repo = hub.repo(repo_id, self.headers, write=True)
        commit = hub._resolve(repo, revision)
        tag = req.get("tag") or ""
        if tag in repo.tags:
            raise HubError(409, f"Tag {tag} already exists")
        repo.tags[tag] = commit
        return 200, {}, {}

    def _resolve_file(self, repo_id: str, revision: str, path: str):
        hub = self.state
        repo = hub.repo(repo_id, self.headers)
        commit = hub._resolve(repo, revision)
        entry = repo.commits[commit].get(path)
        if entry is None:
            raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit})
        headers = {"X-Repo-Commit": commit, "ETag": f'"{git_blob_oid(entry.content or entry.lfs_oid.encode())}"'}
        if entry.lfs_oid:
            headers.update({"X-Linked-Etag": f'"{entry.lfs_oid}"', "X-Linked-Size": entry.size})
            return 200, hub.lfs[entry.lfs_oid], headers
        headers["ETag"] = f'"{entry.oid}"'
        return 200, entry.content, headers
