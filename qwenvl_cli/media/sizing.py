"""Pure sizing and sampling arithmetic for images and videos, as qwen-vl-utils 0.0.14 does it.

Nothing here opens a file or imports a heavy library, so the CLI can plan sizes and count
visual tokens (for ``--verbose`` and memory checks) before any model is loaded. The rules
are restated from the qwen-vl-utils behaviour (facts, not code): see docs/media.md.

One visual token covers a 28x28 pixel block (14 px patches merged 2x2); two video frames
form one temporal patch.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

from qwenvl_cli.errors import MediaError

PATCH_SIZE = 14
MERGE_SIZE = 2
FACTOR = PATCH_SIZE * MERGE_SIZE  # 28: both sides of a resized image are multiples of it
MAX_RATIO = 200

IMAGE_MIN_TOKENS = 4
IMAGE_MAX_TOKENS = 16384
VIDEO_MIN_TOKENS = 128
VIDEO_MAX_TOKENS = 768

FPS = 2.0
FRAME_FACTOR = 2
FPS_MIN_FRAMES = 4
FPS_MAX_FRAMES = 768
MODEL_SEQ_LEN = 128000  # qwen-vl-utils reads $MODEL_SEQ_LEN for the video pixel budget


def round_by(number: float, factor: int) -> int:
    """The multiple of ``factor`` nearest to ``number`` (Python rounding: halves go to even)."""
    return round(number / factor) * factor


def ceil_by(number: float, factor: int) -> int:
    return math.ceil(number / factor) * factor


def floor_by(number: float, factor: int) -> int:
    return math.floor(number / factor) * factor


def smart_resize(height: float, width: float, factor: int = FACTOR,
                 min_pixels: float | None = None, max_pixels: float | None = None) -> tuple[int, int]:
    """(height, width) rounded to multiples of ``factor`` with an area in [min, max] pixels.

    The aspect ratio is kept as closely as possible; ratios above 200 are refused.
    Defaults are qwen-vl-utils' image bounds (4 and 16384 tokens of ``factor`` squared).
    """
    max_pixels = IMAGE_MAX_TOKENS * factor ** 2 if max_pixels is None else max_pixels
    min_pixels = IMAGE_MIN_TOKENS * factor ** 2 if min_pixels is None else min_pixels
    if max_pixels < min_pixels:
        raise MediaError(f"min_pixels ({min_pixels:g}) is above max_pixels ({max_pixels:g})",
                         "lower --min-pixels or raise --max-pixels")
    if min(height, width) <= 0:
        raise MediaError(f"cannot size an image of {width}x{height} pixels", "pass a non-empty image")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_RATIO:
        raise MediaError(f"aspect ratio {ratio:.0f}:1 ({width}x{height}) is above {MAX_RATIO}:1",
                         "crop the image to a less extreme shape")
    h_bar = max(factor, round_by(height, factor))
    w_bar = max(factor, round_by(width, factor))
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = floor_by(height / beta, factor)
        w_bar = floor_by(width / beta, factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = ceil_by(height * beta, factor)
        w_bar = ceil_by(width * beta, factor)
    return h_bar, w_bar


def image_size(width: int, height: int, opts: Mapping[str, Any],
               patch_size: int = PATCH_SIZE) -> tuple[int, int]:
    """The (height, width) an image is resized to, given an item's sizing keys.

    ``resized_height`` + ``resized_width`` win over ``min_pixels`` / ``max_pixels``; they
    are themselves snapped with the default bounds.
    """
    factor = patch_size * MERGE_SIZE
    if "resized_height" in opts and "resized_width" in opts:
        return smart_resize(opts["resized_height"], opts["resized_width"], factor)
    return smart_resize(height, width, factor,
                        opts.get("min_pixels", IMAGE_MIN_TOKENS * factor ** 2),
                        opts.get("max_pixels", IMAGE_MAX_TOKENS * factor ** 2))


_SIZING_KEYS = ("min_pixels", "max_pixels", "resized_height", "resized_width", "total_pixels",
                "fps", "nframes", "min_frames", "max_frames")


def check_item_bounds(opts: Mapping[str, Any], limit: int, what: str,
                      source: tuple[int, int] | None = None) -> None:
    """Refuse an item's sizing keys that a server must not honour, before any pixel exists.

    Every key is a finite positive number; ``min_pixels`` / ``max_pixels`` /
    ``resized_height x resized_width`` at most ``limit`` pixels; and, given the source's
    (width, height), the size it would be resized to within ``limit`` too (the upscale that
    ``min_pixels`` asks for is counted, not only the source).
    """
    tokens = limit // (FACTOR * FACTOR)
    hint = f"lower it: this server allows at most {limit} pixels ({tokens} visual tokens) per {what}"
    for key in _SIZING_KEYS:
        if key in opts:
            value = opts[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value <= 0:
                raise MediaError(f"'{key}' of a {what} must be a finite positive number, not {value!r}",
                                 "send a number above 0")
    for key in ("min_pixels", "max_pixels"):
        if opts.get(key, 0) > limit:
            raise MediaError(f"'{key}' {opts[key]:g} of a {what} is above the server's limit", hint)
    if "resized_height" in opts and "resized_width" in opts \
            and opts["resized_height"] * opts["resized_width"] > limit:
        raise MediaError(f"'resized_height' x 'resized_width' of a {what} is above the server's limit", hint)
    if "total_pixels" in opts and opts["total_pixels"] > model_seq_len() * FACTOR * FACTOR:
        raise MediaError(f"'total_pixels' {opts['total_pixels']:g} of a {what} is above the model's context",
                         "lower it")
    if source is not None:
        height, width = image_size(source[0], source[1], opts)
        if height * width > limit + FACTOR * (height + width):  # one row and column of rounding
            raise MediaError(f"this {what} would be resized to {width}x{height} "
                             f"({height * width // (FACTOR * FACTOR)} visual tokens), above the server's limit",
                             hint)


def model_seq_len() -> int:
    """``$MODEL_SEQ_LEN`` as qwen-vl-utils reads it (default 128000), read at call time."""
    try:
        return int(float(os.environ.get("MODEL_SEQ_LEN", MODEL_SEQ_LEN)))
    except ValueError:
        return MODEL_SEQ_LEN


def video_frame_size(nframes: int, width: int, height: int, opts: Mapping[str, Any]) -> tuple[int, int]:
    """The (height, width) every frame of a video of ``nframes`` sampled frames is resized to.

    Per frame: at least ``min_pixels`` (default 128 tokens), at most 768 tokens, and the
    whole clip within ``total_pixels`` (default 0.9 * MODEL_SEQ_LEN tokens); an item's
    ``max_pixels`` can only lower the bound.
    """
    min_pixels = opts.get("min_pixels", VIDEO_MIN_TOKENS * FACTOR * FACTOR)
    total_pixels = opts.get("total_pixels", model_seq_len() * FACTOR * FACTOR * 0.9)
    max_pixels = max(min(VIDEO_MAX_TOKENS * FACTOR * FACTOR, total_pixels / nframes * FRAME_FACTOR),
                     int(min_pixels * 1.05))
    max_pixels = min(opts.get("max_pixels", max_pixels), max_pixels)
    if "resized_height" in opts and "resized_width" in opts:
        return smart_resize(opts["resized_height"], opts["resized_width"], FACTOR)
    return smart_resize(height, width, FACTOR, min_pixels, max_pixels)


def frame_range(total_frames: int, video_fps: float, video_start: float | None = None,
                video_end: float | None = None) -> tuple[int, int, int]:
    """(first index, last index, count) of the frames between ``video_start`` and ``video_end`` s."""
    if video_fps <= 0 or total_frames <= 0:
        raise MediaError(f"the video reports {total_frames} frames at {video_fps:g} fps",
                         "the file is empty or its metadata is broken; re-encode it")
    if video_start is None and video_end is None:
        return 0, total_frames - 1, total_frames
    duration = total_frames / video_fps
    start = math.ceil(max(0.0, min(video_start, duration)) * video_fps) if video_start is not None else 0
    end = total_frames - 1
    if video_end is not None:
        end = min(math.floor(max(0.0, min(video_end, duration)) * video_fps), total_frames - 1)
    if start >= end:
        raise MediaError(f"video range {video_start if video_start is not None else 0:g}s-"
                         f"{video_end if video_end is not None else duration:g}s selects no frames "
                         f"(frame {start} to {end}; the clip lasts {duration:.2f} s)",
                         "pick --video-start below --video-end, inside the clip")
    return start, end, end - start + 1


def sample_count(total_frames: int, video_fps: float, opts: Mapping[str, Any]) -> int:
    """How many frames to sample from ``total_frames`` (the selected range) of a video.

    Either ``nframes`` (rounded to an even number) or ``fps`` (default 2.0) clamped to
    [``min_frames``, ``max_frames``] and the frames available, floored to an even number.
    """
    if "fps" in opts and "nframes" in opts:
        raise MediaError("a video item gives both fps and nframes", "give one of them")
    if "nframes" in opts:
        nframes = round_by(opts["nframes"], FRAME_FACTOR)
    else:
        fps = opts.get("fps", FPS)
        min_frames = ceil_by(opts.get("min_frames", FPS_MIN_FRAMES), FRAME_FACTOR)
        max_frames = floor_by(opts.get("max_frames", min(FPS_MAX_FRAMES, total_frames)), FRAME_FACTOR)
        wanted = total_frames / video_fps * fps
        nframes = floor_by(min(min(max(wanted, min_frames), max_frames), total_frames), FRAME_FACTOR)
    if not FRAME_FACTOR <= nframes <= total_frames:
        raise MediaError(f"cannot sample {nframes} frames from a range of {total_frames} frames",
                         f"sample between {FRAME_FACTOR} and {total_frames} frames "
                         "(check --fps, --max-frames and the video range)")
    return nframes


def sample_fps(nframes: int, total_frames: int, video_fps: float) -> float:
    """The frame rate of the sampled frames, passed to the processor as ``fps``."""
    return nframes / max(total_frames, 1e-6) * video_fps


def padded_frames(count: int) -> int:
    """A frame list is padded (repeating its last frame) to an even number of frames."""
    return ceil_by(count, FRAME_FACTOR)


def visual_tokens(height: int, width: int, frames: int | None = None) -> int:
    """Visual tokens for an image (``frames`` None) or a video of ``frames`` frames at HxW.

    ``height`` and ``width`` are the resized sizes (multiples of 28).
    """
    per_frame = (height // FACTOR) * (width // FACTOR)
    if frames is None:
        return per_frame
    return ceil_by(frames, FRAME_FACTOR) // FRAME_FACTOR * per_frame
