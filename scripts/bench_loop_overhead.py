#!/usr/bin/env python
"""Host time per decoded token outside the model's forward: transformers' generate against
qvl's decode loop, on the tiny checkpoint on the CPU, same process, same prompt.

    python scripts/bench_loop_overhead.py [--tokens 256] [--runs 5]

On a GPU this is the time the host spends per token on bookkeeping (processors, stopping
criteria, mask and cache updates, streaming) besides launching the forward: with
generate it adds to every token, since the host waits for each token before the next
step; in qvl's loop it overlaps with the GPU's work on the next step. Method: the model's
forward is timed with forward hooks; per-token time minus forward time, median of --runs,
greedy decoding of --tokens tokens (EOS suppressed), text-only prompt, one torch thread.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    import torch
    from transformers import AutoProcessor

    import bench_setup
    from qwenvl_cli.engine import fastpath

    torch.set_num_threads(1)
    folder = bench_setup.write_checkpoint_files(None, Path(tempfile.mkdtemp(prefix="qvl-loop-")) / "model")
    model = bench_setup.build_model(folder, "cpu", torch.float32, random_weights=False)
    processor = AutoProcessor.from_pretrained(folder)
    text = processor.apply_chat_template([{"role": "user", "content": "Tell me a story."}], tokenize=False,
                                         add_generation_prompt=True)
    inputs = processor(text=[text], return_tensors="pt")
    gen = model.generation_config
    kw = dict(max_new_tokens=args.tokens, min_new_tokens=args.tokens, pad_token_id=gen.pad_token_id,
              eos_token_id=gen.eos_token_id, streamer=_NullStreamer())
    forward_time, started = [0.0], [0.0]
    model.register_forward_pre_hook(lambda *_: started.__setitem__(0, time.perf_counter()))
    model.register_forward_hook(lambda *_: forward_time.__setitem__(0, forward_time[0] + time.perf_counter()
                                                                    - started[0]))
    paths = {"transformers generate": model.generate}
    for step in ("eager", "static"):
        paths[f"qvl loop, {step} step"] = fastpath.make_decoder(model, fastpath.DecodeConfig("qvl", step), 32768).generate
    print(f"# tiny checkpoint, CPU, 1 thread, torch {torch.__version__}; {args.tokens} tokens, median of {args.runs}",
          file=sys.stderr)
    print("| loop | ms per token | forward ms per token | outside the forward, us per token |")
    print("|---|---:|---:|---:|")
    for name, fn in paths.items():
        totals, outside = [], []
        with torch.inference_mode():
            fn(**inputs, **kw)
            for _ in range(args.runs):
                forward_time[0] = 0.0
                start = time.perf_counter()
                fn(**inputs, **kw)
                total = time.perf_counter() - start
                totals.append(total / args.tokens)
                outside.append((total - forward_time[0]) / args.tokens)
        med_total, med_out = statistics.median(totals), statistics.median(outside)
        print(f"| {name} | {med_total * 1e3:.2f} | {(med_total - med_out) * 1e3:.2f} | {med_out * 1e6:.0f} |")
    return 0


class _NullStreamer:
    def put(self, value):
        value.tolist()  # what a real streamer does with each token

    def end(self):
        pass


if __name__ == "__main__":
    sys.exit(main())
