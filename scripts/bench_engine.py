#!/usr/bin/env python
"""Benchmarks for qvl's engine side, each against the reference it claims to beat.

    python scripts/bench_engine.py video            # video frame sampling
    python scripts/bench_engine.py all              # every section

Sections print their method, the machine and the ratio. Results are recorded in
docs/performance.md with the command that produced them.

``video``: a long clip is generated once with PyAV (cached), then sampling N frames is
timed with qvl's reader (qvl_cli.video: PyAV, seeking to the sampled frames) against
qwen-vl-utils' readers (decord; torchvision and torchcodec when usable) on the same
clip, the same frame indices and the same output (uint8 T,C,H,W tensor); median of
several runs, alternating the readers.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


def machine() -> str:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} logical CPUs, "
            f"Python {platform.python_version()}")


# --- video ----------------------------------------------------------------------------------


def _clip(args: argparse.Namespace) -> Path:
    from media_fixtures import make_long_video

    if args.clip:
        return Path(args.clip)
    cache = Path(args.cache_dir or Path(tempfile.gettempdir()) / "qvl-bench")
    cache.mkdir(parents=True, exist_ok=True)
    name = f"clip-{args.seconds:g}s-{args.width}x{args.height}-{args.fps}fps-gop{args.gop}.mp4"
    path = cache / name
    if not path.exists() or args.regenerate:
        started = time.perf_counter()
        partial = path.with_suffix(".part.mp4")
        make_long_video(partial, args.seconds, args.fps, args.width, args.height, args.gop)
        partial.replace(path)
        print(f"wrote {path} in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return path


def _readers(path: Path, nframes: int) -> dict:
    """name -> (callable returning (uint8 TCHW tensor, indices), or the reason it is unusable)."""
    import importlib.util

    from qwen_vl_utils import vision_process as vp

    from qvl_cli import video

    ele = {"video": str(path), "nframes": nframes}

    def qvl():
        frames, indices, *_ = video.sample(path, {"nframes": nframes})
        return frames, list(indices)

    def reference(backend):
        def read():
            frames, meta, _ = vp.VIDEO_READER_BACKENDS[backend](dict(ele))
            return frames, [int(i) for i in meta["frames_indices"]]
        return read

    readers = {"qvl (PyAV, seeking)": qvl}
    readers["qwen-vl-utils decord"] = (reference("decord") if importlib.util.find_spec("decord")
                                       else "decord is not installed")
    import torchvision.io

    readers["qwen-vl-utils torchvision"] = (
        reference("torchvision") if hasattr(torchvision.io, "read_video")
        else f"torchvision {__import__('torchvision').__version__} has no io.read_video")
    try:
        from torchcodec.decoders import VideoDecoder  # noqa: F401

        readers["qwen-vl-utils torchcodec"] = reference("torchcodec")
    except Exception as exc:  # noqa: BLE001 - not installed, or its FFmpeg libraries are missing
        readers["qwen-vl-utils torchcodec"] = f"torchcodec unusable ({type(exc).__name__})"
    return readers


def _version(metadata, name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def bench_video(args: argparse.Namespace) -> None:
    import importlib.metadata

    import av
    import torch

    from qvl_cli import video

    path = _clip(args)
    with video.VideoFile(path) as clip:
        total, fps = clip.total, clip.fps
        width, height = clip.stream.codec_context.width, clip.stream.codec_context.height
    print("## video frame sampling")
    print(f"machine : {machine()}; torch threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.1f}; decord {_version(importlib.metadata, 'decord')}")
    print(f"clip    : {path.name}: {total} frames, {fps:g} fps, {total / fps:.0f} s, {width}x{height}, "
          f"H.264 (libx264 veryfast, key frame every {args.gop} frames, B-frames), "
          f"{path.stat().st_size / 1e6:.1f} MB")
    print(f"method  : sample N frames (nframes=N, indices linspace(0, {total - 1}, N)) into a uint8 "
          f"(N,3,H,W) tensor, opening the file each run; median of {args.runs} runs, readers "
          f"alternating; PyAV {av.__version__} (libavcodec {'.'.join(map(str, av.library_versions['libavcodec']))})")
    for nframes in args.frames:
        readers = _readers(path, nframes)
        usable = {k: v for k, v in readers.items() if callable(v)}
        baseline_frames, baseline_indices = usable["qvl (PyAV, seeking)"]()
        times: dict[str, list[float]] = {name: [] for name in usable}
        for name, read in usable.items():  # check: same indices, same pixels
            frames, indices = read()
            same = indices == baseline_indices
            diff = int((frames.int() - baseline_frames.int()).abs().max()) if same else -1
            print(f"  check {name}: indices {'equal' if same else 'DIFFER'}, max pixel difference {diff}")
        for _ in range(args.runs):
            for name, read in usable.items():
                started = time.perf_counter()
                read()
                times[name].append(time.perf_counter() - started)
        qvl = times["qvl (PyAV, seeking)"]
        print(f"\nN = {nframes} frames")
        print(f"  {'reader':30s} {'median s':>9s} {'min s':>8s} {'ratio (median)':>15s} {'ratio (min)':>12s}")
        for name, samples in times.items():
            median = statistics.median(samples)
            print(f"  {name:30s} {median:9.3f} {min(samples):8.3f} "
                  f"{median / statistics.median(qvl):14.2f}x {min(samples) / min(qvl):11.2f}x")
        for name, reason in readers.items():
            if not callable(reason):
                print(f"  {name:30s} not measured: {reason}")
        print()


SECTIONS = {"video": bench_video}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="section", required=True)
    video = sub.add_parser("video", help="video frame sampling: qvl's reader vs qwen-vl-utils' readers")
    sub.add_parser("all", help="every section with its defaults")
    video.add_argument("--clip", help="use this video instead of generating one")
    video.add_argument("--seconds", type=float, default=600.0, help="generated clip length (600)")
    video.add_argument("--fps", type=int, default=30, help="generated clip frame rate (30)")
    video.add_argument("--width", type=int, default=320)
    video.add_argument("--height", type=int, default=240)
    video.add_argument("--gop", type=int, default=250, help="key frame interval (250, x264's default)")
    video.add_argument("--frames", type=lambda s: [int(x) for x in s.split(",")], default=[16],
                       help="comma-separated frame counts to sample (16)")
    video.add_argument("--runs", type=int, default=5, help="timed runs per reader (5)")
    video.add_argument("--cache-dir", help="where the generated clip is kept ($TMPDIR/qvl-bench)")
    video.add_argument("--regenerate", action="store_true", help="write the clip again")
    args = parser.parse_args(argv)
    if args.section == "all":
        for name, run in SECTIONS.items():
            run(parser.parse_args([name]))
    else:
        SECTIONS[args.section](args)


if __name__ == "__main__":
    main()
