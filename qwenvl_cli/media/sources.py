"""Images and videos in: references checked at the edge, before any model is loaded.

``resolve_image`` takes a local path, a ``file://`` URL, an ``http(s)://`` URL, a
``data:image/...;base64,...`` URI or a PIL image; ``resolve_video`` a video file (mp4,
webm, mkv, mov, avi, ...), a directory of frame images or a list of frame references.
Both check cheaply (the file exists and is a file, the image header parses and the image
decodes, the pixel count is under a limit, the video has a decodable frame) and return a
small frozen value object, or raise :class:`~qwenvl_cli.errors.MediaError` with one line and
a hint. A :class:`MediaPolicy` says what may be read: the chat CLI allows local files and
URLs; an HTTP server should refuse local files (or confine them to ``local_root``).

Turning resolved media into model inputs is :mod:`qwenvl_cli.media.vision`. PIL and PyAV are
imported inside the functions.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import io
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from qwenvl_cli.errors import MediaError, one_line

DEFAULT_MAX_BYTES = 64 * 1024 * 1024  # a fetched body or a decoded data URI
DEFAULT_TIMEOUT = 10.0  # seconds for a whole URL fetch
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485  # PIL's own decompression-bomb threshold
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
IMAGE_HINT = "pass a PNG, JPEG, WebP, GIF, BMP or TIFF image"
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):(//)?")


@dataclass(frozen=True)
class MediaPolicy:
    """What a request may read. The defaults are the chat CLI's: local files and URLs."""

    allow_local: bool = True
    local_root: Path | None = None  # when set, local files must lie inside (symlinks resolved)
    allow_remote: bool = True
    max_bytes: int = DEFAULT_MAX_BYTES
    timeout: float = DEFAULT_TIMEOUT
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    block_private: bool = False  # refuse URLs resolving to loopback / private / link-local addresses
    allow_domains: tuple[str, ...] = ()  # hosts exempt from block_private
    max_item_pixels: int | None = None  # a request's image / frame, after resizing (the server's bound)


PERMISSIVE = MediaPolicy()


@dataclass(frozen=True)
class ImageSource:
    """A checked image: where it comes from, its format and original size."""

    source: str  # for messages: the path, the URL, or "data:image/png;base64 (N bytes)"
    kind: str  # "path", "url", "data" or "pil"
    width: int
    height: int
    format: str | None
    path: Path | None = None
    data: bytes | None = field(default=None, repr=False)
    image: Any = field(default=None, repr=False, compare=False)

    def open(self) -> Any:
        """The image as PIL opens it (lazily decoded), from its file, bytes or object."""
        from PIL import Image

        if self.image is not None:
            return self.image
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(self.path if self.path is not None else io.BytesIO(self.data))


@dataclass(frozen=True)
class VideoSource:
    """A checked video: a file (with its container metadata) or a list of frame images."""

    source: str
    kind: str  # "file" or "frames"
    width: int
    height: int
    path: Path | None = None
    frames: tuple[ImageSource, ...] = ()
    fps: float | None = None
    total_frames: int | None = None  # the container's count; 0 when it records none
    duration: float | None = None
    codec: str | None = None


# --- references ---------------------------------------------------------------------------


def _scheme(ref: str) -> str | None:
    """The URL scheme of ``ref``: only ``data:`` or a ``name://`` prefix counts, so that
    ``C:\\x.png`` and a file named ``a:b.png`` stay paths."""
    match = _SCHEME.match(ref)
    if not match or not (match.group(2) or match.group(1).lower() == "data"):
        return None
    return match.group(1).lower()


def _short(ref: str, limit: int = 80) -> str:
    return one_line(ref, limit)


def _unsupported_scheme(scheme: str, what: str) -> MediaError:
    return MediaError(f"unsupported URL scheme '{scheme}:' for an {what}",
                      "use a local path, file://, http(s):// or data:image/...;base64,...")


