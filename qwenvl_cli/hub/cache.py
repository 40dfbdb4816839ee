"""The cached Qwen2-VL models in both hub caches: list, verify, remove (plan, then execute).

Pure data and local files only (no network, no hub SDK): the CLI renders what these
functions return. A model's files are shared with the hub tools that use the same caches,
so removal keeps any blob that another cached revision still uses.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwenvl_cli import settings
from qwenvl_cli.catalogue.load import load_catalogue
from qwenvl_cli.catalogue.resolve import SpecQuery, resolve
from qwenvl_cli.catalogue.spec import Catalogue, ResolvedSpec, size_display
from qwenvl_cli.errors import DownloadError, NotCached, UsageError
from qwenvl_cli.hub import layout
from qwenvl_cli.hub.layout import HF, MS, RemoteFile


@dataclass(frozen=True)
class CachedModel:
    hub: str
    repo_id: str
    revision: str  # the branch / tag names pointing at it, else the snapshot's name
    commit: str | None
    path: Path  # the snapshot folder (the repo folder for a download that has no snapshot yet)
    state: str  # complete | unverified | partial
    size_on_disk: int
    spec: dict[str, str] = field(default_factory=dict)  # model_name, model_format, size_in_billions, quantization
    missing: tuple[str, ...] = ()
    snapshot_name: str | None = None
    partial_files: tuple[Path, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {**self.spec, "hub": self.hub, "repo_id": self.repo_id, "revision": self.revision,
                "commit": self.commit, "state": self.state, "complete": self.state == "complete",
                "size_on_disk": self.size_on_disk, "path": str(self.path), "missing": list(self.missing)}


# --- the catalogue's repo ids -----------------------------------------------------------


def known_repos(catalogue: Catalogue | None = None) -> dict[tuple[str, str], dict[str, str]]:
    """(hub, lower-case repo id) -> the spec it belongs to."""
    catalogue = catalogue or load_catalogue()
    out = {}
    for fam in catalogue.families:
        for spec in fam.specs:
            for quant in spec.quantizations:
                for source in spec.hubs:
                    resolved = spec.hub_source(source.hub, quant)
                    if resolved is not None:
                        out[(source.hub, resolved.model_id.lower())] = {
                            "model_name": fam.name, "model_format": spec.model_format,
                            "size_in_billions": size_display(spec.size_in_billions), "quantization": quant}
    return out


# --- listing ----------------------------------------------------------------------------


def _tree_size(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            total += layout.file_size(Path(root) / name) or 0
    return total


def _hf_blobs(snapshot: Path) -> set[Path]:
    return {Path(os.path.realpath(p)) for p in snapshot.rglob("*") if p.is_file()}


def _hf_entries(repo_dir: Path, repo_id: str, spec: dict[str, str]) -> list[CachedModel]:
    snapshots = sorted((p for p in (repo_dir / "snapshots").glob("*") if p.is_dir()),
                       key=lambda p: p.stat().st_mtime)
    refs: dict[str, list[str]] = {}
    for ref in (repo_dir / "refs").rglob("*") if (repo_dir / "refs").is_dir() else []:
        if ref.is_file():
            refs.setdefault(ref.read_text().strip(), []).append(ref.relative_to(repo_dir / "refs").as_posix())
    partials = tuple(sorted((repo_dir / "blobs").glob("*.incomplete")))
    entries = []
    for snap in snapshots:
        copy = layout.copy_state(HF, repo_id, snap.name, snap, snap.name)
        size = sum(layout.file_size(b) or 0 for b in _hf_blobs(snap))
        entries.append(CachedModel(HF, repo_id, ", ".join(sorted(refs.get(snap.name, []))) or snap.name,
                                   snap.name, snap, copy.state, size, spec, copy.missing, snap.name))
    if partials:  # huggingface_hub names partial blobs by etag: give them to the newest unfinished copy
        extra = sum(layout.file_size(p) or 0 for p in partials)
        target = next((i for i in reversed(range(len(entries))) if entries[i].state != "complete"), None)
        if target is None:
            entries.append(CachedModel(HF, repo_id, "-", None, repo_dir, "partial", extra, spec,
                                       partial_files=partials))
        else:
            e = entries[target]
            entries[target] = CachedModel(e.hub, e.repo_id, e.revision, e.commit, e.path, "partial",
                                          e.size_on_disk + extra, spec, e.missing, e.snapshot_name, partials)
    return entries


def _ms_entries(repo_id: str, folders: list[tuple[Path, str]], spec: dict[str, str]) -> list[CachedModel]:
    entries = []
    for snap, revision in folders:
        copy = layout.copy_state(MS, repo_id, revision, snap, None)
        partials = tuple(sorted(snap.rglob("*.incomplete")))
        state = "partial" if partials else copy.state
        entries.append(CachedModel(MS, repo_id, revision, copy.commit, snap, state, _tree_size(snap), spec,
                                   copy.missing, snap.name, partials))
    return entries


def scan(catalogue: Catalogue | None = None) -> list[CachedModel]:
    """Every cached copy of a catalogue model, in either cache."""
    known = known_repos(catalogue)
    out: list[CachedModel] = []
    hf_root = settings.hf_hub_cache()
    for repo_dir in sorted(hf_root.glob("models--*")) if hf_root.is_dir() else []:
        repo_id = repo_dir.name[len("models--"):].replace("--", "/", 1)
        spec = known.get((HF, repo_id.lower()))
        if spec is not None:
            out.extend(_hf_entries(repo_dir, repo_id, spec))
    ms_root = settings.modelscope_cache()
    for repo_dir in sorted((ms_root / "models").glob("*--*")) if (ms_root / "models").is_dir() else []:
        repo_id = repo_dir.name.replace("--", "/", 1)
        spec = known.get((MS, repo_id.lower()))
        if spec is not None:
            snaps = [(p, p.name) for p in sorted((repo_dir / "snapshots").glob("*")) if p.is_dir()]
            out.extend(_ms_entries(repo_id, snaps, spec))
    for base in (ms_root / "models", ms_root / "hub" / "models"):  # the pre-1.38 layout
        for folder in sorted(base.glob("*/*")) if base.is_dir() else []:
            repo_id = f"{folder.parent.name}/{folder.name.replace('___', '.')}"
            spec = known.get((MS, repo_id.lower()))
            if spec is not None and folder.is_dir() and "--" not in folder.parent.name:
                out.extend(_ms_entries(repo_id, [(folder, "master")], spec))
    return out


def for_spec(spec: ResolvedSpec, entries: list[CachedModel] | None = None) -> list[CachedModel]:
    """The cached copies (any revision) of a resolved spec's repos on its hub(s)."""
    wanted = {(s.hub, s.model_id.lower()) for s in spec.sources}
    return [e for e in (scan() if entries is None else entries) if (e.hub, e.repo_id.lower()) in wanted]


