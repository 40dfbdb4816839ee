"""A loopback model hub for tests: speaks the Hugging Face and ModelScope download protocols.

It serves repositories from local folders to the real ``huggingface_hub`` and
``modelscope_hub`` clients (see ../shared/reference/hub-protocols.md for the requests they
make), records every request, and can inject faults: a dropped connection halfway through
a file, a stalled transfer, corrupted bytes of the right size, 401 (gated), error statuses
(5xx / 429) a few times. Nothing here imports qvl.

    server = HubServer().start()
    server.add_repo(folder, hf_id="Qwen/Qwen2-VL-2B-Instruct", ms_id="qwen/Qwen2-VL-2B-Instruct",
                    hf_commit="096da3b9...")
    env = {"HF_ENDPOINT": server.url, "MODELSCOPE_ENDPOINT": server.url}
    ...
    server.stop()

Run ``python tests/hubserver.py FOLDER HF_ID MS_ID`` to serve one repo by hand.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import random
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".jpg", ".jpeg", ".png", ".pt")


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class RepoFile:
    path: str
    data: bytes
    sha256: str
    sha1: str
    lfs: bool


@dataclass
class Repo:
    """A repo's commits (each a file set); the branch points at the last one added."""

    commits: dict[str, dict[str, RepoFile]]
    branch: str

    @property
    def head(self) -> str:
        return list(self.commits)[-1]

    def files(self, revision: str) -> dict[str, RepoFile] | None:
        return self.commits.get(self.head if revision == self.branch else revision)


@dataclass
class Fault:
    kind: str  # status | drop | stall | corrupt
    pattern: str  # fnmatch on the request path (files: the file path inside the repo)
    times: int | None  # None: always
    status: int = 0
    method: str | None = None  # only requests with this method (status faults)
    after: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    hits: int = 0

    def take(self) -> bool:
        if self.times is not None and self.hits >= self.times:
            return False
        self.hits += 1
        return True


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    status: int = 0


def load_repo(folder: Path) -> dict[str, RepoFile]:
    files = {}
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        data = path.read_bytes()
        files[rel] = RepoFile(rel, data, hashlib.sha256(data).hexdigest(), git_blob_sha1(data),
                              rel.endswith(LFS_SUFFIXES) or len(data) > 10_000_000)
    return files


