"""Time the reference Qwen2-VL pipeline (AutoProcessor + qwen-vl-utils + generate) on CPU.

Builds the tiny checkpoint (or uses MODEL_DIR), writes test media, and for text, one image,
two images, an mp4 and a frame list prints the prompt length, the preprocessing time and the
time of generate(max_new_tokens=16): first call and median of the next ones.

    python scripts/tiny_pipeline_timing.py [MODEL_DIR] [--dtype bfloat16|float32] [--runs 5]
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

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]


def _cases(media: Path) -> dict[str, list]:
    from media_fixtures import make_frames, make_image, make_video

    red, blue = make_image(media / "red.png", 64, 48, (220, 20, 20)), make_image(media / "b.jpg", 100, 80)
    clip = make_video(media / "clip.mp4", seconds=2, fps=8, w=64, h=48)
    frames = [str(f) for f in make_frames(media / "frames", 6, 64, 48)]

    def user(*items):
        return [{"role": "user", "content": [*items, {"type": "text", "text": "Describe."}]}]

    return {"text": user(), "one image": user({"type": "image", "image": str(red)}),
            "two images": user({"type": "image", "image": str(red)}, {"type": "image", "image": str(blue)}),
            "mp4 video": user({"type": "video", "video": str(clip)}),
            "frame list": user({"type": "video", "video": frames})}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", nargs="?", type=Path)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    work = Path(tempfile.mkdtemp(prefix="qvl-tiny-"))
    if args.model_dir is None:
        from make_tiny_model import make_tiny_model
        args.model_dir = make_tiny_model(work / "model")

    import torch
    from qwen_vl_utils import process_vision_info
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    processor = AutoProcessor.from_pretrained(args.model_dir)
    model = Qwen2VLForConditionalGeneration.from_pretrained(args.model_dir,
                                                            dtype=getattr(torch, args.dtype))
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), dtype {args.dtype}")
    print("| case | prompt tokens | preprocess ms | generate 16, first call ms | median of next ms |")
    print("|---|---|---|---|---|")
    for name, messages in _cases(work / "media").items():
        start = time.perf_counter()
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        images, videos = process_vision_info(messages)
        inputs = processor(text=[text], images=images, videos=videos, padding=True,
                           return_tensors="pt", cap_pixels_per_frame=True)
        prep = time.perf_counter() - start
        times = []
        for _ in range(max(2, args.runs)):
            start = time.perf_counter()
            model.generate(**inputs, max_new_tokens=16, min_new_tokens=16)
            times.append(time.perf_counter() - start)
        print(f"| {name} | {inputs['input_ids'].shape[1]} | {prep * 1e3:.1f} | {times[0] * 1e3:.1f} "
              f"| {statistics.median(times[1:]) * 1e3:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
