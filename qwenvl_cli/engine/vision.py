"""Checked media -> the tensors the Qwen2-VL processor takes, as qwen-vl-utils builds them.

:func:`prepare_vision` walks a conversation in Qwen's message format and returns what
``qwen_vl_utils.process_vision_info(messages, return_video_kwargs=True)`` returns for it
(resized RGB PIL images; float video tensors (T, C, H, W); ``{"do_sample_frames": False,
"fps": [...]}``), plus one :class:`~qwenvl_cli.media.vision.VisionInfo` per image or video
for ``--verbose``. The engine then calls ``processor(text=..., images=images,
videos=videos, **video_kwargs)``. Sizing (media.vision, media.sizing) and reading
(media.sources, media.video) live below this wing; only the tensors are made here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from qwenvl_cli.errors import MediaError
from qwenvl_cli.media import sizing
from qwenvl_cli.media.sources import PERMISSIVE, MediaPolicy, VideoSource, resolve_video
from qwenvl_cli.media.video import VideoFile
from qwenvl_cli.media.vision import (
    FRAME_LIST_FPS,
    SIZING_KEYS,
    VIDEO_KEYS,
    VisionDefaults,
    VisionInfo,
    item_options,
    load_image_item,
    load_rgb,
    vision_items,
)


class VisionInputs(NamedTuple):
    """What process_vision_info(..., return_video_kwargs=True) returns, plus the infos."""

    images: list[Any] | None
    videos: list[Any] | None
    video_kwargs: dict[str, Any]  # {"do_sample_frames": False, "fps": [one per video]}
    infos: list[VisionInfo]

    def processor_kwargs(self) -> dict[str, Any]:
        """The video kwargs to pass to a transformers 5.x Qwen2-VL processor.

        transformers 5.23 validates ``fps`` as one number and rejects qwen-vl-utils' list
        (StrictDataclassFieldValidationError); with ``do_sample_frames=False`` Qwen2-VL's
        tensors do not depend on fps (checked in tests), so it is left out.
        """
        return {k: v for k, v in self.video_kwargs.items() if k != "fps"}


def processed_infos(infos: list[VisionInfo], inputs: Any, processor: Any) -> list[VisionInfo]:
    """The infos as the processor really made the items: its image_grid_thw / video_grid_thw
    (patches of ``patch_size``, merged ``merge_size`` squared to a token). Where the checkpoint's
    own limit (preprocessor_config max_pixels) shrank an item further than qvl's sizing, the
    info says so (``processor_max_pixels``) and counts the tokens the model gets."""
    from dataclasses import replace

    image_processor = getattr(processor, "image_processor", processor)
    patch = int(getattr(image_processor, "patch_size", 14) or 14)
    merge = int(getattr(image_processor, "merge_size", 2) or 2)
    grids = {"image": iter(_rows(inputs, "image_grid_thw")), "video": iter(_rows(inputs, "video_grid_thw"))}
    out = []
    for info in infos:
        grid = next(grids[info.kind], None)
        if grid is None:
            out.append(info)
            continue
        t, h, w = grid
        tokens = t * h * w // (merge * merge)
        if tokens == info.tokens:
            out.append(info)
            continue
        out.append(replace(info, resized_height=h * patch, resized_width=w * patch, tokens=tokens,
                           processor_max_pixels=processor_max_pixels(image_processor)))
    return out


def processor_max_pixels(image_processor: Any) -> int | None:
    """The checkpoint's pixel limit: ``size["longest_edge"]`` (transformers 5) or ``max_pixels``."""
    size = getattr(image_processor, "size", None)  # a dict, or transformers 5's SizeDict
    longest = size.get("longest_edge") if isinstance(size, dict) else getattr(size, "longest_edge", None)
    if longest:
        return int(longest)
    value = getattr(image_processor, "max_pixels", None)
    return int(value) if value else None


def _rows(inputs: Any, key: str) -> list[tuple[int, int, int]]:
    grid = inputs.get(key) if hasattr(inputs, "get") else None
    return [] if grid is None else [tuple(int(x) for x in row) for row in grid.tolist()]


