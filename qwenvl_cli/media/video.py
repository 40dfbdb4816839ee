"""qvl's video reader: PyAV, seeking to the sampled frames instead of decoding the clip.

Frame ``i`` of a video is its i-th frame in presentation order, and the frame count and
frame rate are those the container reports (``nb_frames``, ``avg_frame_rate``; for
containers without a frame count, such as Matroska/WebM, the packets are counted) — the
same numbering qwen-vl-utils' decord reader uses, so both pick the same frames.

How a frame is found: the presentation timestamp of frame ``i`` comes from the
container's index when it lists every frame at a constant rate (mp4, mov, avi: no packet
is read), otherwise from one pass over the packets (demuxing only, no decoding). The
reader seeks to the key frame before each wanted timestamp, decodes forward to it
(skipping non-reference frames that lie before it), converts only the wanted frames to
RGB and keeps only them: memory is bounded by the frames kept. When the fast timeline
disagrees with a decoded timestamp, the reader starts over with the packet pass.

PyAV and numpy are imported inside the functions (no torch: the engine turns frames into tensors).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwenvl_cli.errors import MediaError, one_line

IMAGE_FORMATS = ("image2", "png_pipe", "jpeg_pipe", "webp_pipe", "bmp_pipe", "gif",
                 "tiff_pipe", "gif_pipe", "apng")


@dataclass(frozen=True)
class VideoProbe:
    """What the container says about a video file, plus proof that a frame decodes."""

    width: int
    height: int
    fps: float
    frames: int  # 0 when the container does not record it (the reader counts packets)
    duration: float | None  # seconds
    codec: str
    container: str


def _ffmpeg_errors() -> tuple[type[BaseException], ...]:
    import av

    return (av.error.FFmpegError, OSError, ValueError, EOFError)


def _reason(exc: BaseException) -> str:
    """FFmpeg's reason without the errno and file name PyAV wraps it in."""
    return one_line(getattr(exc, "strerror", None) or exc, 100)


def _open(path: Path):
    import av

    try:
        container = av.open(str(path), metadata_errors="ignore")
    except EOFError:
        raise MediaError(f"{path} has no frames (an empty video)", "pass a video with frames") from None
    except _ffmpeg_errors() as exc:
        raise MediaError(f"{path} is not a readable video ({_reason(exc)})",
                         "pass an mp4, webm, mkv, mov or avi file") from None
    if not container.streams.video:
        container.close()
        raise MediaError(f"{path} has no video stream (or no frames)", "pass a file that contains video")
    if container.format.name in IMAGE_FORMATS:
        container.close()
        raise MediaError(f"{path} is an image, not a video",
                         "pass it with --image, or pass a directory of frame images as the video")
    return container


def _fps(stream) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else 0.0


def probe(path: Path) -> VideoProbe:
    """Open ``path``, read its metadata and decode its first frame; MediaError when it cannot."""
    container = _open(path)
    try:
        stream = container.streams.video[0]
        fps = _fps(stream)
        duration = None
        if stream.duration and stream.time_base:
            duration = float(stream.duration * stream.time_base)
        elif container.duration:
            duration = container.duration / 1_000_000
        first = _first_frame(container, stream)
        if first is None or fps <= 0:
            raise MediaError(f"{path} has no decodable frames (empty or corrupt video)",
                             "check that the file plays, or re-encode it")
        return VideoProbe(width=first.width, height=first.height, fps=fps,
                          frames=max(int(stream.frames or 0), 0), duration=duration,
                          codec=stream.codec_context.name, container=container.format.name)
    finally:
        container.close()


def _first_frame(container, stream):
    try:
        for frame in container.decode(stream):
            return frame
    except _ffmpeg_errors():
        return None
    return None


# --- timeline: presentation timestamps of the frames --------------------------------------


@dataclass(frozen=True)
class _Timeline:
    total: int
    fps: float
    keyframes: tuple[int, ...]  # timestamps (stream time base) usable as seek targets
    exact: tuple[int, ...] | None = None  # sorted pts of every frame (packet pass)
    start: int = 0  # constant-rate timeline: pts of frame i = start + round(i * step)
    step: float = 0.0

    def pts(self, index: int) -> int:
        if self.exact is not None:
            return self.exact[min(index, len(self.exact) - 1)]
        return self.start + round(index * self.step)


