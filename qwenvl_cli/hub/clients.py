"""Thin adapters over the two hub clients: list a revision, fetch one file, classify errors.

huggingface_hub and modelscope_hub do the transfers (their caches, their resume of
partial files, their locks); qvl drives them file by file so that it can show one
progress display, retry, verify and record what it got. Both SDKs are imported inside
the methods. Endpoints are read from the environment when a client is made (not when
the SDK was imported) and passed explicitly.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

from qwenvl_cli import settings
from qwenvl_cli.errors import (
    ChecksumMismatch,
    DownloadError,
    GatedRepo,
    HubUnreachable,
    QvlError,
    RepoNotFound,
    one_line,
)
from qwenvl_cli.hub import layout
from qwenvl_cli.hub.layout import HF, MS, Listing, RemoteFile
from qwenvl_cli.hub.progress import Progress

TRANSIENT_NAMES = {
    "ConnectError", "ConnectTimeout", "ReadTimeout", "WriteTimeout", "PoolTimeout", "TimeoutException",
    "RemoteProtocolError", "ReadError", "WriteError", "NetworkError", "ProtocolError", "Timeout",
    "ChunkedEncodingError", "ConnectionError", "ConnectionResetError", "TimeoutError",
    "IncompleteRead", "ServerError", "RateLimitError", "RequestTimeoutError",
}


def _names(exc: BaseException) -> set[str]:
    return {cls.__name__ for cls in type(exc).__mro__}


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    code = getattr(response, "status_code", None)
    return code if isinstance(code, int) else None


def _probe(url: str, timeout: float) -> str | None:
    """None when something answers HTTP at ``url``, else why not (refused, timeout, DNS)."""
    request = urllib.request.Request(url, method="HEAD", headers={"User-Agent": "qvl"})
    try:
        with urllib.request.urlopen(request, timeout=timeout):  # noqa: S310 - http(s) endpoint
            return None
    except urllib.error.HTTPError:
        return None  # it answered: reachable
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, (socket.timeout, TimeoutError)):
            return f"no answer within {timeout:g}s"
        return one_line(getattr(reason, "strerror", None) or reason, 120)
    except (socket.timeout, TimeoutError):
        return f"no answer within {timeout:g}s"
    except OSError as exc:
        return one_line(exc.strerror or exc, 120)
    except ValueError as exc:  # a malformed endpoint
        return one_line(exc, 120)


@contextlib.contextmanager
def forward_logs(note: Callable[[str], None], names: tuple[str, ...]) -> Iterator[None]:
    """Show the SDKs' warnings (retries, resumes) as qvl status lines instead of their own
    handlers' output, which would break the progress display; restore them after."""

    class Forward(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            note(f"{record.name.split('.')[0]}: {one_line(record.getMessage(), 200)}")

    saved = []
    handler = Forward(level=logging.WARNING)
    for name in names:
        logger = logging.getLogger(name)
        saved.append((logger, logger.handlers[:], logger.propagate, logger.level))
        logger.handlers = [handler]
        logger.propagate = False
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, handlers, propagate, level in saved:
            logger.handlers, logger.propagate = handlers, propagate
            logger.setLevel(level)


class HubClient:
    hub = ""
    label = ""
    token_hint = ""
    verifies_sha256 = False  # the client itself checks a fetched file against the listed sha256
    logger_names: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.endpoint = self._endpoint()
        self.cache = self._cache()

    def _endpoint(self) -> str:
        raise NotImplementedError

    def _cache(self) -> Path:
        raise NotImplementedError

    def probe_url(self, repo_id: str) -> str:
        raise NotImplementedError

    def load(self) -> None:
        """Import the SDK (it sets up its loggers on import; forward_logs comes after)."""

    def probe(self, repo_id: str) -> str | None:
        return _probe(self.probe_url(repo_id), settings.hub_timeout())

    def where(self) -> str:
        return f"{self.label} ({self.endpoint})"

    # --- errors -------------------------------------------------------------------------

    def classify(self, exc: BaseException, repo_id: str, revision: str) -> tuple[bool, QvlError] | None:
        """(transient?, the error to show) for a failure of this client; None when unknown."""
        names = _names(exc)
        status = _status(exc)
        if names & {"GatedRepoError", "AuthenticationError", "PermissionDeniedError"} or status in (401, 403):
            return False, GatedRepo(f"{repo_id} needs a {self.label} token: {self.token_hint}",
                                    "with a token, check that it has access to the repository "
                                    "(some repos ask you to accept their terms on the model page)")
        said = str(getattr(exc, "message", None) or exc).split("\n")[0].lower()  # not the URL's ?Revision=
        if names & {"RevisionNotFoundError"} or (names & {"NotExistError"} and "revision" in said):
            return False, RepoNotFound(f"{repo_id} has no revision {revision!r} on {self.where()}",
                                       "check --revision, or leave it out to use the catalogue's")
        if names & {"RepositoryNotFoundError", "NotExistError", "NotFoundError"} or status == 404:
            return False, RepoNotFound(f"{repo_id} was not found on {self.where()}",
                                       "check the spec with `qvl resolve`, and the mirror if you set one")
        if names & {"FileIntegrityError"}:
            return False, ChecksumMismatch(f"{repo_id}: {one_line(exc, 200)}",
                                           "the hub or mirror served damaged data; try again later")
        if status is not None and (status >= 500 or status in (408, 429)):
            return True, DownloadError(f"{self.label} answered HTTP {status}", "try again later")
        if names & TRANSIENT_NAMES or (names & {"LocalEntryNotFoundError"} and exc.__cause__ is not None):
            return True, HubUnreachable(f"connection to {self.where()} failed: {one_line(exc, 160)}",
                                        "check the network, or set a mirror")
        if "Consistency check failed" in str(exc):  # huggingface_hub: the body was cut short
            return True, DownloadError(one_line(exc, 200), "try again")
        if status is not None:
            return False, DownloadError(f"{self.label} answered HTTP {status} for {repo_id}", "try again later")
        return None

    # --- the work -----------------------------------------------------------------------

    def listing(self, repo_id: str, revision: str) -> Listing:
        raise NotImplementedError

    def snapshot(self, listing: Listing) -> Path:
        raise NotImplementedError

    def fetch(self, listing: Listing, file: RemoteFile, progress: Progress) -> None:
        raise NotImplementedError

    def discard(self, listing: Listing, file: RemoteFile) -> None:
        """Remove a file that failed its check so that it is neither used nor resumed."""
        raise NotImplementedError

    def finish(self, listing: Listing) -> None:
        """Record what the revision name points at, where the hub's layout does that."""


class HuggingFace(HubClient):
    hub = HF
    label = "Hugging Face"
    token_hint = "run `hf auth login` or set HF_TOKEN"
    logger_names = ("huggingface_hub",)

    def _endpoint(self) -> str:
        return settings.hf_endpoint()

    def _cache(self) -> Path:
        return settings.hf_hub_cache()

    def probe_url(self, repo_id: str) -> str:
        return f"{self.endpoint}/api/models/{repo_id}"

    def load(self) -> None:
        import huggingface_hub.file_download  # noqa: F401

    def listing(self, repo_id: str, revision: str) -> Listing:
        from huggingface_hub import HfApi
        from huggingface_hub.hf_api import RepoFile

        commit = revision if layout.COMMIT_RE.match(revision) else None
        if commit and (cached := layout.hf_tree_listing(repo_id, commit, revision)) is not None:
            return cached  # a commit never changes: the tree huggingface_hub cached is the listing
        api = HfApi(endpoint=self.endpoint)
        if commit is None:
            commit = api.repo_info(repo_id, revision=revision).sha
        entries = {e.path: e for e in api.list_repo_tree(repo_id, revision=commit, recursive=True)
                   if isinstance(e, RepoFile)}
        files = []
        for name in layout.needed_files(list(entries)):
            entry = entries[name]
            sha256 = entry.lfs.sha256 if entry.lfs is not None else None
            files.append(RemoteFile(name, entry.size, sha256, None if sha256 else entry.blob_id))
        return Listing(HF, repo_id, revision, commit, tuple(files))

    def snapshot(self, listing: Listing) -> Path:
        return layout.hf_repo_dir(listing.repo_id) / "snapshots" / str(listing.commit)

    def fetch(self, listing: Listing, file: RemoteFile, progress: Progress) -> None:
        """One file into the HF cache layout (blobs/<etag>, snapshots/<commit>/<path> -> blob).

        huggingface_hub >= 2 downloads into a per-process temporary file that it deletes on
        failure, so an interrupted `hf_hub_download` always starts over. qvl keeps the partial
        bytes in blobs/<etag>.incomplete (the name older clients used) and resumes them with
        a Range request through the client's own `http_get`, under the client's blob lock.
        Xet-stored files go through `hf_hub_download`, whose Xet transfer is chunk-cached.
        """
        from filelock import FileLock
        from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
        from huggingface_hub.file_download import http_get, is_xet_available
        from huggingface_hub.utils import build_hf_headers

        pointer = self.snapshot(listing) / file.path
        if pointer.exists():
            return
        url = hf_hub_url(listing.repo_id, file.path, revision=listing.commit, endpoint=self.endpoint)
        meta = get_hf_file_metadata(url, endpoint=self.endpoint, library_name="qvl")
        if meta.xet_file_data is not None and is_xet_available():
            hf_hub_download(listing.repo_id, file.path, revision=listing.commit, endpoint=self.endpoint,
                            cache_dir=str(self.cache), tqdm_class=_tqdm_class(progress, file.path))
            return
        etag = meta.etag or file.etag
        repo_dir = layout.hf_repo_dir(listing.repo_id)
        blob = repo_dir / "blobs" / str(etag)
        lock = self.cache / ".locks" / repo_dir.name / f"{etag}.lock"
        lock.parent.mkdir(parents=True, exist_ok=True)
        blob.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(lock)):
            if not blob.exists():
                partial = blob.with_name(blob.name + ".incomplete")
                if (layout.file_size(partial) or 0) > (meta.size or file.size):
                    partial.unlink()  # longer than the file: not a prefix of it
                with partial.open("ab") as out:
                    http_get(meta.location, out, resume_size=out.tell(), expected_size=meta.size,
                             headers=build_hf_headers(library_name="qvl"), displayed_filename=file.path,
                             tqdm_class=_tqdm_class(progress, file.path))
                partial.chmod(0o644)
                os.replace(partial, blob)
            pointer.parent.mkdir(parents=True, exist_ok=True)
            if not pointer.exists():
                _link(blob, pointer)

    def discard(self, listing: Listing, file: RemoteFile) -> None:
        link = self.snapshot(listing) / file.path
        with contextlib.suppress(OSError):
            link.resolve().unlink()
        with contextlib.suppress(OSError):
            link.unlink()
        partial = layout.hf_partial_path(listing.repo_id, file)
        if partial is not None:
            partial.unlink(missing_ok=True)

    def finish(self, listing: Listing) -> None:
        if listing.commit and listing.revision != listing.commit:
            ref = layout.hf_repo_dir(listing.repo_id) / "refs" / listing.revision
            ref.parent.mkdir(parents=True, exist_ok=True)
            tmp = ref.with_name(ref.name + ".qvl-tmp")
            tmp.write_text(listing.commit)
            tmp.replace(ref)


