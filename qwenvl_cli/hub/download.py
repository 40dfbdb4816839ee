"""Get a resolved spec onto the disk: from the cache, or from Hugging Face / ModelScope.

`ensure_local(spec)` is what `download`, `launch` and `chat` call. It returns a
`LocalModel` (the folder a loader reads) and never reports a model as present before
every file the hub lists for that revision (of those qvl needs) is there with the listed
size and hash. What it checked is recorded in a manifest (see layout.py).

Order of things: a complete copy in either cache is used without any network access;
offline (`HF_HUB_OFFLINE=1` / `--offline`) stops there; otherwise the hub is chosen
(`auto`: Hugging Face, or ModelScope when Hugging Face cannot be reached), the revision is
listed, a per-model lock is taken, the free disk space is checked, missing files are
fetched by the hub's own client (which resumes partial files), and every file is hashed.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import os
import shutil
import threading
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from qwenvl_cli import render, settings
from qwenvl_cli.catalogue.spec import HubSource, ResolvedSpec
from qwenvl_cli.errors import (
    ChecksumMismatch,
    HubUnreachable,
    InvalidModelPath,
    NoMatchingSpec,
    NotCached,
    NotEnoughDisk,
)
from qwenvl_cli.hub import layout
from qwenvl_cli.hub import progress as progress_mod
from qwenvl_cli.hub.layout import HF, HUB_LABELS, Listing, LocalCopy, RemoteFile
from qwenvl_cli.hub.progress import human_bytes


@dataclass(frozen=True)
class LocalModel:
    """A model folder ready to load."""

    path: Path
    hub: str | None = None  # None for --model-path
    model_id: str | None = None
    revision: str | None = None
    commit: str | None = None
    verified: bool = False  # qvl checked sizes and hashes against the hub's listing
    spec: ResolvedSpec | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "hub": self.hub, "model_id": self.model_id,
                "revision": self.revision, "commit": self.commit, "verified": self.verified}


class _Say:
    """Status lines on stderr; progress goes through the Progress object."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.sink: Callable[[str], None] | None = None

    def __call__(self, message: str) -> None:
        if self.quiet:
            return
        (self.sink or render.note)(message)

    def warn(self, message: str) -> None:
        render.warn(message)


# --- entry points -----------------------------------------------------------------------


def ensure_local(spec: ResolvedSpec, hub: str | None = None, revision: str | None = None,
                 offline: bool | None = None, quiet: bool = False) -> LocalModel:
    """The local folder of ``spec``, downloading what is missing unless offline.

    ``hub`` narrows the spec's sources to one hub (None: the spec's own choice, which for
    ``auto`` is Hugging Face then ModelScope); ``revision`` replaces the catalogue's;
    ``offline`` None means ``HF_HUB_OFFLINE``; ``quiet`` drops progress and status lines.
    Raises a QvlError subclass (NotCached, HubUnreachable, RepoNotFound, GatedRepo,
    ChecksumMismatch, NotEnoughDisk, DownloadError) with a one-line message and a hint.
    """
    say = _Say(quiet)
    offline = settings.hf_offline() if offline is None else offline
    sources = _sources(spec, hub, revision)
    for source in sources:
        copy = layout.local_copy(source.hub, source.model_id, source.revision)
        if copy.state == "complete":
            say(f"{source.model_id} is in the {HUB_LABELS[source.hub]} cache: {copy.snapshot}")
            return _model(copy, spec, verified=True)
    if offline:
        return _offline(spec, sources, say)
    from qwenvl_cli.hub.clients import forward_logs

    client, source = _choose(sources, spec, say)
    client.load()
    with contextlib.ExitStack() as stack:
        stack.enter_context(forward_logs(say, client.logger_names))
        listing = _retry(lambda: client.listing(source.model_id, source.revision), client, source,
                         "listing files", say)
        stack.enter_context(_model_lock(client.hub, source.model_id, say))
        return _fetch_all(client, listing, spec, say)



def local_model_from_path(path: str | Path, spec: ResolvedSpec | None = None) -> LocalModel:
    """``--model-path DIR``: use this folder as it is, download nothing; check it can load."""
    folder = Path(path).expanduser()
    shown = str(path)
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        raise InvalidModelPath(f"--model-path {shown} {what}",
                               "give the folder that holds config.json and the *.safetensors files")
    problem = layout.folder_problem(folder)
    if problem:
        raise InvalidModelPath(f"--model-path {shown}: {problem}",
                               "point it at a complete checkpoint folder, or leave it out to download the spec")
    return LocalModel(folder.resolve(), spec=spec)


# --- choosing -------------------------------------------------------------------------