_KEYFRAME, _DISCARD = 1, 2  # AVINDEX_* flags of an index entry


def _fast_timeline(stream, total: int, fps: float) -> _Timeline | None:
    """A constant-rate timeline read from the container's index, or None when unsure."""
    entries = getattr(stream, "index_entries", None)
    if entries is None or total <= 1 or len(entries) != total or fps <= 0:
        return None
    pairs = [(e.timestamp, e.flags) for e in entries]  # one pass: each access builds an object
    if any(flags & _DISCARD for _, flags in pairs):
        return None
    stamps = [stamp for stamp, _ in pairs]
    delta = stamps[1] - stamps[0]
    if delta <= 0 or stamps != list(range(stamps[0], stamps[0] + delta * total, delta)):
        return None
    if abs(delta * float(stream.time_base) * fps - 1.0) > 1e-3:
        return None
    start = stream.start_time if stream.start_time is not None else stamps[0]
    keys = tuple(stamp for stamp, flags in pairs if flags & _KEYFRAME)
    return _Timeline(total=total, fps=fps, keyframes=keys, start=start, step=float(delta))


def _scanned_timeline(container, stream, total: int, fps: float) -> _Timeline:
    """Read every packet (no decoding) for the frames' timestamps and the key frames."""
    stamps: list[int] = []
    keys: list[int] = []
    try:
        for packet in container.demux(stream):
            if packet.size == 0:
                continue
            ts = packet.pts if packet.pts is not None else packet.dts
            if ts is None:
                continue
            stamps.append(ts)
            if packet.is_keyframe:
                keys.append(ts)
    except _ffmpeg_errors():
        pass  # a damaged tail: use the packets read so far
    if not stamps:
        raise MediaError(f"{container.name} has no video frames", "check that the file plays")
    stamps.sort()
    return _Timeline(total=total or len(stamps), fps=fps, keyframes=tuple(sorted(keys)),
                     exact=tuple(stamps))


# --- decoding ----------------------------------------------------------------------------


class _TimelineMismatch(Exception):
    """A decoded timestamp is not where the constant-rate timeline put it."""


class _Seeker:
    """Decodes the frames at increasing timestamps of a VideoFile, seeking only past key frames.

    After a seek, decoding starts at the first key frame packet, which must be shown at
    or before the target (MPEG-TS and MPEG-PS seek to any packet near the time; a key
    frame may be shown after frames that follow it in decode order); if it is not, the
    key frames known before the target are tried; if none works, the file is reopened
    and decoded forward from the start, without further seeks (slow, still exact).
    """

    def __init__(self, video: VideoFile) -> None:
        self.video, self.timeline = video, video.timeline
        self.source = None  # generator of decoded frames from the current position
        self.target = 0
        self.last_pts: int | None = None
        self.sequential = False  # seeking proved unreliable: only decode forward
        self.from_start = False  # the current decoding began at the start of the file
        self.seeks = self.retries = self.restarts = 0  # for tests and benchmarks

    def _needs_seek(self) -> bool:
        if self.source is None or self.last_pts is None or self.last_pts >= self.target:
            return True
        if self.sequential:
            return False
        keys = self.timeline.keyframes
        i = bisect.bisect_right(keys, self.last_pts)
        return i < len(keys) and keys[i] <= self.target

    def _seek_points(self):
        yield self.target
        keys = self.timeline.keyframes
        i = bisect.bisect_right(keys, self.target)
        yield from reversed(keys[max(0, i - 3):i])  # the last key frames at or before the target

    def _land(self, timestamp: int) -> tuple[Any, Any] | None:
        """Seek near ``timestamp`` and find the first key frame packet from there:
        (that packet, packet iterator), or None when it is shown after the target."""
        container, stream = self.video.container, self.video.stream
        try:
            container.seek(timestamp, stream=stream, backward=True, any_frame=False)
            packets = container.demux(stream)
            head = next((p for p in packets if p.size > 0 and p.is_keyframe), None)
        except _ffmpeg_errors():
            return None
        if head is None or (head.pts is not None and head.pts > self.target):
            return None
        return head, packets

    def _seek(self) -> None:
        if not self.sequential:
            for timestamp in self._seek_points():
                landed = self._land(timestamp)
                if landed is not None:
                    self.source, self.last_pts, self.from_start = self._decode(*landed), None, False
                    return
                self.retries += 1
        self._restart()

    def _restart(self) -> None:
        """Reopen the file and decode from its start; after two restarts, stop seeking."""
        self.restarts += 1
        self.sequential = self.restarts >= 2
        self.video.reopen()
        self.source = self._decode(None, self.video.container.demux(self.video.stream))
        self.last_pts, self.from_start = None, True

    def _decode(self, head, packets):
        codec = self.video.stream.codec_context
        for packet in _chain(head, packets):
            if packet.pts is not None and packet.size > 0 and packet.pts < self.target:
                codec.skip_frame = "NONREF"  # not shown at the target, not referenced
            else:
                codec.skip_frame = "DEFAULT"
            yield from packet.decode()

    def _forward(self, target: int):
        for frame in self.source:
            if frame.pts is None:
                continue
            self.last_pts = frame.pts
            if frame.pts >= target:
                return frame
        self.source = None
        return None

    def frame_at(self, target: int):
        """The frame shown at ``target`` (or the first one after it, or None past the end)."""
        self.target = target
        if self._needs_seek():
            self.seeks += 1
            self._seek()
        frame = self._forward(target)
        if frame is None or frame.pts != target:
            if self.timeline.exact is None:
                raise _TimelineMismatch
            if not self.from_start:  # a bad seek (unreliable key frame flags): from the start
                self._restart()
                frame = self._forward(target)
        return frame


