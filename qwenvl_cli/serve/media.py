"""Media of an HTTP request, checked against the server's policy before anything is decoded.

A request can never make the server read a local file unless it was started with
``--allow-local-media DIR``, and then only inside DIR (``..`` and symlinks out of it are
refused by :func:`qwenvl_cli.media.sources.check_local`). Relative paths are taken relative to DIR.
http(s) URLs are fetched only with ``--allow-remote-media``, bounded in bytes and seconds.

Videos sent inline (``data:video/mp4;base64,...``, what `qvl chat` sends for a local clip) or
by URL are written to a private temporary folder that the request owns and removes.
"""

from __future__ import annotations

import contextlib
import mimetypes
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit


_VIDEO_SUFFIXES = {"video/mp4": ".mp4", "video/webm": ".webm", "video/quicktime": ".mov",
                   "video/x-matroska": ".mkv", "video/x-msvideo": ".avi"}


def policy_for(config: Any) -> Any:
    """The MediaPolicy of a ServerConfig."""
    from qwenvl_cli.media.sizing import FACTOR, IMAGE_MAX_TOKENS
    from qwenvl_cli.media.sources import MediaPolicy

    root = Path(config.allow_local_media).resolve() if config.allow_local_media else None
    return MediaPolicy(allow_local=root is not None, local_root=root,
                       allow_remote=bool(config.allow_remote_media),
                       max_bytes=config.max_body_bytes, timeout=config.media_timeout,
                       max_image_pixels=config.max_image_pixels, block_private=True,
                       max_item_pixels=config.max_pixels or IMAGE_MAX_TOKENS * FACTOR * FACTOR,
                       allow_domains=tuple(getattr(config, "allow_media_domains", ()) or ()))


def needs_fetch(messages: list[dict[str, Any]]) -> bool:
    """Whether any image or video part of ``messages`` is an http(s) URL (a fetch to wait for)."""
    for message in messages:
        for part in message.get("content") or ():
            if not isinstance(part, dict) or part.get("type") not in ("image", "video"):
                continue
            refs = part.get(part["type"])
            for ref in refs if isinstance(refs, list) else [refs]:
                if isinstance(ref, str) and ref[:8].lower().startswith(("http://", "https://")):
                    return True
    return False


class RequestMedia:
    """Resolves the media of one request; ``close()`` removes what it wrote."""

    def __init__(self, policy: Any) -> None:
        self.policy = policy
        self._tmp: Path | None = None
        self._count = 0
        self._labels: dict[Path, str] = {}  # a written file -> what the client sent

    def __enter__(self) -> RequestMedia:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def resolve(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """A copy of ``messages`` whose image / video references are checked source objects."""
        out = []
        for message in messages:
            parts = []
            for part in message["content"]:
                if part.get("type") == "image":
                    self._bounded(part, "image")
                    part = {**part, "image": self.image(part["image"])}
                    self._bounded(part, "image", (part["image"].width, part["image"].height))
                elif part.get("type") == "video":
                    self._bounded(part, "video frame")
                    part = {**part, "video": self.video(part["video"])}
                parts.append(part)
            out.append({**message, "content": parts})
        return out

    def _bounded(self, part: dict[str, Any], what: str, source: tuple[int, int] | None = None) -> None:
        """The part's sizing keys within the server's pixel bound (before any pixel is decoded)."""
        from qwenvl_cli.media.sizing import check_item_bounds

        from qwenvl_cli.media.sizing import FACTOR, VIDEO_MAX_TOKENS

        limit = self.policy.max_item_pixels
        if limit is not None:
            if what == "video frame":  # many frames: qwen-vl-utils' own per-frame ceiling
                limit = min(limit, VIDEO_MAX_TOKENS * FACTOR * FACTOR)
            check_item_bounds(part, limit, what, source)

    # --- one reference ----------------------------------------------------------------------

    def _local(self, ref: Any) -> Any:
        """A relative bare path is relative to the allowed folder, never to the server's cwd."""
        root = self.policy.local_root
        if isinstance(ref, str) and root is not None and ":" not in ref.split("/", 1)[0]:
            path = Path(ref)
            if not path.is_absolute() and not ref.startswith("~"):
                return str(root / path)
        return ref

    def image(self, ref: Any) -> Any:
        from qwenvl_cli.media.sources import resolve_image

        return resolve_image(self._local(ref), self.policy)

    def video(self, ref: Any) -> Any:
        from qwenvl_cli.media.sources import fetch_url, resolve_video

        if isinstance(ref, list):
            return resolve_video([self._local(r) for r in ref], self.policy)
        if isinstance(ref, str):
            scheme = urlsplit(ref).scheme.lower() if ":" in ref else ""
            if scheme == "data":
                return self._written(*_decode_video_uri(ref, self.policy.max_bytes))
            if scheme in ("http", "https"):
                data = fetch_url(ref, self.policy)
                suffix = Path(urlsplit(ref).path).suffix.lower() or ".mp4"
                return self._written(data, suffix, ref)
        return resolve_video(self._local(ref), self.policy)

    def _written(self, data: bytes, suffix: str, label: str) -> Any:
        from qwenvl_cli.media.sources import resolve_video

        if self._tmp is None:
            self._tmp = Path(tempfile.mkdtemp(prefix="qvl-request-"))
        self._count += 1
        path = self._tmp / f"video-{self._count}{suffix}"
        path.write_bytes(data)
        private = replace(self.policy, allow_local=True, local_root=self._tmp.resolve())
        self._labels[path] = label if len(label) <= 80 else label[:77] + "..."
        with self.scrubbed():
            source = resolve_video(str(path), private)
        return replace(source, source=label)

    @contextlib.contextmanager
    def scrubbed(self) -> Iterator[None]:
        """QvlErrors raised inside name what the client sent, never the server's temporary files."""
        from qwenvl_cli.errors import QvlError

        try:
            yield
        except QvlError as exc:
            if self._tmp is None or str(self._tmp) not in exc.message + (exc.hint or ""):
                raise
            message, hint = exc.message, exc.hint or ""
            for path, label in self._labels.items():
                for form in {str(path.resolve()), str(path)}:
                    message, hint = message.replace(form, label), hint.replace(form, label)
            for form in {str(self._tmp.resolve()), str(self._tmp)}:
                message, hint = message.replace(form, "<request folder>"), hint.replace(form, "<request folder>")
            raise type(exc)(message, hint) from None


def _decode_video_uri(ref: str, max_bytes: int) -> tuple[bytes, str, str]:
    """(bytes, file suffix, label) of a base64 video data URI (media.sources.decode_data_uri)."""
    from qwenvl_cli.media.sources import decode_data_uri

    data, mime, label = decode_data_uri(ref, "video", max_bytes)
    return data, _VIDEO_SUFFIXES.get(mime) or mimetypes.guess_extension(mime) or ".mp4", label
