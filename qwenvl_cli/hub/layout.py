"""Where the hub caches keep a model, what a model needs, and what qvl verified.

Local files only: nothing here touches the network or imports a hub SDK, so `list-specs`
and `cached` stay instant. Both hubs' own caches are used as they are:

    Hugging Face  $HF_HUB_CACHE/models--{org}--{name}/{blobs,refs,snapshots/<commit>,trees}
    ModelScope    $MODELSCOPE_CACHE/models/{owner}--{name}/snapshots/<revision>
                  (SDK < 1.38: $MODELSCOPE_CACHE[/hub]/models/{owner}/{name with . as ___})

A qvl manifest ($QVL_HOME/manifests/{hub}/{org}--{name}/{snapshot}.json) records the files,
sizes and hashes that qvl checked after a complete download.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwenvl_cli import settings

HF = "huggingface"
MS = "modelscope"
HUB_LABELS = {HF: "Hugging Face", MS: "ModelScope"}
COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
MANIFEST_VERSION = 1

# What a model needs, top-level files only: configs, tokenizer and processor files, chat
# template, safetensors weights and their index. READMEs, images, licences and duplicate
# .bin / .pt / .onnx weights are left out.
NEEDED = ("*.json", "*.safetensors", "merges.txt", "tokenizer.model", "*.tiktoken", "*.jinja")
BIN_WEIGHTS = ("pytorch_model*.bin",)  # only when a repo has no safetensors at all


def needed_files(paths: list[str]) -> list[str]:
    """The files of a repo listing that qvl downloads, in listing order."""
    top = [p for p in paths if "/" not in p]
    patterns = NEEDED if any(p.endswith(".safetensors") for p in top) else NEEDED + BIN_WEIGHTS
    return [p for p in top if any(fnmatch.fnmatchcase(p, pat) for pat in patterns)]


# --- data -----------------------------------------------------------------------------


@dataclass(frozen=True)
class RemoteFile:
    """One file as the hub lists it."""

    path: str
    size: int
    sha256: str | None = None  # given by ModelScope for every file, by Hugging Face for LFS files
    git_sha1: str | None = None  # Hugging Face blob id of a non-LFS file

    @property
    def etag(self) -> str | None:
        """The name huggingface_hub gives the blob (sha256 for LFS files, else the git sha1)."""
        return self.sha256 or self.git_sha1


@dataclass(frozen=True)
class Listing:
    """The files of one repo revision that qvl needs, as the hub lists them."""

    hub: str
    repo_id: str
    revision: str  # as asked: a branch, a tag or a commit
    commit: str | None
    files: tuple[RemoteFile, ...]

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)


@dataclass(frozen=True)
class LocalCopy:
    """What the cache holds for one repo revision (local files only)."""

    hub: str
    repo_id: str
    revision: str
    snapshot: Path | None  # the folder a loader reads, None when nothing is there yet
    state: str  # complete | unverified | partial | absent
    commit: str | None = None
    manifest: dict[str, Any] | None = None
    missing: tuple[str, ...] = field(default_factory=tuple)

    @property
    def usable(self) -> bool:
        return self.state in ("complete", "unverified")


# --- Hugging Face layout ----------------------------------------------------------------


def hf_repo_dir(repo_id: str) -> Path:
    return settings.hf_hub_cache() / ("models--" + repo_id.replace("/", "--"))


def hf_commit(repo_id: str, revision: str) -> str | None:
    """The commit a revision points at locally: itself, or what refs/<revision> holds."""
    if COMMIT_RE.match(revision):
        return revision
    ref = hf_repo_dir(repo_id) / "refs" / revision
    try:
        value = ref.read_text().strip()
    except OSError:
        return None
    return value if COMMIT_RE.match(value) else None


def hf_tree_listing(repo_id: str, commit: str, revision: str | None = None) -> Listing | None:
    """The listing huggingface_hub (>= 1.x) caches in trees/<commit>.json, filtered to what
    qvl needs; None when there is none (or in an unknown format)."""
    path = hf_repo_dir(repo_id) / "trees" / f"{commit}.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format_version") != 1 or not isinstance(data.get("files"), dict):
        return None
    entries = data["files"]
    files = []
    for name in needed_files(list(entries)):
        entry = entries[name]
        sha256 = entry.get("lfs_sha256")
        files.append(RemoteFile(name, int(entry.get("size", 0)), sha256,
                                None if sha256 else entry.get("blob_id")))
    return Listing(HF, repo_id, revision or commit, commit, tuple(files))


def hf_partial_path(repo_id: str, file: RemoteFile) -> Path | None:
    return hf_repo_dir(repo_id) / "blobs" / f"{file.etag}.incomplete" if file.etag else None


# --- ModelScope layout ------------------------------------------------------------------


def ms_repo_dir(repo_id: str) -> Path:
    return settings.modelscope_cache() / "models" / repo_id.replace("/", "--")


def ms_legacy_dir(repo_id: str) -> Path | None:
    """The pre-1.38 cache folder modelscope_hub still reuses when it holds files."""
    owner, _, name = repo_id.partition("/")
    base = settings.modelscope_cache()
    for candidate in (base / "models" / owner / name.replace(".", "___"),
                      base / "hub" / "models" / owner / name.replace(".", "___")):
        try:
            if candidate.is_dir() and any(candidate.iterdir()):
                return candidate
        except OSError:
            continue
    return None


def ms_snapshot(repo_id: str, revision: str) -> Path:
    return ms_legacy_dir(repo_id) or ms_repo_dir(repo_id) / "snapshots" / revision


def ms_partial_path(snapshot: Path, file: RemoteFile) -> Path:
    return snapshot / (file.path + ".incomplete")


# --- either hub -------------------------------------------------------------------------


def snapshot_dir(hub: str, repo_id: str, revision: str) -> tuple[Path | None, str | None]:
    """(folder, commit) of a revision in the local cache; folder None when unknown."""
    if hub == HF:
        commit = hf_commit(repo_id, revision)
        return (hf_repo_dir(repo_id) / "snapshots" / commit if commit else None), commit
    return ms_snapshot(repo_id, revision), None


def partial_path(hub: str, repo_id: str, snapshot: Path, file: RemoteFile) -> Path | None:
    return hf_partial_path(repo_id, file) if hub == HF else ms_partial_path(snapshot, file)


def file_size(path: Path) -> int | None:
    """Size of a file (following the snapshot symlink), None when it is missing."""
    try:
        return path.stat().st_size
    except OSError:
        return None


def manifest_path(hub: str, repo_id: str, snapshot_name: str) -> Path:
    return settings.manifests_dir() / hub / repo_id.replace("/", "--") / f"{snapshot_name}.json"


def read_manifest(hub: str, repo_id: str, snapshot_name: str) -> dict[str, Any] | None:
    try:
        data = json.loads(manifest_path(hub, repo_id, snapshot_name).read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(data, dict) and data.get("version") == MANIFEST_VERSION and isinstance(data.get("files"), list)
    return data if ok else None


def write_manifest(hub: str, repo_id: str, snapshot_name: str, data: dict[str, Any]) -> Path:
    path = manifest_path(hub, repo_id, snapshot_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"version": MANIFEST_VERSION, **data}, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def missing_files(snapshot: Path, files: list[tuple[str, int]]) -> list[str]:
    """Files absent from a snapshot or of another size than listed."""
    return [name for name, size in files if file_size(snapshot / name) != size]


SHARD_RE = re.compile(r"-\d{5}-of-\d{5}\.(safetensors|bin)$")


def folder_problem(folder: Path) -> str | None:
    """What keeps a checkpoint folder from loading, judged from its files alone (no listing:
    a --model-path, or a copy another tool fetched); None when it looks complete: a valid
    config, tokenizer files, the weights, every shard the index names, no partial files."""
    if not folder.is_dir():
        return "it is not a folder"
    names = {p.name for p in folder.iterdir()}
    if "config.json" not in names:
        return "no config.json in it"
    try:
        json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"config.json is not valid JSON ({type(exc).__name__})"
    if not names & {"tokenizer.json", "tokenizer_config.json", "vocab.json"}:
        return "no tokenizer files (tokenizer.json / tokenizer_config.json) in it"
    if any(n.endswith(".incomplete") for n in names):
        return "it holds partial downloads (*.incomplete)"
    indexes = sorted(n for n in names if n.endswith(".index.json"))
    if any(SHARD_RE.search(n) for n in names) and not indexes:
        return "it holds sharded weights without their *.index.json"
    for index in indexes:
        try:
            shards = set(json.loads((folder / index).read_text()).get("weight_map", {}).values())
        except (OSError, ValueError, AttributeError):
            return f"{index} is not valid JSON"
        missing = sorted(shards - names)
        if not shards:
            return f"{index} names no shards"
        if missing:
            return f"{index} names {len(missing)} missing shard(s): {', '.join(missing[:3])}"
    if not any(n.endswith((".safetensors", ".bin")) for n in names):
        return "no weights (*.safetensors) in it"
    return None


def looks_complete(snapshot: Path) -> bool:
    """Whether a copy without a listing (another tool fetched it) looks complete."""
    return folder_problem(snapshot) is None


def local_copy(hub: str, repo_id: str, revision: str) -> LocalCopy:
    """The state of one repo revision in the cache, from local files only."""
    snapshot, commit = snapshot_dir(hub, repo_id, revision)
    if snapshot is None or not snapshot.is_dir():
        return LocalCopy(hub, repo_id, revision, None, "absent", commit)
    return copy_state(hub, repo_id, revision, snapshot, commit)


def copy_state(hub: str, repo_id: str, revision: str, snapshot: Path, commit: str | None) -> LocalCopy:
    manifest = read_manifest(hub, repo_id, snapshot.name)
    if manifest is not None:  # qvl's record: the files checked, or (while downloading) the listing
        missing = missing_files(snapshot, [(f["path"], f["size"]) for f in manifest["files"]])
        done = "complete" if manifest.get("complete", True) else "unverified"
        return LocalCopy(hub, repo_id, revision, snapshot, "partial" if missing else done,
                         manifest.get("commit") or commit, manifest, tuple(missing))
    listing = hf_tree_listing(repo_id, commit) if hub == HF and commit else None
    if listing is not None:
        missing = missing_files(snapshot, [(f.path, f.size) for f in listing.files])
        return LocalCopy(hub, repo_id, revision, snapshot, "partial" if missing else "unverified",
                         commit, None, tuple(missing))
    state = "unverified" if looks_complete(snapshot) else "partial"
    return LocalCopy(hub, repo_id, revision, snapshot, state, commit)


# --- hashing ----------------------------------------------------------------------------


def hash_file(path: Path, git_sha1: bool = False) -> tuple[int, str, str | None]:
    """(size, sha256, git blob sha1 when asked) of a file, read once."""
    size = path.stat().st_size
    import hashlib  # only when hashing: keeps `qvl list-specs` start-up light

    sha256 = hashlib.sha256()
    sha1 = hashlib.sha1(b"blob %d\0" % size) if git_sha1 else None
    with path.open("rb") as fh:
        while block := fh.read(4 * 1024 * 1024):
            sha256.update(block)
            if sha1 is not None:
                sha1.update(block)
    return size, sha256.hexdigest(), sha1.hexdigest() if sha1 else None


def check_file(path: Path, file: RemoteFile) -> tuple[str | None, str | None]:
    """Compare a local file with its listing: (problem or None, its sha256)."""
    if file_size(path) is None:
        return "missing", None
    size, sha256, sha1 = hash_file(path, git_sha1=bool(file.git_sha1 and not file.sha256))
    if size != file.size:
        return f"size {size} instead of {file.size}", sha256
    if file.sha256 and sha256 != file.sha256:
        return f"sha256 {sha256[:12]}... instead of {file.sha256[:12]}...", sha256
    if sha1 is not None and sha1 != file.git_sha1:
        return f"git sha1 {sha1[:12]}... instead of {file.git_sha1[:12]}...", sha256
    return None, sha256