def _file_url_path(ref: str) -> Path:
    parts = urlsplit(ref)
    if parts.netloc not in ("", "localhost"):
        raise MediaError(f"file URL with a remote host: {_short(ref)}",
                         "use file:///absolute/path or a plain path")
    return Path(unquote(parts.path))


def check_local(path: Path, policy: MediaPolicy, what: str = "image file") -> Path:
    """``path`` (user-expanded) if policy allows it, it exists and is a file; else MediaError."""
    if not policy.allow_local:
        raise MediaError(f"local files are not allowed here: {path}",
                         "start the server with --allow-local-media DIR to let it read files inside DIR, "
                         "or send the media inline as a data: URI")
    path = Path(os.path.expanduser(str(path)))
    if policy.local_root is not None:
        root = Path(policy.local_root).resolve()
        if not path.resolve().is_relative_to(root):
            raise MediaError(f"{path} is outside the allowed media folder {root}",
                             "place the file inside that folder (symlinks out of it are refused)")
    if not path.exists():
        raise MediaError(f"no such file: {path}", _closest_hint(path))
    if path.is_dir() and what != "video":
        raise MediaError(f"{path} is a directory, not an {what}",
                         "pass one file; a directory of frame images can be passed as a video")
    if not os.access(path, os.R_OK):
        raise MediaError(f"cannot read {path}: permission denied", "check the file's permissions")
    return path


def _closest_hint(path: Path) -> str:
    try:
        names = os.listdir(path.parent if str(path.parent) else ".")
    except OSError:
        return "check the path"
    close = difflib.get_close_matches(path.name, names, n=1, cutoff=0.6)
    return f"did you mean {path.parent / close[0]}?" if close else "check the path"


# --- images -------------------------------------------------------------------------------


def _reference_text(ref: Any, what: str, hint: str) -> str:
    """A path-like or string reference as stripped text; MediaError for anything else."""
    if isinstance(ref, os.PathLike):
        ref = os.fspath(ref)
    if not isinstance(ref, str) or not ref.strip():
        raise MediaError(f"not {what}: {_short(repr(ref))}", hint)
    return ref.strip()


def resolve_image(ref: Any, policy: MediaPolicy = PERMISSIVE) -> ImageSource:
    """Check an image reference and return an :class:`ImageSource` (MediaError when bad)."""
    if isinstance(ref, ImageSource):
        return ref
    if hasattr(ref, "size") and hasattr(ref, "mode") and hasattr(ref, "convert"):
        width, height = ref.size
        _check_pixels(width, height, "the image", policy)
        return ImageSource("<PIL image>", "pil", width, height, getattr(ref, "format", None), image=ref)
    if isinstance(ref, dict) and "url" in ref:  # OpenAI's {"url": ...}
        ref = ref["url"]
    ref = _reference_text(ref, "an image reference",
                          "give a path, a file:// or http(s):// URL, or a data:image/...;base64 URI")
    scheme = _scheme(ref)
    if scheme in ("http", "https"):
        data = fetch_url(ref, policy)
        return _probe_bytes(data, ref, "url", policy)
    if scheme == "data":
        data, _mime, label = decode_data_uri(ref, "image", policy.max_bytes)
        return _probe_bytes(data, label, "data", policy)
    if scheme == "file":
        return _probe_path(check_local(_file_url_path(ref), policy), policy)
    if scheme is not None:
        raise _unsupported_scheme(scheme, "image")
    return _probe_path(check_local(Path(ref), policy), policy)


def _check_pixels(width: int, height: int, label: str, policy: MediaPolicy) -> None:
    if width <= 0 or height <= 0:
        raise MediaError(f"{label} has no pixels ({width}x{height})", IMAGE_HINT)
    if width * height > policy.max_image_pixels:
        raise MediaError(f"{label} is {width}x{height} = {width * height / 1e6:.0f} megapixels, above the "
                         f"limit of {policy.max_image_pixels / 1e6:.0f} megapixels (decompression bomb?)",
                         "downscale the image before passing it")


