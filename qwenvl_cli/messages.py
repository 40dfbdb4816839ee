"""The conversation and its content parts; OpenAI parts <-> Qwen parts.

A conversation is a list of plain dicts in Qwen's own format (what the chat template and
qwen-vl-utils take)::

    {"role": "user", "content": [{"type": "image", "image": "x.jpg", "max_pixels": 1003520},
                                 {"type": "text", "text": "What is this?"}]}

This module converts the OpenAI chat format into it, validates it (a bad request becomes
one UsageError line, never a traceback), applies default media options to the parts that
do not set their own, and converts back to OpenAI parts for talking to a remote server.
It imports nothing heavy.
"""

from __future__ import annotations

import base64
import mimetypes
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from qwenvl_cli.errors import UsageError

ROLES = ("system", "user", "assistant")
IMAGE_OPTIONS = ("min_pixels", "max_pixels", "resized_height", "resized_width")
VIDEO_OPTIONS = (*IMAGE_OPTIONS, "fps", "nframes", "max_frames", "min_frames",
                 "video_start", "video_end", "total_pixels")
_MEDIA_KINDS = {"image": ("image", IMAGE_OPTIONS), "image_url": ("image", IMAGE_OPTIONS),
                "video": ("video", VIDEO_OPTIONS), "video_url": ("video", VIDEO_OPTIONS)}

Message = dict[str, Any]


class BadMessage(UsageError):
    """A message or content part that cannot be understood."""


def _url_of(value: Any, kind: str, where: str) -> Any:
    """``{"url": X}`` or a bare X -> X (a string, or a list of frames for videos)."""
    if isinstance(value, Mapping):
        if "url" not in value:
            raise BadMessage(f"{where}: {kind} needs a 'url'", f'send {{"type": "{kind}", "{kind}": {{"url": "..."}}}}')
        value = value["url"]
    if kind.startswith("video") and isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return list(value)
    if not isinstance(value, str) or not value.strip():
        raise BadMessage(f"{where}: {kind} must be a URL, a data URI or a path", "check the request body")
    return value


def _options(part: Mapping[str, Any], names: Iterable[str], where: str) -> dict[str, Any]:
    out = {}
    for name in names:
        if name in part and part[name] is not None:
            value = part[name]
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise BadMessage(f"{where}: {name} must be a number, not {value!r}", "check the request body")
            out[name] = value
    return out


def part_from_openai(part: Any, where: str) -> dict[str, Any]:
    """One OpenAI (or Qwen) content part -> one Qwen part."""
    if isinstance(part, str):
        return {"type": "text", "text": part}
    if not isinstance(part, Mapping):
        raise BadMessage(f"{where}: a content part must be an object, not {type(part).__name__}",
                         "send parts like {\"type\": \"text\", \"text\": \"...\"}")
    kind = part.get("type")
    if kind in ("input_text", "output_text"):  # the Responses API's parts, accepted in chat too
        kind = "text"
    if kind == "input_image":
        part = {**part, "type": "image_url"}
        kind = "image_url"
    kind = kind or next((k for k in ("text", "image", "image_url", "video", "video_url")
                                     if k in part), None)
    if kind == "text":
        text = part.get("text")
        if not isinstance(text, str):
            raise BadMessage(f"{where}: a text part needs a string 'text'", "check the request body")
        return {"type": "text", "text": text}
    if kind in _MEDIA_KINDS:
        media, options = _MEDIA_KINDS[kind]
        other = f"{media}_url" if kind == media else media  # "image" and "image_url" name the same thing
        source = part.get(kind, part.get(other))
        nested = source if isinstance(source, Mapping) else {}
        return {"type": media, media: _url_of(source, kind, where),
                **_options({**nested, **part}, options, where)}
    raise BadMessage(f"{where}: unsupported content part type {kind!r}",
                     "use text, image_url or video_url parts")


