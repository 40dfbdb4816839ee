#!/usr/bin/env python
"""Decode speed of qvl's engine against the reference Qwen2-VL pipeline, same process, same inputs.

    python scripts/bench_generate.py --size 7                      # one H100: the issue-6 table
    python scripts/bench_generate.py --size 2 --modes compile,graphs,generate
    python scripts/bench_generate.py --size 7 --batch 8            # 8 prompts decoded together
    python scripts/bench_generate.py --size 7 --concurrency 1,4,16 --skip-reference
    python scripts/bench_generate.py --smoke --new-tokens 16       # no GPU: tiny model on CPU

Model: the exact published dimensions of Qwen2-VL-{2,7}B-Instruct with random weights, built
directly on the GPU in bfloat16 (nothing downloaded), and a tokenizer trained locally whose
special-token ids are written into the config. Prompt: one JPEG of exactly --image-tokens
visual tokens (1,280 by default: 1120x896 px, resized by nobody) plus a short question.

Paths, in this order, on the same model object and the same image file:
- reference: the Qwen2-VL README pipeline: apply_chat_template + qwen_vl_utils.process_vision_info
  + processor + model.generate (default cache, default attention, the checkpoint's
  generation_config), min_new_tokens = max_new_tokens so that it never stops early;
- qvl: Engine.stream (Engine.prepare + qvl's decode loop) for each --modes entry, with
  GenerationParams(ignore_eos=True); the compile / CUDA-graph warm-up is timed separately.

For each: time to first token (from the messages: template, image decoding and
preprocessing, vision tower, prefill, first token on the host), decode tokens/s over the
tokens after the first, peak GPU memory (torch.cuda.max_memory_allocated); median of --runs
after one untimed run. Then qvl/reference and qvl's decode speed as a share of the bandwidth
limit: bandwidth / (decoder weight bytes + lm_head bytes), figures printed.
--batch N: N prompts decoded together (reference: one padded generate; qvl: Engine.run_jobs).
--concurrency 1,4,16: that many client threads, each sending --requests requests one after
another through Engine.run_continuous; requests/s and aggregate tokens/s.
Without CUDA (or with --smoke) the same code runs on the tiny checkpoint on the CPU: a smoke
run that keeps the script working, with no targets.
"""

from __future__ import annotations

import argparse
import json
import queue
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import bench_setup as setup  # noqa: E402

TARGETS = {"7": {"tok_s": 140, "ratio": 2.5, "ttft_ms": 150}, "2": {"tok_s": 400, "ratio": 4.0}}
QUESTION = "Describe this image in detail."


class TimingStreamer:
    """Records when each generated token reaches the host (generate puts the prompt first)."""

    def __init__(self):
        self.times: list[float] = []
        self.prompt_seen = False

    def put(self, value):
        if self.prompt_seen:
            self.times.append(time.perf_counter())
        self.prompt_seen = True

    def end(self):
        pass


def _sync(torch):
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _reset_peak(torch):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak_gb(torch) -> float | None:
    return torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None


def reference_run(torch, model, processor, messages, args, device) -> dict:
    from qwen_vl_utils import process_vision_info

    _reset_peak(torch)
    start = time.perf_counter()
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    images, videos = process_vision_info(messages)
    inputs = processor(text=[text] * args.batch, images=images * args.batch, videos=videos, padding=True,
                       return_tensors="pt").to(device)
    streamer = TimingStreamer()
    with torch.inference_mode():
        model.generate(**inputs, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, streamer=streamer)
    _sync(torch)
    first, last = streamer.times[0], streamer.times[-1]
    steps = len(streamer.times)
    return {"ttft_ms": (first - start) * 1e3, "tok_s": (steps - 1) / (last - first) * args.batch,
            "tokens": steps * args.batch, "peak_gb": _peak_gb(torch),
            "prompt_tokens": int(inputs["input_ids"].shape[1])}


