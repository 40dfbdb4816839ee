"""How images and videos are sized, as qwen-vl-utils sizes them: qvl's defaults, the media
flags' checks, and what each item becomes (:class:`VisionInfo`), without torch.

engine.vision builds the processor's tensors from these; its :func:`prepare_vision` walks a conversation in Qwen's message format and returns what
``qwen_vl_utils.process_vision_info(messages, return_video_kwargs=True)`` returns for it
(resized RGB PIL images; float video tensors (T, C, H, W); ``{"do_sample_frames": False,
"fps": [...]}``), plus one :class:`VisionInfo` per image or video for ``--verbose``. The
engine then calls ``processor(text=..., images=images, videos=videos, **video_kwargs)``.

Differences from qwen-vl-utils, all outside the tensors: references are checked by
:mod:`qwenvl_cli.media.sources` (one-line errors instead of tracebacks), qvl's own defaults
(:class:`VisionDefaults`, image max_pixels 1280*28*28) fill keys an item does not set,
and video files are read by :mod:`qwenvl_cli.media.video` (PyAV, seeking) instead of decord.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from qwenvl_cli import settings
from qwenvl_cli.errors import MediaError, one_line
from qwenvl_cli.media import sizing
from qwenvl_cli.media.sources import PERMISSIVE, ImageSource, MediaPolicy, VideoSource, resolve_image

SIZING_KEYS = ("min_pixels", "max_pixels", "resized_height", "resized_width", "total_pixels")
VIDEO_KEYS = ("fps", "nframes", "min_frames", "max_frames", "video_start", "video_end", "sample_fps")
FRAME_LIST_FPS = 2.0  # qwen-vl-utils' sample fps for a list of frames unless `sample_fps` is given


@dataclass(frozen=True)
class VisionDefaults:
    """Values applied to image / video items that do not set them (None: qwen-vl-utils' own).

    Images default to max_pixels 1280*28*28 (settings.DEFAULT_MAX_PIXELS, about 1,280
    visual tokens) instead of qwen-vl-utils' 16384*28*28, so that a 12-megapixel photo
    costs ~1.2k tokens rather than ~15k. Video frames keep qwen-vl-utils' bounds.
    """

    image_min_pixels: int | None = settings.DEFAULT_MIN_PIXELS
    image_max_pixels: int | None = settings.DEFAULT_MAX_PIXELS
    video_min_pixels: int | None = None
    video_max_pixels: int | None = None
    fps: float | None = None
    max_frames: int | None = None
    video_start: float | None = None
    video_end: float | None = None

    def image_opts(self) -> dict[str, Any]:
        return _present(min_pixels=self.image_min_pixels, max_pixels=self.image_max_pixels)

    def video_opts(self, item: Mapping[str, Any]) -> dict[str, Any]:
        opts = _present(min_pixels=self.video_min_pixels, max_pixels=self.video_max_pixels,
                        max_frames=self.max_frames, video_start=self.video_start,
                        video_end=self.video_end)
        if self.fps is not None and "nframes" not in item:
            opts["fps"] = self.fps
        return opts

    @classmethod
    def from_flags(cls, min_pixels: int | None = None, max_pixels: int | None = None,
                   fps: float | None = None, max_frames: int | None = None,
                   video_start: float | None = None, video_end: float | None = None) -> VisionDefaults:
        """The defaults for the CLI's media flags; --min/--max-pixels set images and frames."""
        check_flags(min_pixels, max_pixels, fps, max_frames, video_start, video_end)
        image_max = settings.DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
        image_min = min(settings.DEFAULT_MIN_PIXELS, image_max) if min_pixels is None else min_pixels
        if image_min > image_max:
            raise MediaError(f"--min-pixels {image_min} is above the default --max-pixels {image_max}",
                             "raise --max-pixels as well")
        return cls(image_min, image_max, min_pixels, max_pixels, fps, max_frames, video_start, video_end)


REFERENCE_DEFAULTS = VisionDefaults(image_min_pixels=None, image_max_pixels=None)


def _present(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def check_flags(min_pixels: int | None, max_pixels: int | None, fps: float | None,
                max_frames: int | None, video_start: float | None, video_end: float | None) -> None:
    """MediaError for media flags that cannot work, before anything is read."""
    for name, value in (("--min-pixels", min_pixels), ("--max-pixels", max_pixels)):
        if value is not None and value < sizing.FACTOR * sizing.FACTOR:
            raise MediaError(f"{name} {value} is below one visual token ({sizing.FACTOR ** 2} pixels)",
                             f"use at least {sizing.FACTOR ** 2}, e.g. {256 * sizing.FACTOR ** 2}")
    if min_pixels is not None and max_pixels is not None and min_pixels > max_pixels:
        raise MediaError(f"--min-pixels {min_pixels} is above --max-pixels {max_pixels}",
                         "lower --min-pixels or raise --max-pixels")
    if fps is not None and fps <= 0:
        raise MediaError(f"--fps must be positive, got {fps:g}", "e.g. --fps 2 (the default)")
    if max_frames is not None and max_frames < sizing.FRAME_FACTOR:
        raise MediaError(f"--max-frames must be at least {sizing.FRAME_FACTOR}, got {max_frames}",
                         "e.g. --max-frames 32")
    if video_start is not None and video_start < 0:
        raise MediaError(f"--video-start must not be negative, got {video_start:g}", "give seconds")
    if video_start is not None and video_end is not None and video_start >= video_end:
        raise MediaError(f"--video-start {video_start:g} is not before --video-end {video_end:g}",
                         "give a start below the end, in seconds")


def media_options(flags: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The media flags the user set (checked), as per-part options for images and for videos
    (--min/--max-pixels cover both)."""
    check_flags(flags.get("min_pixels"), flags.get("max_pixels"), flags.get("fps"),
                flags.get("max_frames"), flags.get("video_start"), flags.get("video_end"))
    image = {k: flags[k] for k in ("min_pixels", "max_pixels") if flags.get(k) is not None}
    video = {k: v for k, v in flags.items() if v is not None}
    return image, video


@dataclass(frozen=True)
class VisionInfo:
    """What one image or video became, for --verbose and token accounting."""

    kind: str  # "image" or "video"
    source: str
    width: int
    height: int
    resized_width: int
    resized_height: int
    tokens: int
    frames: int | None = None  # video: frames given to the model (even)
    total_frames: int | None = None  # video file: frames in the selected range
    fps: float | None = None  # video file: its frame rate
    sample_fps: float | None = None
    indices: tuple[int, ...] | None = field(default=None, repr=False)
    # set when the checkpoint's processor resized it further (its preprocessor_config max_pixels)
    processor_max_pixels: int | None = None

    def describe(self) -> str:
        size = f"{self.width}x{self.height} -> {self.resized_width}x{self.resized_height}"
        if self.kind == "image":
            return f"image {self.source}: {size}, {self.tokens} visual tokens"
        where = f" of {self.total_frames} at {self.fps:g} fps" if self.total_frames else ""
        return (f"video {self.source}: {self.frames} frames{where} (sample fps {self.sample_fps:g}), "
                f"{size}, {self.tokens} visual tokens")

    def to_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in self.__dict__.items() if v is not None and k != "indices"}
        return data

    def cap_note(self) -> str | None:
        """For an image scaled down by the pixel budget: what it would have cost at the
        checkpoint's own limit (16384 tokens) and what it costs now; None otherwise."""
        if self.processor_max_pixels is not None:
            return (f"{self.source}: the checkpoint's processor caps {self.kind}s at {self.processor_max_pixels:,} "
                    f"pixels (its preprocessor_config.json), so the model gets {self.tokens:,} visual tokens "
                    f"({self.resized_width}x{self.resized_height}); a --max-pixels above that has no effect")
        if self.kind != "image":
            return None
        full_h, full_w = sizing.smart_resize(self.height, self.width,
                                             max_pixels=sizing.IMAGE_MAX_TOKENS * sizing.FACTOR ** 2)
        full = sizing.visual_tokens(full_h, full_w)
        if full <= self.tokens:
            return None
        megapixels = self.width * self.height / 1e6
        return (f"this {megapixels:.1f} MP image is {full:,} visual tokens at full size; capped to "
                f"{self.tokens:,} by --max-pixels ({self.resized_width}x{self.resized_height}); "
                f"raise --max-pixels for finer detail")


def vision_items(messages: Iterable[Any]) -> list[dict[str, Any]]:
    """The image / video content items of a conversation (or a batch of them), in order."""
    messages = list(messages)
    conversations = [messages] if messages and isinstance(messages[0], dict) else messages
    items = []
    for conversation in conversations:
        for message in conversation:
            content = message.get("content")
            if not isinstance(content, list):
                continue
            for item in content:
                if isinstance(item, dict) and ("image" in item or "image_url" in item or "video" in item
                                               or item.get("type", "text") in ("image", "image_url", "video")):
                    items.append(item)
    return items


def item_options(item: Mapping[str, Any], base: Mapping[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    opts = dict(base)
    opts.update({k: item[k] for k in keys if k in item and item[k] is not None})
    return opts


def to_rgb(image: Any) -> Any:
    """RGB as qwen-vl-utils makes it: RGBA is composited on white, other modes converted."""
    from PIL import Image

    if image.mode == "RGBA":
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.split()[3])
        return background
    return image.convert("RGB")


def load_rgb(source: ImageSource) -> Any:
    """Decode a resolved image to RGB; MediaError when the data turns out to be bad."""
    try:
        return to_rgb(source.open())
    except MediaError:
        raise
    except Exception as exc:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError...
        raise MediaError(f"{source.source} could not be decoded: {one_line(exc, 120)}", "re-save the image") from None


def load_image_item(item: Mapping[str, Any], defaults: VisionDefaults,
                    policy: MediaPolicy = PERMISSIVE) -> tuple[Any, VisionInfo]:
    ref = item["image"] if "image" in item else item["image_url"]
    source = resolve_image(ref, policy)
    opts = item_options(item, defaults.image_opts(), SIZING_KEYS)
    image = load_rgb(source)
    height, width = sizing.image_size(image.size[0], image.size[1], opts)
    resized = image.resize((width, height))
    return resized, VisionInfo("image", source.source, image.size[0], image.size[1], width, height,
                               sizing.visual_tokens(height, width))


def image_plan(source: ImageSource, defaults: VisionDefaults | None = None,
               item: Mapping[str, Any] | None = None) -> VisionInfo:
    """The size and tokens an image will have, from its header alone (no decoding)."""
    opts = item_options(item or {}, (defaults or VisionDefaults()).image_opts(), SIZING_KEYS)
    height, width = sizing.image_size(source.width, source.height, opts)
    return VisionInfo("image", source.source, source.width, source.height, width, height,
                      sizing.visual_tokens(height, width))


def video_plan(source: VideoSource, defaults: VisionDefaults | None = None,
               item: Mapping[str, Any] | None = None) -> VisionInfo:
    """Frames, size and tokens a video will have, from its metadata alone (no decoding).

    Exact for files whose container records the frame count (mp4, mov, avi) and for frame
    lists; for Matroska/WebM the count is estimated from the duration.
    """
    item = item or {}
    opts = item_options(item, (defaults or VisionDefaults()).video_opts(item), SIZING_KEYS + VIDEO_KEYS)
    if source.kind == "frames":
        count = sizing.padded_frames(len(source.frames))
        frame_opts = {k: v for k, v in opts.items() if k in SIZING_KEYS}
        height, width = sizing.image_size(source.width, source.height, frame_opts, patch_size=sizing.FACTOR)
        total, fps, sample_fps = None, None, float(opts.get("sample_fps", FRAME_LIST_FPS))
    else:
        fps = source.fps or 0.0
        total = source.total_frames or int(fps * (source.duration or 0))
        first, last, total = sizing.frame_range(total, fps, opts.get("video_start"), opts.get("video_end"))
        count = sizing.sample_count(total, fps, opts)
        height, width, sample_fps = source.height, source.width, sizing.sample_fps(count, total, fps)
    new_h, new_w = sizing.video_frame_size(count, width, height, opts)
    return VisionInfo("video", source.source, source.width, source.height, new_w, new_h,
                      sizing.visual_tokens(new_h, new_w, count), frames=count, total_frames=total,
                      fps=fps, sample_fps=sample_fps)


def check_shape(source: ImageSource | VideoSource) -> VisionInfo:
    """Size a checked image or video from its header alone (image_plan / video_plan), so that
    what cannot be sized (an aspect ratio above 200:1) is refused with the other media checks,
    before any model loads."""
    return image_plan(source) if isinstance(source, ImageSource) else video_plan(source)