class ModelScope(HubClient):
    hub = MS
    label = "ModelScope"
    verifies_sha256 = True  # download_file(expected_sha256=...) hashes, retries, then raises
    token_hint = "run `modelscope login --token TOKEN` or set MODELSCOPE_API_TOKEN"
    logger_names = ("modelscope_hub",)

    def _endpoint(self) -> str:
        return settings.modelscope_endpoint()

    def _cache(self) -> Path:
        return settings.modelscope_cache()

    def probe_url(self, repo_id: str) -> str:
        return f"{self.endpoint}/api/v1/models/{repo_id}"

    def load(self) -> None:
        self._api()

    def _api(self):
        if getattr(self, "_hub_api", None) is not None:
            return self._hub_api
        import modelscope_hub._download as ms_download
        from modelscope_hub import HubApi

        # modelscope_hub draws its own tqdm bar for every file, unconditionally, and it
        # would tear through qvl's display (and fill logs with carriage returns). qvl
        # reports progress through the client's progress_callbacks instead.
        if getattr(ms_download, "tqdm", None) is not _SilentBar:
            ms_download.tqdm = _SilentBar
        self._hub_api = HubApi(endpoint=self.endpoint)
        return self._hub_api

    def listing(self, repo_id: str, revision: str) -> Listing:
        raw = self._api().legacy.list_repo_files(repo_id=repo_id, repo_type="model",
                                                 revision=revision, recursive=True)
        entries = {e.get("Path") or e.get("Name"): e for e in raw if e.get("Type", "blob") != "tree"}
        commit = next((e.get("Revision") for e in raw if e.get("Revision")), None)
        files = tuple(RemoteFile(name, int(entries[name].get("Size") or 0), entries[name].get("Sha256") or None)
                      for name in layout.needed_files([n for n in entries if n]))
        return Listing(MS, repo_id, revision, commit, files)

    def snapshot(self, listing: Listing) -> Path:
        return layout.ms_snapshot(listing.repo_id, listing.revision)

    def fetch(self, listing: Listing, file: RemoteFile, progress: Progress) -> None:
        self._api().downloader.download_file(
            repo_id=listing.repo_id, repo_type="model", file_path=file.path, revision=listing.revision,
            cache_dir=self.cache, expected_sha256=file.sha256, file_size=file.size,
            progress_callbacks=[_callback_class(progress, file.path)])

    def discard(self, listing: Listing, file: RemoteFile) -> None:
        target = self.snapshot(listing) / file.path
        target.unlink(missing_ok=True)
        layout.ms_partial_path(self.snapshot(listing), file).unlink(missing_ok=True)


