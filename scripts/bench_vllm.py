#!/usr/bin/env python
"""qvl's vLLM engine on the published Qwen2-VL dimensions with random weights (nothing downloaded).

    python scripts/bench_vllm.py --size 7 --json vllm-7.json       # one GPU (scripts/gpu_check.sh)
    python scripts/bench_vllm.py --smoke --new-tokens 8             # no GPU: tiny checkpoint on the CPU

Same prompt and measures as scripts/bench_generate.py (whose rows it is printed beside): one
JPEG of exactly --image-tokens visual tokens plus a short question; time to first token (from
the messages: qvl's media sizing, vLLM's processor, vision tower, prefill), decode tokens/s at
batch 1 (ignore_eos, --new-tokens), median of --runs after one untimed run; requests/s with
--concurrency clients through VllmEngine.run_continuous (the path `qvl launch` uses); peak GPU
memory as NVML sees it on the GPU (vLLM's memory lives in its worker processes, so torch's
counters in this process would read zero): it is what --gpu-memory-utilization reserved.
The checkpoint is written to disk first (vLLM loads from a folder): random bfloat16 weights
built on the GPU by bench_setup, saved with save_pretrained.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import bench_generate  # noqa: E402
import bench_setup as setup  # noqa: E402


class PeakMemory:
    """Highest used memory of GPU 0 (NVML), sampled every 50 ms; None without NVML."""

    def __init__(self) -> None:
        self.peak: int | None = None
        self._stop = threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            self._nvml = pynvml
        except Exception:  # noqa: BLE001 - no driver: no figure
            self._nvml = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while self._nvml is not None and not self._stop.is_set():
            used = self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used
            self.peak = max(self.peak or 0, used)
            time.sleep(0.05)

    def gb(self) -> float | None:
        return self.peak / 1e9 if self.peak else None

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(1)


def checkpoint(args, work: Path, on_gpu: bool) -> Path:
    if not on_gpu:  # vLLM's CPU attention needs head size 32 or 64
        return setup._tiny_module().make_tiny_model(work / "model", head_size=32)
    import torch

    folder = setup.write_checkpoint_files(args.size, work / "model")
    model = setup.build_model(folder, "cuda", torch.bfloat16, random_weights=True)
    model.save_pretrained(folder)
    del model
    torch.cuda.empty_cache()
    return folder


def batch1(engine, messages, args) -> dict:
    from qwenvl_cli.generation import GenerationParams, collect

    answer = collect(engine.stream(messages, GenerationParams(max_tokens=args.new_tokens, ignore_eos=True)))
    t = answer.timings
    return {"ttft_ms": t.time_to_first_token * 1e3, "tok_s": t.tokens_per_second,
            "tokens": answer.usage.completion_tokens, "prompt_tokens": answer.usage.prompt_tokens, "peak_gb": None}


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bench_generate.add_workload_arguments(parser)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=2, help="requests per client")
    parser.add_argument("--max-model-len", type=int, default=8192)
    parser.add_argument("--smoke", action="store_true", help="the tiny checkpoint on the CPU, even with a GPU")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    args.batch = 1
    return args


def main(argv=None) -> int:
    args = parse(argv)
    import torch

    from qwenvl_cli.engine.options import build
    from qwenvl_cli.engine.vllm import VllmEngine

    on_gpu = torch.cuda.is_available() and not args.smoke
    work = Path(tempfile.mkdtemp(prefix="qvl-bench-vllm-"))
    started = time.perf_counter()
    folder = checkpoint(args, work, on_gpu)
    build_s = time.perf_counter() - started
    peak = PeakMemory()
    options = build(device="cuda" if on_gpu else "cpu", dtype="bfloat16" if on_gpu else "float32",
                    engine="vllm", max_model_len=args.max_model_len)
    engine = VllmEngine.load(folder, options)
    image, width, height = setup.make_image(work / "image.jpg", args.image_tokens)
    messages = [{"role": "user", "content": [{"type": "image", "image": str(image)},
                                             {"type": "text", "text": bench_generate.QUESTION}]}]
    what = f"Qwen2-VL-{args.size}B-Instruct dimensions, random bfloat16 weights" if on_gpu else \
        "SMOKE RUN: tiny checkpoint (head size 32) on the CPU (no targets)"
    print(f"# vLLM: {what}; checkpoint written in {build_s:.1f} s, engine loaded in {engine.load_seconds:.1f} s",
          file=sys.stderr)
    row = bench_generate.median_runs(lambda: batch1(engine, messages, args), args.runs)
    conc = bench_generate.concurrency_run(torch, engine, messages, args.concurrency, args)
    peak.stop()
    row.update(peak_gb=peak.gb(), setup_s=engine.load_seconds, path=engine.plan.describe())
    conc["peak_gb"] = peak.gb()
    peak_text = f"{row['peak_gb']:.2f}" if row["peak_gb"] else "-"
    print(f"| vllm ({row['path']}) | {row['prompt_tokens']} | {row['ttft_ms']:.1f} | {row['tok_s']:.1f} | "
          f"{conc['req_s']:.2f} req/s at {args.concurrency} | {peak_text} |")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "rows": {"vllm": row}, "concurrency": {args.concurrency: conc}},
                                        indent=2))
    engine.close()
    return 0 if row["tokens"] == args.new_tokens and conc["requests"] == args.concurrency * args.requests else 1


if __name__ == "__main__":
    sys.exit(main())