class HubServer:
    """Both hubs on one loopback port; repositories and faults are set per test."""

    def __init__(self) -> None:
        self.hf: dict[str, Repo] = {}
        self.ms: dict[str, Repo] = {}
        self.faults: list[Fault] = []
        self.requests: list[Request] = []
        self.gated: set[str] = set()
        self.release = threading.Event()  # lets stalled transfers go on
        self.stalled = threading.Event()  # set when a transfer has stalled
        self.lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None

    # --- setup ---------------------------------------------------------------------------

    def start(self) -> HubServer:
        handler = type("Handler", (_Handler,), {"hub": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()
        return self

    def stop(self) -> None:
        self.release.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()

    @property
    def url(self) -> str:
        assert self._httpd is not None
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def add_repo(self, folder: Path, hf_id: str | None = None, ms_id: str | None = None,
                 hf_commit: str | None = None, ms_commit: str | None = None) -> None:
        """Serve ``folder`` as a commit of the repo(s); adding again adds a newer commit."""
        files = load_repo(folder)
        digest = hashlib.sha1(b"".join(f.sha1.encode() for f in files.values())).hexdigest()
        for table, repo_id, commit, branch in ((self.hf, hf_id, hf_commit or digest, "main"),
                                               (self.ms, ms_id, ms_commit or digest[::-1], "master")):
            if repo_id:
                table.setdefault(repo_id, Repo({}, branch)).commits[commit] = files

    def fault(self, kind: str, pattern: str = "*", times: int | None = 1, **kw) -> Fault:
        """Add a fault: status (status=503, headers=...), drop / stall (after=N bytes), corrupt."""
        fault = Fault(kind, pattern, times, **kw)
        with self.lock:
            self.faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self.lock:
            self.faults.clear()
        self.release.set()

    def reset_requests(self) -> None:
        with self.lock:
            self.requests.clear()

    # --- queries for tests ---------------------------------------------------------------

    def file_requests(self, name: str, method: str = "GET") -> list[Request]:
        """Requests that fetched the file ``name`` (either hub)."""
        out = []
        for req in list(self.requests):
            if req.method != method:
                continue
            if req.path.endswith("/" + name) and "/resolve/" in req.path:
                out.append(req)
            elif req.query.get("FilePath", [""])[0] == name:
                out.append(req)
        return out

    def _take_fault(self, kinds: tuple[str, ...], target: str, method: str = "GET") -> Fault | None:
        with self.lock:
            for fault in self.faults:
                if (fault.kind in kinds and fnmatch.fnmatch(target, fault.pattern)
                        and fault.method in (None, method) and fault.take()):
                    return fault
        return None


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def handle(self) -> None:
        try:
            super().handle()
        except (ConnectionResetError, BrokenPipeError):  # a client that went away
            pass

    # --- dispatch ------------------------------------------------------------------------

    def do_HEAD(self) -> None:
        self._dispatch(head=True)

    def do_GET(self) -> None:
        self._dispatch(head=False)

    def _dispatch(self, head: bool) -> None:
        parts = urlsplit(self.path)
        path = unquote(parts.path)
        query = parse_qs(parts.query)
        self.record = Request(self.command, path, query,
                              {k.lower(): v for k, v in self.headers.items()})
        with self.hub.lock:
            self.hub.requests.append(self.record)
        fault = self.hub._take_fault(("status",), path, self.command)
        if fault is not None:
            return self._send(fault.status, b"", fault.headers, head=head)
        try:
            if path.startswith("/api/v1/"):
                return self._modelscope(path[len("/api/v1/"):], query, head)
            if path.startswith("/api/models/"):
                return self._hf_api(path[len("/api/models/"):], head)
            if "/resolve/" in path:
                return self._hf_resolve(path.lstrip("/"), head)
        except (BrokenPipeError, ConnectionResetError):
            return
        self._send(404, b"not found", {"X-Error-Code": "EntryNotFound"}, head=head)

    # --- low level -----------------------------------------------------------------------

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None,
              head: bool = False, content_type: str = "text/plain") -> None:
        self.record.status = status
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, status: int, data: object, headers: dict[str, str] | None = None,
              head: bool = False) -> None:
        self._send(status, json.dumps(data).encode(), headers, head, "application/json")

    def _file(self, file: RepoFile, headers: dict[str, str], head: bool) -> None:
        """Send a file, honouring ``Range: bytes=N-`` and the drop/stall/corrupt faults."""
        data = file.data
        if not head and self.hub._take_fault(("corrupt",), file.path) is not None:
            middle = len(data) // 2
            data = data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:]
        start, status = 0, 200
        wanted = self.headers.get("Range", "")
        if wanted.startswith("bytes="):
            first, _, last = wanted[len("bytes="):].partition("-")
            start = int(first or 0)
            end = int(last) + 1 if last else len(data)
            if start >= len(data):
                return self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"}, head=head)
            data, status = data[start:end], 206
            headers = {**headers, "Content-Range": f"bytes {start}-{start + len(data) - 1}/{len(file.data)}"}
        self.record.status = status
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Accept-Ranges", "bytes")
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if head:
            return
        cut = self.hub._take_fault(("drop", "stall"), file.path)
        if cut is None:
            self.wfile.write(data)
            return
        keep = max(0, cut.after - start)
        self.wfile.write(data[:keep])
        self.wfile.flush()
        if cut.kind == "stall":  # pause until the test releases it, then send the rest
            self.hub.stalled.set()
            self.hub.release.wait(60)
            self.wfile.write(data[keep:])
            return
        self.close_connection = True
        try:  # a hard close: the client sees the body end early
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    # --- Hugging Face --------------------------------------------------------------------

    def _hf_repo(self, parts: list[str]) -> tuple[str, Repo | None]:
        repo_id = "/".join(parts[:2])
        return repo_id, self.hub.hf.get(repo_id)

    def _hf_not_found(self, head: bool) -> None:
        self._json(404, {"error": "Repository not found"},
                   {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}, head)

    def _hf_api(self, rest: str, head: bool) -> None:
        parts = rest.split("/")
        repo_id, repo = self._hf_repo(parts)
        if repo is None:
            return self._hf_not_found(head)
        tail = parts[2:]
        revision = repo.branch
        if tail[:1] in (["revision"], ["tree"]):
            revision = "/".join(tail[1:]) or repo.branch
        files = repo.files(revision)
        if files is None:
            return self._json(404, {"error": f"Invalid rev id: {revision}"},
                              {"X-Error-Code": "RevisionNotFound"}, head)
        if tail[:1] == ["tree"]:
            return self._json(200, [_hf_tree_entry(f) for f in files.values()], head=head)
        commit = repo.head if revision == repo.branch else revision
        info = {"id": repo_id, "modelId": repo_id, "sha": commit, "private": False,
                "gated": "manual" if repo_id in self.hub.gated else False,
                "siblings": [{"rfilename": p} for p in files]}
        return self._json(200, info, head=head)

    def _hf_resolve(self, rest: str, head: bool) -> None:
        before, _, after = rest.partition("/resolve/")
        repo_id, repo = self._hf_repo(before.split("/"))
        if repo is None:
            return self._hf_not_found(head)
        revision, _, name = after.partition("/")
        files = repo.files(revision)
        if files is None:
            return self._json(404, {"error": "Invalid rev id"}, {"X-Error-Code": "RevisionNotFound"}, head)
        common = {"X-Repo-Commit": repo.head if revision == repo.branch else revision}
        if repo_id in self.hub.gated:
            message = f"Access to model {repo_id} is restricted. You must have access to it and be authenticated."
            return self._json(401, {"error": message},
                              {**common, "X-Error-Code": "GatedRepo", "X-Error-Message": message}, head)
        file = files.get(name)
        if file is None:
            return self._json(404, {"error": "Entry not found"},
                              {**common, "X-Error-Code": "EntryNotFound"}, head)
        etag = file.sha256 if file.lfs else file.sha1
        self._file(file, {**common, "ETag": f'"{etag}"'}, head)

    # --- ModelScope ----------------------------------------------------------------------

    def _modelscope(self, rest: str, query: dict[str, list[str]], head: bool) -> None:
        parts = rest.split("/")
        if parts[:1] != ["models"] or len(parts) < 3:
            return self._json(404, {"Code": 404, "Message": "not found", "Success": False}, head=head)
        repo_id = "/".join(parts[1:3])
        repo = self.hub.ms.get(repo_id)
        if repo is None:
            return self._json(404, {"Code": 10010205001, "Message": "model not found", "Success": False},
                              head=head)
        if repo_id in self.hub.gated:
            return self._json(401, {"Code": 10010205003, "Message": "no permission, please login",
                                    "Success": False}, head=head)
        revision = query.get("Revision", [repo.branch])[0]
        files = repo.files(revision)
        if files is None:
            return self._json(404, {"Code": 10010205002, "Message": f"revision {revision} not found",
                                    "Success": False}, head=head)
        commit = repo.head if revision == repo.branch else revision
        tail = parts[3:]
        if tail == ["repo", "files"]:
            listing = [{"Name": f.path.rsplit("/", 1)[-1], "Path": f.path, "Type": "blob",
                        "Size": len(f.data), "Sha256": f.sha256, "Revision": commit,
                        "IsLFS": f.lfs} for f in files.values()]
            return self._json(200, {"Code": 200, "Success": True, "Message": "success",
                                    "Data": {"Files": listing}}, head=head)
        if tail == ["repo"]:
            name = query.get("FilePath", [""])[0]
            file = files.get(name)
            if file is None:
                return self._json(404, {"Code": 10010205004, "Message": "file not found",
                                        "Success": False}, head=head)
            return self._file(file, {}, head)
        if tail == []:
            return self._json(200, {"Code": 200, "Success": True, "Data": {
                "Path": repo_id.split("/")[0], "Name": repo_id.split("/")[1]}}, head=head)
        return self._json(404, {"Code": 404, "Message": "not found", "Success": False}, head=head)


