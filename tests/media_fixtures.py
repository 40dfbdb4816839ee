"""Test media written on the fly: still images, frame sequences and short video clips.

Every frame of a generated clip (and every image of a generated frame sequence) has a flat
colour that encodes its index, so a test can decode a sampled frame and tell which source
frame it was: `frame_index(frame_color(i)) == i` for 0 <= i < 256, with a margin of 8 per
channel for codec error.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

_STEP = 16  # colour step between neighbouring indices; codecs err by a few units at most


def frame_color(index: int) -> tuple[int, int, int]:
    """The flat RGB colour of frame `index` (distinct for the first 256 frames)."""
    return (_STEP * (index % 16) + 8, _STEP * ((index // 16) % 16) + 8, 128)


def frame_index(rgb) -> int:
    """The frame index a (decoded, slightly noisy) frame colour stands for."""
    red, green = (int(round((float(c) - 8) / _STEP)) for c in tuple(rgb)[:2])
    return min(max(red, 0), 15) + 16 * min(max(green, 0), 15)


def make_image(path: str | Path, w: int = 64, h: int = 48,
               color: tuple[int, int, int] = (200, 30, 30)) -> Path:
    """A flat-colour RGB image; the format follows the suffix (.png, .jpg, ...)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (w, h), tuple(color)).save(path)
    return path


def make_frames(folder: str | Path, count: int, w: int = 64, h: int = 48,
                suffix: str = ".png") -> list[Path]:
    """`count` images frame_000.png ... coloured with frame_color(i), for list-of-frames videos."""
    folder = Path(folder)
    return [make_image(folder / f"frame_{i:03d}{suffix}", w, h, frame_color(i))
            for i in range(count)]


def make_video(path: str | Path, seconds: float = 2.0, fps: float = 8, w: int = 64, h: int = 48,
               codec: str = "libx264") -> Path:
    """An mp4 (or other container, by suffix) of round(seconds*fps) flat frames coloured with
    frame_color(i), written with PyAV. Width and height must be even for yuv420p."""
    import av
    import numpy as np

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = max(1, round(seconds * fps))
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i in range(count):
            pixels = np.empty((h, w, 3), dtype=np.uint8)
            pixels[:, :] = frame_color(i)
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path