def _sources(spec: ResolvedSpec, hub: str | None, revision: str | None) -> list[HubSource]:
    sources = list(spec.sources)
    if hub and hub != "auto":
        sources = [s for s in sources if s.hub == hub]
        if not sources:
            raise NoMatchingSpec(f"{spec.label()} is not published on {hub}",
                                 "use --download-hub " + " or ".join(s.hub for s in spec.sources))
    return [replace(s, revision=revision) for s in sources] if revision else sources


def _choose(sources: list[HubSource], spec: ResolvedSpec, say: _Say):
    """The client and source to download from; `auto` falls back when HF cannot be reached."""
    from qwenvl_cli.hub.clients import client_for

    reasons = []
    for i, source in enumerate(sources):
        client = client_for(source.hub)
        reason = client.probe(source.model_id)
        if reason is None:
            why = " (auto)" if len(sources) > 1 and i == 0 else ""
            say(f"downloading {source.model_id} @ {_short(source.revision)} from {client.where()}{why}")
            return client, source
        reasons.append(f"{client.where()}: {reason}")
        if i + 1 < len(sources):
            nxt = client_for(sources[i + 1].hub)
            say.warn(f"{client.where()} cannot be reached ({reason}); trying {nxt.where()} instead")
    hint = ("check the network; set HF_ENDPOINT / MODELSCOPE_ENDPOINT to a mirror, "
            "or use --offline with a model that is already cached")
    if len(sources) == 1 and sources[0].hub == HF:
        hint = "check the network, set HF_ENDPOINT to a mirror, or try --download-hub modelscope"
    raise HubUnreachable("cannot reach " + "; nor ".join(reasons), hint)


def _short(revision: str) -> str:
    return revision[:12] if layout.COMMIT_RE.match(revision) else revision


def _retry(call: Callable[[], Any], client, source: HubSource, what: str, say: _Say) -> Any:
    """Run ``call``; retry transient failures a bounded number of times with backoff."""
    attempts, delay = settings.download_attempts(), settings.retry_backoff()
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 - classified; unknown errors propagate unchanged
            if _disk_full(exc) is not None:
                raise  # not transient: _fetch_all says which disk and how much is needed
            verdict = client.classify(exc, source.model_id, source.revision)
            if verdict is None:
                raise
            transient, error = verdict
            if not transient or attempt == attempts:
                raise error from exc
            say(f"{what}: {error.message}; retrying in {delay:g}s ({attempt}/{attempts - 1})")
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")  # pragma: no cover


# --- offline --------------------------------------------------------------------------


def _offline(spec: ResolvedSpec, sources: list[HubSource], say: _Say) -> LocalModel:
    copies = [layout.local_copy(s.hub, s.model_id, s.revision) for s in sources]
    for copy in copies:
        listing = (layout.hf_tree_listing(copy.repo_id, copy.commit, copy.revision)
                   if copy.hub == HF and copy.commit and copy.snapshot else None)
        if listing is not None and copy.state == "unverified":
            return _verify_present(listing, copy, spec, say)
    for copy in copies:
        if copy.usable:
            say.warn(f"offline: using {copy.snapshot}, which qvl has not verified against the hub's listing")
            return _model(copy, spec, verified=False)
    partial = next((c for c in copies if c.state == "partial"), None)
    where = " or ".join(f"{HUB_LABELS[s.hub]} cache" for s in sources)
    what = f"{spec.label()} ({sources[0].model_id} @ {_short(sources[0].revision)})"
    if partial is not None:
        message = f"{what} is only partly in the {HUB_LABELS[partial.hub]} cache and offline mode is on"
    else:
        message = f"{what} is not in the {where} and offline mode is on"
    raise NotCached(message, "download it first with `qvl download` (network needed), or unset "
                             "HF_HUB_OFFLINE / drop --offline")


def _verify_present(listing: Listing, copy: LocalCopy, spec: ResolvedSpec, say: _Say) -> LocalModel:
    assert copy.snapshot is not None
    say(f"verifying {len(listing.files)} files of {copy.repo_id} against the cached listing")
    checked = []
    for file in listing.files:
        problem, sha256 = layout.check_file(copy.snapshot / file.path, file)
        if problem:
            raise ChecksumMismatch(f"{copy.repo_id}: {file.path}: {problem}",
                                   "run `qvl download` with network access to fetch it again")
        checked.append((file, sha256))
    _write_manifest(listing, copy.snapshot, checked, endpoint=None)
    return _model(layout.local_copy(copy.hub, copy.repo_id, copy.revision), spec, verified=True)


# --- downloading ----------------------------------------------------------------------