def _chain(head, rest):
    if head is not None:
        yield head
    yield from rest


class VideoFile:
    """An open video: its frame count and rate (as decord reports them) and a frame reader."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.container = _open(self.path)
        try:
            self.stream = self.container.streams.video[0]
            self.fps = _fps(self.stream)
            total = int(self.stream.frames or 0)
            self.timeline = _fast_timeline(self.stream, total, self.fps)
            if self.timeline is None:
                self.timeline = _scanned_timeline(self.container, self.stream, total, self.fps)
        except BaseException:
            self.container.close()
            raise
        self.total = self.timeline.total

    def __enter__(self) -> VideoFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.container.close()

    def reopen(self) -> None:
        """Close and open the file again: reading restarts at its beginning."""
        self.container.close()
        self.container = _open(self.path)
        self.stream = self.container.streams.video[0]

    def _decode(self, indices: list[int]) -> dict[int, Any]:
        from av.video.reformatter import VideoReformatter

        seeker = self.seeker = _Seeker(self)
        to_rgb = VideoReformatter()  # one converter for all frames: its context is reused
        frames: dict[int, Any] = {}
        for index in sorted(set(indices)):
            frame = seeker.frame_at(self.timeline.pts(index))
            if frame is None:
                raise MediaError(f"{self.path}: frame {index} of {self.total} could not be decoded "
                                 "(truncated or corrupt video)",
                                 "re-encode the file, or pick an earlier range with --video-end")
            frames[index] = to_rgb.reformat(frame, format="rgb24").to_ndarray()
        return frames

    def read(self, indices: list[int]) -> Any:
        """The frames at ``indices`` as a uint8 array (T, H, W, 3), as decord's ``asnumpy()``."""
        import numpy as np

        if not indices:
            raise MediaError(f"{self.path}: no frames to read", "sample at least 2 frames")
        try:
            try:
                frames = self._decode(indices)
            except _TimelineMismatch:  # reopen: the packet pass must start at the beginning
                self.reopen()
                self.timeline = _scanned_timeline(self.container, self.stream, self.total, self.fps)
                frames = self._decode(indices)
        except _ffmpeg_errors() as exc:
            raise MediaError(f"{self.path} could not be decoded, truncated or corrupt? ({_reason(exc)})",
                             "check that the file plays, or re-encode it") from None
        return np.stack([frames[i] for i in indices])