def _probe_path(path: Path, policy: MediaPolicy) -> ImageSource:
    size = path.stat().st_size
    if size == 0:
        raise MediaError(f"{path} is empty (0 bytes)", IMAGE_HINT)
    with open(path, "rb") as handle:
        head = handle.read(64)
        handle.seek(0)
        width, height, fmt = _probe(handle, str(path), head, policy)
    return ImageSource(str(path), "path", width, height, fmt, path=path)


def _probe_bytes(data: bytes, label: str, kind: str, policy: MediaPolicy) -> ImageSource:
    if not data:
        raise MediaError(f"{label} is empty (0 bytes)", IMAGE_HINT)
    width, height, fmt = _probe(io.BytesIO(data), label, data[:64], policy)
    return ImageSource(label, kind, width, height, fmt, data=data)


def _bomb_error(label: str, exc: Exception, policy: MediaPolicy) -> MediaError:
    """qvl's pixel-limit message for an image PIL would not even open (its text names the size:
    "Image size (3600000000 pixels) exceeds limit of ...")."""
    import re

    found = re.search(r"\((\d+) pixels\)", str(exc))
    size = f"{int(found.group(1)) / 1e6:,.0f} megapixels" if found else "too many pixels"
    return MediaError(f"{label} is {size}, above the limit of {policy.max_image_pixels / 1e6:.0f} megapixels "
                      "(decompression bomb?)", "downscale the image before passing it")