def qvl_run(torch, engine, messages, args) -> dict:
    from qwenvl_cli.generation import GenerationParams, collect

    params = GenerationParams(max_tokens=args.new_tokens, ignore_eos=True)
    _reset_peak(torch)
    if args.batch == 1:
        answer = collect(engine.stream(messages, params))
        _sync(torch)
        t = answer.timings
        return {"ttft_ms": t.time_to_first_token * 1e3, "tok_s": t.tokens_per_second,
                "tokens": answer.usage.completion_tokens, "peak_gb": _peak_gb(torch),
                "prompt_tokens": answer.usage.prompt_tokens}
    start = time.perf_counter()
    jobs = [engine.job(messages, params) for _ in range(args.batch)]
    firsts, ends, tokens = [], [], 0
    for _, chunk in engine.run_jobs(jobs):
        if chunk.finish_reason is not None:
            firsts.append(start + chunk.timings.time_to_first_token)
            ends.append(start + chunk.timings.total)
            tokens += chunk.usage.completion_tokens
    _sync(torch)
    decode = max(ends) - max(firsts)
    return {"ttft_ms": (max(firsts) - start) * 1e3, "tok_s": (tokens - args.batch) / decode,
            "tokens": tokens, "peak_gb": _peak_gb(torch), "prompt_tokens": jobs[0].prepared.prompt_tokens}


def median_runs(fn, runs: int) -> dict:
    fn()  # untimed: cuBLAS handles, allocator, lazy inits
    results = [fn() for _ in range(max(1, runs))]
    out = {k: statistics.median([r[k] for r in results]) for k in ("ttft_ms", "tok_s")}
    out.update({k: results[-1][k] for k in ("tokens", "prompt_tokens")})
    peaks = [r["peak_gb"] for r in results if r["peak_gb"] is not None]
    out["peak_gb"] = max(peaks) if peaks else None
    return out


def make_engine(torch, model, processor, folder, mode, on_gpu, args):
    from qwenvl_cli.engine import devices
    from qwenvl_cli.engine import fastpath
    from qwenvl_cli.engine.engine import Engine
    from qwenvl_cli.engine.options import EngineOptions

    flags = {"generate": dict(decode_loop="generate"), "eager": dict(decode_loop="qvl", compile="off"),
             "static": dict(decode_loop="qvl", compile="off", static_cache="on"),
             "graphs": dict(decode_loop="qvl", compile="graphs"), "compile": dict(decode_loop="qvl", compile="on"),
             "auto": {}}[mode]
    options = EngineOptions(device="cuda" if on_gpu else "cpu", dtype=args.dtype, attn=args.attn, warmup=True, **flags)
    plan = devices.plan(torch, options)
    decode = fastpath.resolve(options, on_gpu, True, plan.attn)
    model.set_attn_implementation(fastpath.attn_implementation(plan.attn, decode))
    engine = Engine(model, processor, plan, folder, args.context, 0.0,
                    decoder=fastpath.make_decoder(model, decode, args.context))
    batches = sorted({1, args.batch} | {b for c in args.concurrency for b in _batch_buckets(c)})
    need = args.image_tokens + 64 + args.new_tokens
    engine.warmup(batches, up_to=2 * need if args.concurrency else need)
    return engine, decode


def _release(torch) -> None:
    import gc

    if hasattr(torch, "_dynamo"):
        torch._dynamo.reset()  # compiled steps and their CUDA graph pools
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _batch_buckets(n: int) -> list[int]:
    out, b = [], 1
    while b < n:
        out.append(b)
        b *= 2
    return out + [b]