def model_lock(hub: str, repo_id: str) -> Any:
    """The file lock a download of ``repo_id`` holds (remove-cache takes it too)."""
    from filelock import FileLock

    path = settings.locks_dir() / f"{hub}--{repo_id.replace('/', '--')}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path))


@contextlib.contextmanager
def _model_lock(hub: str, repo_id: str, say: _Say) -> Iterator[None]:
    """One qvl download of a model at a time; the second process waits, then reuses."""
    from filelock import Timeout

    lock = model_lock(hub, repo_id)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        say.warn(f"another qvl process is downloading {repo_id}; waiting for it to finish")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _fetch_all(client, listing: Listing, spec: ResolvedSpec, say: _Say) -> LocalModel:
    snapshot = client.snapshot(listing)
    copy = layout.local_copy(listing.hub, listing.repo_id, listing.revision)
    if copy.state == "complete" and copy.manifest and copy.manifest.get("commit") == listing.commit:
        say(f"{listing.repo_id} is complete in the cache (another process fetched it): {copy.snapshot}")
        return _model(copy, spec, verified=True)
    have = _intact(listing, snapshot)
    partial, need = _remaining(listing, snapshot, have)
    _check_disk(need, client.cache, listing)
    _write_pending(listing, snapshot, client.endpoint)
    done = sum(f.size for f in listing.files if f.path in have)
    say(f"{len(listing.files)} files, {human_bytes(listing.total_size)}; "
        f"{human_bytes(max(need, 0))} to fetch" + (f" (resuming {len(partial)} partial file(s))"
                                                   if any(partial.values()) else ""))
    with progress_mod.make(listing.repo_id, listing.total_size, done, quiet=say.quiet) as bar:
        say.sink = bar.note
        try:
            checked = _parallel(lambda f: (f, _obtain(client, listing, snapshot, f, have.get(f.path), bar, say)),
                                list(listing.files), settings.download_workers())
        except OSError as exc:
            if _disk_full(exc) is None:
                raise
            raise _disk_full_error(client, listing, snapshot) from None
        finally:
            say.sink = None
    client.finish(listing)
    _write_manifest(listing, snapshot, checked, endpoint=client.endpoint)
    say(f"verified {len(checked)} files ({human_bytes(listing.total_size)}): {snapshot}")
    return _model(layout.local_copy(listing.hub, listing.repo_id, listing.revision), spec, verified=True)


def _intact(listing: Listing, snapshot: Path) -> dict[str, str]:
    """{path: sha256} of the files already in the snapshot that pass their check, hashed
    before the fetch, so that "N to fetch" and the progress count only what is really
    fetched (a file a failed `qvl verify` found damaged is the right size but not kept)."""
    present = [f for f in listing.files if layout.file_size(snapshot / f.path) == f.size]
    checks = _parallel(lambda f: (f.path, layout.check_file(snapshot / f.path, f)), present,
                       settings.download_workers())
    return {path: str(sha256) for path, (problem, sha256) in checks if problem is None}


def _obtain(client, listing: Listing, snapshot: Path, file: RemoteFile, intact: str | None,
            bar: progress_mod.Progress, say: _Say) -> str:
    """Fetch and check one file, unless it is ``intact`` (its sha256, from _intact); a bad
    file is fetched once more."""
    if intact is not None:
        return intact
    source = HubSource(listing.hub, listing.repo_id, listing.revision)
    for attempt in (1, 2):
        _retry(lambda: client.fetch(listing, file, bar), client, source, file.path, say)
        if client.verifies_sha256 and file.sha256:
            # the client hashed it against the listing while fetching: do not read it twice
            size = layout.file_size(snapshot / file.path)
            problem, sha256 = (None if size == file.size else f"size {size} instead of {file.size}"), file.sha256
        else:
            problem, sha256 = layout.check_file(snapshot / file.path, file)
        if problem is None:
            return str(sha256)
        client.discard(listing, file)
        bar.forget(file.path)
        if attempt == 2:
            raise ChecksumMismatch(
                f"{listing.repo_id}: {file.path} failed its check twice ({problem}); it was not kept",
                f"{client.where()} served damaged data; try again later or another hub (--download-hub)")
        say(f"{file.path}: {problem}; fetching it again")
    raise AssertionError("unreachable")  # pragma: no cover