def _hf_tree_entry(file: RepoFile) -> dict:
    entry = {"type": "file", "path": file.path, "size": len(file.data), "oid": file.sha1}
    if file.lfs:
        entry["lfs"] = {"oid": file.sha256, "size": len(file.data), "pointerSize": 134}
    return entry


def refused_url() -> str:
    """An http://127.0.0.1:PORT URL where nothing listens (connections are refused)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return f"http://127.0.0.1:{port}"


# --- a generated checkpoint-like repository ------------------------------------------------


def _safetensors(tensors: dict[str, tuple[list[int], int]], rng: random.Random) -> bytes:
    """A valid safetensors file of F16 tensors with random contents."""
    header, offset, blobs = {}, 0, []
    for name, (shape, _) in tensors.items():
        count = 1
        for dim in shape:
            count *= dim
        size = count * 2
        header[name] = {"dtype": "F16", "shape": shape, "data_offsets": [offset, offset + size]}
        blobs.append(rng.randbytes(size))
        offset += size
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + b"".join(blobs)


def make_repo(folder: Path, weight_bytes: int = 1_500_000, seed: int = 0) -> Path:
    """Write a checkpoint-like repo: configs, tokenizer files, two safetensors shards and
    their index, plus files a download must skip (README, an image, a duplicate .bin)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    config = {"architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl",
              "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 1000}
    texts = {
        "config.json": json.dumps(config, indent=2),
        "generation_config.json": json.dumps({"bos_token_id": 1, "eos_token_id": [2, 3]}),
        "tokenizer_config.json": json.dumps({"model_max_length": 32768, "tokenizer_class": "Qwen2Tokenizer"}),
        "tokenizer.json": json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0}}}),
        "vocab.json": json.dumps({f"t{i}": i for i in range(200)}),
        "merges.txt": "#version: 0.2\nt 0\n",
        "preprocessor_config.json": json.dumps({"min_pixels": 3136, "max_pixels": 12845056}),
        "chat_template.json": json.dumps({"chat_template": "{% for m in messages %}{{ m }}{% endfor %}"}),
        "README.md": "# a test model\n",
        ".gitattributes": "*.safetensors filter=lfs diff=lfs merge=lfs -text\n",
    }
    for name, text in texts.items():
        (folder / name).write_text(text)
    per_shard = weight_bytes // 2
    width = 64
    rows = max(1, per_shard // (2 * width))
    index = {"metadata": {"total_size": 0}, "weight_map": {}}
    for i in (1, 2):
        name = f"model-0000{i}-of-00002.safetensors"
        tensor = f"model.layers.{i - 1}.weight"
        data = _safetensors({tensor: ([rows, width], 0)}, rng)
        (folder / name).write_bytes(data)
        index["weight_map"][tensor] = name
        index["metadata"]["total_size"] += rows * width * 2
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (folder / "pytorch_model.bin").write_bytes(rng.randbytes(20_000))
    (folder / "demo.jpg").write_bytes(b"\xff\xd8\xff\xe0" + rng.randbytes(5_000))
    return folder


if __name__ == "__main__":  # pragma: no cover - manual use
    import sys

    hub = HubServer().start()
    hub.add_repo(Path(sys.argv[1]), hf_id=sys.argv[2], ms_id=sys.argv[3] if len(sys.argv) > 3 else None)
    print(hub.url, flush=True)
    while True:
        time.sleep(3600)