def prepare_vision(messages: Iterable[Any], defaults: VisionDefaults | None = None,
                   policy: MediaPolicy = PERMISSIVE) -> VisionInputs:
    """Images and videos of ``messages`` as the processor takes them, plus per-item infos.

    Items may hold raw references (checked here with ``policy``) or the ImageSource /
    VideoSource values that :mod:`qwenvl_cli.media.sources` resolved earlier.
    """
    defaults = defaults or VisionDefaults()
    images, videos, fps_list, infos = [], [], [], []
    for item in vision_items(messages):
        if "image" in item or "image_url" in item:
            image, info = load_image_item(item, defaults, policy)
            images.append(image)
        elif "video" in item:
            tensor, fps, info = load_video_item(item, defaults, policy)
            videos.append(tensor)
            fps_list.append(fps)
        else:
            raise MediaError(f"a '{item.get('type')}' item has no image, image_url or video key",
                             "add the media reference to the item")
        infos.append(info)
    return VisionInputs(images or None, videos or None, {"do_sample_frames": False, "fps": fps_list}, infos)


def load_video_item(item: Mapping[str, Any], defaults: VisionDefaults,
                    policy: MediaPolicy = PERMISSIVE) -> tuple[Any, float, VisionInfo]:
    """(float tensor T,C,H,W resized as qwen-vl-utils does, sample fps, info) for a video item."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as tvf

    source = resolve_video(item["video"], policy)
    opts = item_options(item, defaults.video_opts(item), SIZING_KEYS + VIDEO_KEYS)
    if source.kind == "file":
        frames, indices, total, video_fps, sample_fps = _sample_file(source, opts)
    else:
        frames, sample_fps = _stack_frame_list(source, opts)
        indices, total, video_fps = tuple(range(frames.shape[0])), None, None
    count, _, height, width = frames.shape
    new_h, new_w = sizing.video_frame_size(count, width, height, opts)
    tensor = tvf.resize(frames, [new_h, new_w], interpolation=InterpolationMode.BICUBIC,
                        antialias=True).float()
    info = VisionInfo("video", source.source, source.width, source.height, new_w, new_h,
                      sizing.visual_tokens(new_h, new_w, count), frames=count, total_frames=total,
                      fps=video_fps, sample_fps=sample_fps, indices=tuple(indices))
    return tensor, sample_fps, info


def _sample_file(source: VideoSource, opts: Mapping[str, Any]) -> tuple[Any, list[int], int, float, float]:
    return sample_video(source.path, opts)


def sample_video(path: Path, opts: Mapping[str, Any]) -> tuple[Any, list[int], int, float, float]:
    """Sample a video file as qwen-vl-utils does: (frames TCHW uint8 tensor, indices, frames
    in the selected range, video fps, sample fps). The indices are qwen-vl-utils' own
    ``torch.linspace(...).round()``; media.video reads the frames."""
    import torch

    with VideoFile(path) as video:
        first, last, count = sizing.frame_range(video.total, video.fps, opts.get("video_start"),
                                                opts.get("video_end"))
        nframes = sizing.sample_count(count, video.fps, opts)
        indices = torch.linspace(first, last, nframes).round().long().tolist()
        frames = torch.from_numpy(video.read(indices)).permute(0, 3, 1, 2)
        return frames, indices, count, video.fps, sizing.sample_fps(nframes, count, video.fps)


def _stack_frame_list(source: VideoSource, opts: Mapping[str, Any]) -> tuple[Any, float]:
    """Frames resized one by one as qwen-vl-utils' frame-list path does (it sizes each frame
    as an image with a 56-pixel factor: patch size 28 is passed where 14 is meant), padded
    to an even count with the last frame, stacked (T, C, H, W) uint8."""
    import numpy as np
    import torch

    frame_opts = {k: v for k, v in opts.items() if k in SIZING_KEYS}
    resized = []
    for frame in source.frames:
        image = load_rgb(frame)
        height, width = sizing.image_size(image.size[0], image.size[1], frame_opts,
                                          patch_size=sizing.FACTOR)
        resized.append(image.resize((width, height)))
    resized += [resized[-1]] * (sizing.padded_frames(len(resized)) - len(resized))
    sizes = {im.size for im in resized}
    if len(sizes) > 1:
        listed = ", ".join(f"{w}x{h}" for w, h in sorted(sizes))
        raise MediaError(f"the frames of {source.source} resize to different sizes ({listed})",
                         "give frames of one size")
    tensors = [torch.from_numpy(np.array(im).transpose(2, 0, 1)) for im in resized]
    return torch.stack(tensors), float(opts.get("sample_fps", FRAME_LIST_FPS))