def from_openai(messages: Any, require_user: bool = True) -> list[Message]:
    """Validate an OpenAI ``messages`` list and return it in Qwen's format (the server
    accepts a system-only conversation, as OpenAI and vLLM do: ``require_user`` False)."""
    if not isinstance(messages, list) or not messages:
        raise BadMessage("'messages' must be a non-empty list", "send at least one user message")
    out: list[Message] = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, Mapping):
            raise BadMessage(f"{where} must be an object", "check the request body")
        role = msg.get("role")
        if role == "developer":
            role = "system"
        if role not in ROLES:
            raise BadMessage(f"{where}: unsupported role {role!r}", "roles are system, user and assistant")
        content = msg.get("content")
        if content is None:
            content = []
        if isinstance(content, str):
            parts = [{"type": "text", "text": content}]
        elif isinstance(content, list):
            parts = [part_from_openai(p, f"{where}.content[{j}]") for j, p in enumerate(content)]
        else:
            raise BadMessage(f"{where}: content must be a string or a list of parts", "check the request body")
        if role != "user" and any(p["type"] != "text" for p in parts):
            raise BadMessage(f"{where}: only user messages may carry images or videos",
                             "move the media into a user message")
        out.append({"role": role, "content": parts})
    if require_user and all(m["role"] != "user" for m in out):
        raise BadMessage("the conversation has no user message", "add a user message")
    return out


def with_defaults(messages: list[Message], image: Mapping[str, Any] | None = None,
                  video: Mapping[str, Any] | None = None) -> list[Message]:
    """A copy where every image / video part gets the defaults it does not set itself."""
    image = {k: v for k, v in (image or {}).items() if v is not None}
    video = {k: v for k, v in (video or {}).items() if v is not None}
    out = []
    for msg in messages:
        parts = []
        for part in msg["content"]:
            if part.get("type") == "image":
                part = {**image, **part}
            elif part.get("type") == "video":
                part = {**video, **part}
            parts.append(part)
        out.append({**msg, "content": parts})
    return out


def user_message(text: str, images: Iterable[Any] = (), videos: Iterable[Any] = ()) -> Message:
    """A user turn: images first, then videos, then the text (as the Qwen README orders them)."""
    parts: list[dict[str, Any]] = [{"type": "image", "image": i} for i in images]
    parts += [{"type": "video", "video": v} for v in videos]
    if text:
        parts.append({"type": "text", "text": text})
    return {"role": "user", "content": parts}


def text_message(role: str, text: str) -> Message:
    return {"role": role, "content": [{"type": "text", "text": text}]}


def text_of(message: Message) -> str:
    return "".join(p.get("text", "") for p in message["content"] if p.get("type") == "text")


def media_count(messages: list[Message]) -> tuple[int, int]:
    images = sum(1 for m in messages for p in m["content"] if p.get("type") == "image")
    videos = sum(1 for m in messages for p in m["content"] if p.get("type") == "video")
    return images, videos


# --- Qwen -> OpenAI (for talking to a remote server) ----------------------------------


def local_path(ref: str) -> Path | None:
    """The local file a media reference names (a path or file:// URL), else None (URL, data URI)."""
    if ref.startswith("file://"):
        return Path(ref[len("file://"):])
    if "://" in ref or ref.startswith("data:"):
        return None
    return Path(ref).expanduser()


def data_uri(path: Path, default_mime: str) -> str:
    mime = mimetypes.guess_type(path.name)[0] or default_mime
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def to_openai(messages: list[Message], inline_local: bool = True) -> list[dict[str, Any]]:
    """Qwen format -> OpenAI format. Local files become data URIs (a remote server cannot
    read the client's disk); frame lists are sent as lists of data URIs."""

    def url(ref: str, mime: str) -> str:
        path = local_path(ref)
        return data_uri(path, mime) if inline_local and path is not None else ref

    out = []
    for msg in messages:
        parts = []
        for part in msg["content"]:
            kind = part.get("type")
            if kind == "text":
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image":
                extras = {k: part[k] for k in IMAGE_OPTIONS if k in part}
                parts.append({"type": "image_url", "image_url": {"url": url(part["image"], "image/png")}, **extras})
            elif kind == "video":
                extras = {k: part[k] for k in VIDEO_OPTIONS if k in part}
                ref = part["video"]
                value = [url(r, "image/jpeg") for r in ref] if isinstance(ref, list) else url(ref, "video/mp4")
                parts.append({"type": "video_url", "video_url": {"url": value}, **extras})
        if msg["role"] != "user" and all(p["type"] == "text" for p in parts):
            out.append({"role": msg["role"], "content": "".join(p["text"] for p in parts)})
        else:
            out.append({"role": msg["role"], "content": parts})
    return out