def row_states(row: dict[str, Any]) -> dict[str, str]:
    """For a list-specs row: the state of the catalogue revision in each hub's cache."""
    states = {}
    for hub in (HF, MS):
        source = row.get(hub)
        if source:
            states[hub] = layout.local_copy(hub, source["model_id"], source["revision"]).state
    return states


# --- verify -----------------------------------------------------------------------------


@dataclass(frozen=True)
class VerifyReport:
    entry: CachedModel
    against: str  # "qvl manifest" | "hub listing cached by huggingface_hub"
    results: tuple[tuple[str, str | None], ...]  # (file, problem or None)

    @property
    def ok(self) -> bool:
        return all(problem is None for _, problem in self.results)

    @property
    def bad(self) -> list[tuple[str, str]]:
        return [(name, problem) for name, problem in self.results if problem is not None]

    def to_dict(self) -> dict[str, Any]:
        return {**self.entry.to_dict(), "against": self.against, "ok": self.ok,
                "files": [{"path": n, "ok": p is None, "problem": p} for n, p in self.results]}


def verify(entry: CachedModel) -> VerifyReport:
    """Re-hash a cached copy against what qvl recorded (or the listing the HF client cached)."""
    if entry.snapshot_name is None:
        raise NotCached(f"{entry.repo_id} has only partial downloads in the cache ({entry.path})",
                        "finish it with `qvl download`, or remove it with `qvl remove-cache --all-partial`")
    manifest = layout.read_manifest(entry.hub, entry.repo_id, entry.snapshot_name)
    if manifest is not None:
        files = [RemoteFile(f["path"], f["size"], f.get("sha256"), f.get("git_sha1")) for f in manifest["files"]]
        against = "qvl manifest" if manifest.get("complete", True) else "hub listing recorded by qvl"
    else:
        listing = layout.hf_tree_listing(entry.repo_id, entry.commit) if entry.hub == HF and entry.commit else None
        if listing is None:
            raise NotCached(f"qvl has no record of the files of {entry.repo_id} @ {entry.revision} "
                            f"to check {entry.path} against",
                            "run `qvl download` with the same spec: it checks the copy against the hub "
                            "and fetches only what is missing or wrong")
        files, against = list(listing.files), "hub listing cached by huggingface_hub"
    results = tuple((f.path, layout.check_file(entry.path / f.path, f)[0]) for f in files)
    report = VerifyReport(entry, against, results)
    if manifest is not None and manifest.get("complete", True) and not report.ok:
        # The files no longer match the record: keep it as the listing only (complete: false),
        # so the copy stops counting as complete, `cached` says partial where a file is gone,
        # and the next `qvl download` checks every file and fetches the bad ones.
        kept = {k: v for k, v in manifest.items() if k != "version"}
        layout.write_manifest(entry.hub, entry.repo_id, entry.snapshot_name, {**kept, "complete": False})
    return report


# --- remove -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Removal:
    entry: CachedModel
    delete: tuple[Path, ...]
    freed: int
    kept: tuple[str, ...] = ()  # files kept because another cached revision uses them


