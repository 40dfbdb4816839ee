"""Small media written on the fly for tests and benchmarks: images with PIL, clips with PyAV.

Every frame of a clip has its own colour (and a bar that moves), so a test can tell which
frame a reader returned.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

CODECS = {".mp4": "libx264", ".mov": "libx264", ".mkv": "libx264", ".webm": "libvpx-vp9",
          ".avi": "mpeg4"}


def frame_colour(index: int) -> tuple[int, int, int]:
    """A colour distinct for each of the first few hundred frames."""
    return ((index * 37 + 20) % 256, (index * 91 + 60) % 256, (index * 13 + 100) % 256)


def make_image(path: str | Path | None = None, width: int = 64, height: int = 48,
               colour: tuple[int, int, int] = (200, 40, 90), fmt: str | None = None,
               mode: str = "RGB") -> Path | bytes:
    """A gradient image with a coloured block; written to ``path`` or returned as bytes."""
    import numpy as np
    from PIL import Image

    yy, xx = np.mgrid[0:height, 0:width]
    pixels = np.stack([xx * 255 // max(width - 1, 1), yy * 255 // max(height - 1, 1),
                       (xx + yy) * 255 // max(width + height - 2, 1)], -1).astype(np.uint8)
    pixels[height // 4: height // 2, width // 4: width // 2] = colour
    image = Image.fromarray(pixels, "RGB")
    if mode == "RGBA":
        alpha = Image.fromarray(((xx * 255) // max(width - 1, 1)).astype(np.uint8), "L")
        image.putalpha(alpha)
    elif mode != "RGB":
        image = image.convert(mode)
    if path is None:
        buffer = io.BytesIO()
        image.save(buffer, format=fmt or "PNG")
        return buffer.getvalue()
    path = Path(path)
    image.save(path, format=fmt)
    return path


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def make_video(path: str | Path, seconds: float = 2.0, fps: float = 10, width: int = 64,
               height: int = 48, codec: str | None = None, gop: int | None = None,
               options: dict[str, str] | None = None) -> Path:
    """A clip of round(seconds * fps) frames, frame i filled with ``frame_colour(i)``."""
    import fractions

    import av
    import numpy as np

    path = Path(path)
    count = int(round(seconds * fps))
    rate = fractions.Fraction(fps).limit_denominator(1001)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec or CODECS[path.suffix.lower()], rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if gop:
            stream.codec_context.gop_size = gop
        if options:
            stream.codec_context.options = options
        for index in range(count):
            pixels = np.empty((height, width, 3), np.uint8)
            pixels[:] = frame_colour(index)
            bar = (index * 4) % max(width - 8, 1)
            pixels[:, bar: bar + 8] = 255
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def make_long_video(path: str | Path, seconds: float = 600, fps: int = 30, width: int = 320,
                    height: int = 240, gop: int = 250) -> Path:
    """A long clip, quick to encode: a scrolling gradient with a moving block, fixed key
    frame interval ``gop`` (x264's default is 250), x264 preset veryfast, B-frames on."""
    import av
    import numpy as np

    path = Path(path)
    base = ((np.arange(width) * 255) // max(width - 1, 1)).astype(np.uint8)[None, :].repeat(height, 0)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = gop
        stream.codec_context.options = {"preset": "veryfast", "x264-params": "scenecut=0"}
        for index in range(int(seconds * fps)):
            luma = np.roll(base, (index * 3) % width, axis=1)
            top = (index * 5) % (height - 16)
            luma[top: top + 16, :32] = 235
            u = np.full((height // 2, width // 2), 128 + int(60 * np.sin(index / 90)), np.uint8)
            v = np.full((height // 2, width // 2), 128 + int(60 * np.cos(index / 70)), np.uint8)
            planes = np.concatenate([luma.reshape(-1), u.reshape(-1), v.reshape(-1)])
            frame = av.VideoFrame.from_numpy_buffer(planes.reshape(height * 3 // 2, width), format="yuv420p")
            frame.pts = index
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
