"""Small media written on the fly for tests and benchmarks: images with PIL, clips with PyAV.

Every frame of a clip (and every image of a frame sequence) has a flat colour that encodes
its index, so a test can decode a sampled frame and tell which source frame it was:
``frame_index(frame_color(i)) == i`` for 0 <= i < 256, with a margin of 8 per channel for
codec error. Clips also carry a white bar moving along their top quarter, so that
neighbouring frames differ in content, not only in colour.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

CODECS = {".mp4": "libx264", ".mov": "libx264", ".mkv": "libx264", ".webm": "libvpx-vp9",
          ".avi": "mpeg4"}


_STEP = 16  # colour step between neighbouring indices; codecs err by a few units at most


def frame_color(index: int) -> tuple[int, int, int]:
    """The flat RGB colour of frame ``index`` (distinct for the first 256 frames)."""
    return (_STEP * (index % 16) + 8, _STEP * ((index // 16) % 16) + 8, 128)


def frame_index(rgb) -> int:
    """The frame index a (decoded, slightly noisy) frame colour stands for."""
    red, green = (int(round((float(c) - 8) / _STEP)) for c in tuple(rgb)[:2])
    return min(max(red, 0), 15) + 16 * min(max(green, 0), 15)


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
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=fmt)
    return path


def make_frames(folder: str | Path, count: int, width: int = 64, height: int = 48,
                suffix: str = ".png") -> list[Path]:
    """``count`` flat images frame_000.png ... coloured frame_color(i): a list-of-frames video."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"frame_{i:03d}{suffix}" for i in range(count)]
    for i, path in enumerate(paths):
        Image.new("RGB", (width, height), frame_color(i)).save(path)
    return paths


def png_header(width: int, height: int) -> bytes:
    """A valid PNG (signature, IHDR, IEND) that claims width x height pixels and holds none:
    what a decompression bomb looks like to a header probe."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IEND", b""))


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def make_video(path: str | Path, seconds: float = 2.0, fps: float = 10, width: int = 64,
               height: int = 48, codec: str | None = None, gop: int | None = None,
               options: dict[str, str] | None = None) -> Path:
    """A clip of round(seconds * fps) frames, frame i filled with ``frame_color(i)`` (the
    container follows the suffix; a bar moves along the top quarter)."""
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
            pixels[:] = frame_color(index)
            bar = (index * 4) % max(width - 8, 1)
            pixels[: max(height // 4, 2), bar: bar + 8] = 255
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