@dataclass(frozen=True)
class RemovalPlan:
    items: tuple[Removal, ...]
    also_delete: tuple[Path, ...] = ()  # folders left empty

    @property
    def freed(self) -> int:
        return sum(i.freed for i in self.items)

    def to_dict(self) -> dict[str, Any]:
        return {"freed": self.freed, "items": [
            {**i.entry.to_dict(), "freed": i.freed, "delete": [str(p) for p in i.delete],
             "kept_shared": list(i.kept)} for i in self.items]}


def plan_for(query: SpecQuery, all_partial: bool, revision: str | None = None) -> RemovalPlan:
    """The removal plan for `remove-cache`: the copies of a spec (of one revision when given),
    or every partial download."""
    entries = scan()
    if query.given:
        targets = for_spec(resolve(query), entries)
    elif all_partial:
        targets = entries
    else:
        raise UsageError("say what to remove: spec flags (e.g. -s 7 -f awq) or --all-partial",
                         "`qvl cached` lists what is in the caches")
    if all_partial:
        targets = [e for e in targets if e.state == "partial"]
    if revision:
        targets = [e for e in targets if revision in (e.commit, e.snapshot_name, *e.revision.split(", "))]
    return plan_removal(targets, entries)


def plan_removal(entries: list[CachedModel], all_entries: list[CachedModel] | None = None) -> RemovalPlan:
    """What deleting ``entries`` would remove and free; nothing is touched."""
    everything = scan() if all_entries is None else all_entries
    removing = {(e.hub, e.path) for e in entries}
    items, folders = [], []
    for entry in entries:
        siblings = [e for e in everything if e.hub == entry.hub and e.repo_id == entry.repo_id]
        staying = [e for e in siblings if (e.hub, e.path) not in removing]
        items.append(_hf_removal(entry, staying) if entry.hub == HF else _ms_removal(entry))
        if not staying:
            folders.append(_repo_folder(entry))
            if entry.hub == HF:  # huggingface_hub's per-repo lock files
                folders.append(settings.hf_hub_cache() / ".locks" / layout.hf_repo_dir(entry.repo_id).name)
    manifests = []
    for entry in entries:
        if entry.snapshot_name:
            path = layout.manifest_path(entry.hub, entry.repo_id, entry.snapshot_name)
            if path.exists():
                manifests.append(path)
    extra = tuple(dict.fromkeys(p for p in folders + manifests if p.exists()))
    return RemovalPlan(tuple(items), extra)


def _repo_folder(entry: CachedModel) -> Path:
    if entry.hub == HF:
        return layout.hf_repo_dir(entry.repo_id)
    return entry.path.parent.parent if entry.path.parent.name == "snapshots" else entry.path


def _hf_removal(entry: CachedModel, staying: list[CachedModel]) -> Removal:
    mine = _hf_blobs(entry.path) if entry.snapshot_name else set()
    shared = set().union(*(_hf_blobs(e.path) for e in staying if e.snapshot_name)) if staying else set()
    gone = sorted(mine - shared) + list(entry.partial_files)
    delete = ([entry.path] if entry.snapshot_name else []) + gone
    repo_dir = layout.hf_repo_dir(entry.repo_id)
    if entry.commit and (repo_dir / "refs").is_dir():
        delete += [r for r in (repo_dir / "refs").rglob("*") if r.is_file() and r.read_text().strip() == entry.commit]
    tree = repo_dir / "trees" / f"{entry.commit}.json"  # the listing huggingface_hub cached
    if entry.commit and tree.exists():
        delete.append(tree)
    freed = sum(layout.file_size(p) or 0 for p in gone)
    files = [p for p in entry.path.rglob("*") if p.is_file()] if entry.snapshot_name else []
    kept = tuple(sorted(p.relative_to(entry.path).as_posix() for p in files
                        if Path(os.path.realpath(p)) in shared))
    return Removal(entry, tuple(delete), freed, kept)


def _ms_removal(entry: CachedModel) -> Removal:
    return Removal(entry, (entry.path,), entry.size_on_disk)


def execute(plan: RemovalPlan) -> int:
    """Delete what the plan lists; returns the bytes freed.

    Holds the lock a download of each model holds: a model being downloaded by another qvl
    process is refused in one line, and nothing is deleted."""
    import contextlib

    from filelock import Timeout

    from qwenvl_cli.hub.download import model_lock

    with contextlib.ExitStack() as stack:
        for hub, repo_id in dict.fromkeys((item.entry.hub, item.entry.repo_id) for item in plan.items):
            lock = model_lock(hub, repo_id)
            try:
                lock.acquire(timeout=0)
            except Timeout:
                raise DownloadError(f"{repo_id} is being downloaded by another qvl process; nothing was removed",
                                    "wait for the download to finish (or stop it), then run remove-cache again") from None
            stack.callback(lock.release)
        for path in [p for item in plan.items for p in item.delete] + list(plan.also_delete):
            if path.is_symlink() or path.is_file():
                path.unlink(missing_ok=True)
            elif path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
    return plan.freed