def concurrency_run(torch, engine, messages, clients: int, args) -> dict:
    """``clients`` threads, each sending ``args.requests`` requests in turn, through
    Engine.run_continuous; returns requests/s, tokens/s and the mean time to first token."""
    from qwenvl_cli.generation import GenerationParams

    params = GenerationParams(max_tokens=args.new_tokens, ignore_eos=True)
    waiting: queue.Queue = queue.Queue()
    done_events: dict[int, tuple[threading.Event, list]] = {}
    finished = threading.Event()
    results: list = []

    def client():
        for _ in range(args.requests):
            job = engine.job(messages, params)  # preprocessing in the client's thread
            event, box = threading.Event(), []
            done_events[id(job)] = (event, box)
            waiting.put(job)
            event.wait()
            results.append(box[0])

    def take(free, wait):
        jobs = []
        while len(jobs) < free:
            try:
                jobs.append(waiting.get(timeout=0.05) if wait and not jobs else waiting.get_nowait())
            except queue.Empty:
                if wait and not jobs and not finished.is_set():
                    continue
                break
        return jobs

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    _reset_peak(torch)
    start = time.perf_counter()
    for t in threads:
        t.start()
    watcher = threading.Thread(target=lambda: ([t.join() for t in threads], finished.set()), daemon=True)
    watcher.start()
    for job, chunk in engine.run_continuous(take, max_batch=max(clients, 1)):
        if chunk.finish_reason is not None:
            event, box = done_events[id(job)]
            box.append(chunk)
            event.set()
    wall = time.perf_counter() - start
    tokens = sum(c.usage.completion_tokens for c in results)
    return {"clients": clients, "requests": len(results), "wall_s": wall, "req_s": len(results) / wall,
            "tok_s": tokens / wall, "ttft_ms": statistics.mean(c.timings.time_to_first_token for c in results) * 1e3,
            "client_tok_s": statistics.mean(c.timings.tokens_per_second for c in results),
            "peak_gb": _peak_gb(torch)}


def add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    """The model size and the prompt, shared with scripts/bench_vllm.py."""
    parser.add_argument("--size", choices=["2", "7"], default="7")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--image-tokens", type=int, default=1280)
    parser.add_argument("--runs", type=int, default=3)


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_workload_arguments(parser)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--concurrency", default="", help="client counts, e.g. 1,4,16")
    parser.add_argument("--requests", type=int, default=2, help="requests per client (--concurrency)")
    parser.add_argument("--modes", default="auto", help="qvl paths: auto, compile, graphs, static, eager, generate")
    parser.add_argument("--attn", default="auto")
    parser.add_argument("--bandwidth-tbs", type=float)
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="the tiny checkpoint on the CPU, even with a GPU")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: 1 in a smoke run, for "
                        "steadier figures on a shared machine)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    return args


def main(argv=None) -> int:
    args = parse(argv)
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    on_gpu = torch.cuda.is_available() and not args.smoke
    device = "cuda" if on_gpu else "cpu"
    args.dtype = "bfloat16" if on_gpu else "float32"
    args.context = 32768
    if not on_gpu and args.modes == ["auto"]:
        args.modes = ["static", "generate"]
    if args.threads or not on_gpu:
        torch.set_num_threads(args.threads or 1)
    work = Path(tempfile.mkdtemp(prefix="qvl-bench-"))
    folder = setup.write_checkpoint_files(args.size if on_gpu else None, work / "model")
    started = time.perf_counter()
    model = setup.build_model(folder, device, getattr(torch, args.dtype), random_weights=on_gpu)
    build_s = time.perf_counter() - started
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(folder)
    image, width, height = setup.make_image(work / "image.jpg", args.image_tokens)
    messages = [{"role": "user", "content": [{"type": "image", "image": str(image)},
                                             {"type": "text", "text": QUESTION}]}]
    info = setup.machine()
    sizes = setup.decode_bytes(model)
    what = f"Qwen2-VL-{args.size}B-Instruct dimensions, random {args.dtype} weights" if on_gpu else \
        "SMOKE RUN: tiny checkpoint on the CPU (no targets)"
    print(f"# {what}; model built in {build_s:.1f} s", file=sys.stderr)
    print(f"# machine: {json.dumps(info)}", file=sys.stderr)
    print(f"# image {width}x{height} ({args.image_tokens} visual tokens), {args.new_tokens} new tokens, "
          f"batch {args.batch}, median of {args.runs} runs after 1 untimed", file=sys.stderr)
    rows = {}
    if not args.skip_reference:
        print("# reference (processor + model.generate) ...", file=sys.stderr)
        rows["reference"] = median_runs(lambda: reference_run(torch, model, processor, messages, args, device),
                                        args.runs)
    conc = {}
    for mode in args.modes:
        print(f"# qvl {mode} ...", file=sys.stderr)
        started = time.perf_counter()
        engine, decode = make_engine(torch, model, processor, folder, mode, on_gpu, args)
        setup_s = time.perf_counter() - started
        row = median_runs(lambda: qvl_run(torch, engine, messages, args), args.runs)
        row.update(warmup_s=engine.warmup_seconds, setup_s=setup_s, path=decode.describe())
        rows[f"qvl {mode}"] = row
        if args.concurrency and mode == args.modes[0]:
            conc = {c: concurrency_run(torch, engine, messages, c, args) for c in args.concurrency}
        engine = None  # free its caches and graphs before the next mode
        _release(torch)
    report(args, info, sizes, rows, conc, on_gpu)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "machine": info,
                                         "bytes": sizes, "rows": rows, "concurrency": conc}, indent=2))
    return 0