def _parallel(work: Callable[[Any], Any], items: list[Any], workers: int) -> list[Any]:
    """Run ``work`` over ``items`` in daemon threads, results in order; the first error wins.

    Daemon threads (not a ThreadPoolExecutor, which joins its threads at exit) let Ctrl-C
    end the process at once; partial files stay on disk and the next run resumes them.
    """
    results: list[Any] = [None] * len(items)
    errors: list[BaseException] = []
    lock = threading.Lock()
    pending = iter(range(len(items)))

    def worker() -> None:
        while True:
            with lock:
                index = None if errors else next(pending, None)
            if index is None:
                return
            try:
                results[index] = work(items[index])
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                with lock:
                    errors.append(exc)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(min(workers, len(items)))]
    for thread in threads:
        thread.start()
    for thread in threads:
        while thread.is_alive():
            thread.join(0.2)
    if errors:
        raise errors[0]
    return results


def _remaining(listing: Listing, snapshot: Path, have: Collection[str]) -> tuple[dict[str, int], int]:
    """(bytes of each partial file, bytes still to fetch) when the files in ``have`` are done."""
    partial = {f.path: layout.file_size(p) or 0 for f in listing.files
               if f.path not in have and (p := layout.partial_path(listing.hub, listing.repo_id, snapshot, f))}
    return partial, sum(f.size for f in listing.files if f.path not in have) - sum(partial.values())


def _disk_full(exc: BaseException) -> OSError | None:
    """The ENOSPC / EDQUOT error in ``exc``'s chain, if the disk filled up."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def _disk_full_error(client, listing: Listing, snapshot: Path) -> NotEnoughDisk:
    """The disk filled up mid-download: which disk, what is still needed; partial files stay."""
    done = {f.path for f in listing.files if layout.file_size(snapshot / f.path) == f.size}
    partials, need = _remaining(listing, snapshot, done)
    partial = sum(partials.values())
    where = client.cache
    while not where.exists() and where != where.parent:
        where = where.parent
    return NotEnoughDisk(
        f"the disk holding {client.cache} ({_mount_point(where)}) filled up while downloading {listing.repo_id}: "
        f"{human_bytes(max(need, 0))} more is needed; the {human_bytes(partial)} fetched are kept",
        "free some space (`qvl cached`, `qvl remove-cache`) and run the same command again to resume, or point "
        + ("HF_HOME" if listing.hub == HF else "MODELSCOPE_CACHE") + " at a bigger disk")


def _mount_point(path: Path) -> str:
    path = path.resolve()
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return f"mounted at {path}"


def _check_disk(need: int, cache: Path, listing: Listing) -> None:
    free = settings.free_bytes_override()
    if free is None:
        where = cache
        while not where.exists() and where != where.parent:
            where = where.parent
        free = shutil.disk_usage(where).free
    if need > free:
        raise NotEnoughDisk(
            f"{listing.repo_id} needs {human_bytes(need)} more on disk but only {human_bytes(free)} "
            f"is free under {cache}",
            "free some space (`qvl cached`, `qvl remove-cache --all-partial`) or point "
            + ("HF_HOME" if listing.hub == HF else "MODELSCOPE_CACHE") + " at a bigger disk")


def _write_manifest(listing: Listing, snapshot: Path, checked: list[tuple[RemoteFile, str]],
                    endpoint: str | None) -> None:
    """Record a complete, verified copy: every file with its size and sha256."""
    files = [{"path": f.path, "size": f.size, "sha256": sha,
              "checked": "sha256" if f.sha256 else ("git-sha1" if f.git_sha1 else "size")}
             for f, sha in checked]
    _manifest(listing, snapshot, endpoint, files, complete=True)


def _write_pending(listing: Listing, snapshot: Path, endpoint: str | None) -> None:
    """Before fetching: record the listing, so an interrupted copy is known to be partial."""
    current = layout.read_manifest(listing.hub, listing.repo_id, snapshot.name)
    if current is not None and current.get("complete", True) and current.get("commit") == listing.commit:
        return  # a verified record stays until the files are checked again
    files = [{"path": f.path, "size": f.size, "sha256": f.sha256, "git_sha1": f.git_sha1}
             for f in listing.files]
    _manifest(listing, snapshot, endpoint, files, complete=False)


def _manifest(listing: Listing, snapshot: Path, endpoint: str | None, files: list[dict], complete: bool) -> None:
    layout.write_manifest(listing.hub, listing.repo_id, snapshot.name, {
        "hub": listing.hub, "repo_id": listing.repo_id, "revision": listing.revision,
        "commit": listing.commit, "complete": complete, "endpoint": endpoint, "path": str(snapshot),
        "written_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "total_size": listing.total_size, "files": files,
    })


def _model(copy: LocalCopy, spec: ResolvedSpec | None, verified: bool) -> LocalModel:
    assert copy.snapshot is not None
    return LocalModel(copy.snapshot, copy.hub, copy.repo_id, copy.revision, copy.commit, verified, spec)