def _link(blob: Path, pointer: Path) -> None:
    """A relative symlink from the snapshot to the blob, as huggingface_hub makes it (a copy
    where the file system has no symlinks)."""
    try:
        pointer.unlink(missing_ok=True)
        os.symlink(os.path.relpath(blob, pointer.parent), pointer)
    except OSError:
        shutil.copyfile(blob, pointer)


def client_for(hub: str) -> HubClient:
    return HuggingFace() if hub == HF else ModelScope()


# --- progress adapters ------------------------------------------------------------------


def _tqdm_class(progress: Progress, name: str) -> type:
    """A tqdm look-alike for huggingface_hub's per-file bar, feeding qvl's display."""

    class Bar:
        def __init__(self, *args, total: int | None = None, initial: int = 0, **kwargs) -> None:
            self.open = True
            progress.start_file(name, total, initial or 0)

        def update(self, n: float | None = 1) -> None:
            if n:
                progress.advance(name, int(n))

        def close(self) -> None:
            if self.open:
                self.open = False
                progress.end_file(name)

        def set_postfix_str(self, *args, **kwargs) -> None:
            pass

        def refresh(self, *args, **kwargs) -> None:
            pass

        def __enter__(self) -> Bar:
            return self

        def __exit__(self, *exc) -> None:
            self.close()

    return Bar


def _callback_class(progress: Progress, name: str) -> type:
    """A modelscope_hub ProgressCallback class, feeding qvl's display."""
    from modelscope_hub import ProgressCallback

    class Callback(ProgressCallback):
        def __init__(self, filename: str, file_size: int) -> None:
            super().__init__(filename, file_size)
            progress.start_file(name, file_size or None, 0)

        def update(self, size: int) -> None:
            progress.advance(name, size)

        def end(self) -> None:
            progress.end_file(name)

    return Callback


class _SilentBar:
    """Stands in for tqdm inside modelscope_hub's downloader."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def update(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> _SilentBar:
        return self

    def __exit__(self, *exc) -> None:
        pass