def report(args, info, sizes, rows, conc, on_gpu) -> None:
    gbs = sizes["per_token"] / 1e9
    tbs, source = (setup.bandwidth(info.get("gpu", ""), args.bandwidth_tbs) if on_gpu
                   else (None, "CPU: not applicable"))
    limit = tbs * 1e12 / sizes["per_token"] if tbs else None
    print(f"machine: {info.get('gpu', info['cpu'])}, driver {info.get('driver', '-')}, torch {info['torch']}, "
          f"transformers {info['transformers']}, CUDA {info.get('cuda', '-')}, "
          f"flash_attn {info.get('flash_attn', '-')}")
    print(f"bytes per decoded token: decoder {sizes['decoder'] / 1e9:.3f} GB + lm_head {sizes['lm_head'] / 1e9:.3f} GB "
          f"= {gbs:.3f} GB (KV {sizes['kv_per_token'] / 1024:.0f} KiB per context token; weights "
          f"{sizes['weights'] / 1e9:.2f} GB); bandwidth {tbs or '-'} TB/s ({source}); "
          f"limit {f'{limit:.0f} tok/s' if limit else '-'} at batch 1")
    ref = rows.get("reference")
    print("\n| path | prompt tokens | TTFT ms | decode tok/s | x reference | % of limit | peak GB | warm-up s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        ratio = f"{r['tok_s'] / ref['tok_s']:.2f}" if ref and name != "reference" else "-"
        share = f"{100 * r['tok_s'] / args.batch / limit:.0f}%" if limit else "-"
        peak = f"{r['peak_gb']:.2f}" if r.get("peak_gb") is not None else "-"
        warm = f"{r['warmup_s']:.1f}" if "warmup_s" in r else "-"
        print(f"| {name}{' (' + r['path'] + ')' if 'path' in r else ''} | {r['prompt_tokens']} | {r['ttft_ms']:.1f} "
              f"| {r['tok_s']:.1f} | {ratio} | {share} | {peak} | {warm} |")
    if conc:
        base = conc[min(conc)]["tok_s"]
        print("\n| clients | requests | wall s | requests/s | tokens/s | x 1 client | mean TTFT ms | per-client tok/s |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|")
        for c, r in conc.items():
            print(f"| {c} | {r['requests']} | {r['wall_s']:.2f} | {r['req_s']:.2f} | {r['tok_s']:.1f} | "
                  f"{r['tok_s'] / base:.2f} | {r['ttft_ms']:.0f} | {r['client_tok_s']:.1f} |")
    if on_gpu and args.size in TARGETS and args.batch == 1:
        t = TARGETS[args.size]
        best = max((r for n, r in rows.items() if n != "reference"), key=lambda r: r["tok_s"], default=None)
        if best:
            print(f"\ntargets ({args.size}B, one H100): decode >= {t['tok_s']} tok/s: {best['tok_s']:.0f}; "
                  f">= {t['ratio']}x reference: {best['tok_s'] / ref['tok_s']:.2f}x" if ref else "", end="")
            if "ttft_ms" in t:
                print(f"; TTFT <= {t['ttft_ms']} ms: {best['ttft_ms']:.0f}", end="")
            if best.get("peak_gb"):
                print(f"; peak {best['peak_gb']:.2f} GB vs weights + 3 GB = {sizes['weights'] / 1e9 + 3:.2f}", end="")
            print()


if __name__ == "__main__":
    sys.exit(main())