def _probe(handle: Any, label: str, head: bytes, policy: MediaPolicy) -> tuple[int, int, str | None]:
    """Parse the header, check the pixel count, then check the data decodes (cheaply)."""
    from PIL import Image, UnidentifiedImageError

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(handle)
        except Image.DecompressionBombError as exc:  # past twice PIL's limit: it refuses to open it
            raise _bomb_error(label, exc, policy) from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
            raise MediaError(f"{label} is not an image{_sniff(head)}", IMAGE_HINT) from None
        width, height = image.size
        _check_pixels(width, height, label, policy)
        fmt = image.format
        try:
            if fmt == "JPEG":  # decode at 1/8 scale: reads every byte, costs little
                image.draft("RGB", (max(1, width // 8), max(1, height // 8)))
                image.load()
            elif fmt == "PNG":  # checks every chunk's CRC, through the last one
                image.verify()
            else:
                image.load()
        except Exception as exc:  # noqa: BLE001 - PIL raises OSError, SyntaxError, struct.error...
            raise MediaError(f"{label} is truncated or corrupt ({fmt}: {one_line(exc, 100)})",
                             "re-save or re-download the image") from None
    return width, height, fmt


_IMAGE_MAGIC = ((b"\x89PNG", "PNG"), (b"\xff\xd8", "JPEG"), (b"GIF8", "GIF"), (b"BM", "BMP"),
                (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"))


def _sniff(head: bytes) -> str:
    """A hint of what a file that PIL cannot open is."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return " (a WebP header, but the data is truncated or corrupt)"
    for magic, name in _IMAGE_MAGIC:
        if head.startswith(magic):
            return f" (a {name} header, but the data is truncated or corrupt)"
    if head[4:8] == b"ftyp" or head[:4] == b"\x1a\x45\xdf\xa3" or (head[:4] == b"RIFF" and head[8:11] == b"AVI"):
        return " (it looks like a video; pass it as a video)"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return ""
    return " (it is a text file)" if all(c.isprintable() or c.isspace() for c in text) else ""


_DATA_HINTS = {"image": ("use data:image/png;base64,<data> (or jpeg, webp, ...)", "pass a smaller image"),
               "video": ("send data:video/mp4;base64,<data>, or a list of frame images", "send a shorter clip")}


def decode_data_uri(ref: str, kind: str, max_bytes: int) -> tuple[bytes, str, str]:
    """A base64 ``data:image/...`` (``kind`` "image") or ``data:video/...`` ("video") URI ->
    (bytes, mime type, label for messages); MediaError for anything else or over ``max_bytes``."""
    header, sep, payload = ref.partition(",")
    mime = header[5:].split(";")[0].lower() or "text/plain"
    usage, smaller = _DATA_HINTS[kind]
    if not sep or not mime.startswith(f"{kind}/") or ";base64" not in header.lower():
        what = "data URI" if kind == "image" else f"{kind} data URI"
        raise MediaError(f"unsupported {what} ({_short(header, 40)}): only base64 {kind}s are read", usage)
    if len(payload) > max_bytes * 4 // 3 + 4:
        raise MediaError(f"{kind} data URI of {len(payload)} characters is above the {max_bytes} byte limit", smaller)
    try:
        data = base64.b64decode(payload)
    except (binascii.Error, ValueError) as exc:
        raise MediaError(f"{kind} data URI is not valid base64: {one_line(exc, 80)}",
                         f"encode the {kind} with base64 (standard alphabet)") from None
    return data, mime, f"data:{mime};base64 ({len(data)} bytes)"


# --- URLs ---------------------------------------------------------------------------------


def fetch_url(url: str, policy: MediaPolicy = PERMISSIVE) -> bytes:
    """GET ``url`` within the policy's total time, size, redirect and address limits
    (:mod:`qwenvl_cli.media.fetch`); MediaError on any failure."""
    from qwenvl_cli.media.fetch import fetch

    if not policy.allow_remote:
        raise MediaError(f"remote URLs are not allowed here: {_short(url)}",
                         "start the server with --allow-remote-media to let it fetch URLs, "
                         "or send the media inline as a data: URI")
    return fetch(url, policy, _short(url))


# --- videos -------------------------------------------------------------------------------


def resolve_video(ref: Any, policy: MediaPolicy = PERMISSIVE) -> VideoSource:
    """Check a video reference (file, directory of frames, list of frames) -> VideoSource."""
    if isinstance(ref, VideoSource):
        return ref
    if isinstance(ref, (list, tuple)):
        return _frame_list([resolve_image(item, policy) for item in ref], f"{len(ref)} frames")
    ref = _reference_text(ref, "a video reference",
                          "give a video file, a directory of frame images or a list of frames")
    scheme = _scheme(ref)
    if scheme == "file":
        path = _file_url_path(ref)
    elif scheme is not None:
        raise MediaError(f"videos are read from local files, not '{scheme}:' URLs: {_short(ref)}",
                         "download the video and pass the file, or pass a list of frame URLs")
    else:
        path = Path(ref)
    path = check_local(path, policy, what="video")
    if path.is_dir():
        return _frame_directory(path, policy)
    return _video_file(path, policy)


def _frame_directory(path: Path, policy: MediaPolicy) -> VideoSource:
    names = sorted((p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()),
                   key=lambda p: _natural_key(p.name))
    if not names:
        raise MediaError(f"directory {path} holds no frame images ({', '.join(IMAGE_EXTENSIONS)})",
                         "pass a video file, or a directory of frame images")
    return _frame_list([resolve_image(str(p), policy) for p in names], str(path))


def _natural_key(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def _frame_list(frames: list[ImageSource], label: str) -> VideoSource:
    if not frames:
        raise MediaError("an empty list of frames is not a video", "pass at least one frame image")
    return VideoSource(label, "frames", frames[0].width, frames[0].height, frames=tuple(frames))


def _video_file(path: Path, policy: MediaPolicy) -> VideoSource:
    from qwenvl_cli.media import video

    if path.stat().st_size == 0:
        raise MediaError(f"{path} is empty (0 bytes)", "pass an mp4, webm, mkv, mov or avi file")
    info = video.probe(path)
    _check_pixels(info.width, info.height, f"{path} (video frames)", policy)
    return VideoSource(str(path), "file", info.width, info.height, path=path, fps=info.fps,
                       total_frames=info.frames, duration=info.duration, codec=info.codec)
