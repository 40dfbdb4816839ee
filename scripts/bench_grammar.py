#!/usr/bin/env python
"""Per-token cost of constrained decoding (response_format json_schema) against
unconstrained decoding, on the CPU, in the same run.

    python scripts/bench_grammar.py                         # the tiny checkpoint, built here
    python scripts/bench_grammar.py --model-path DIR --runs 5
    python scripts/bench_grammar.py --tokenizer DIR         # also: the mask step alone at DIR's vocabulary

End to end: Engine.run_jobs on the same prompt, greedy, --tokens new tokens at most, for each
decode loop (qvl's and transformers' generate) and each batch size (1 and 4 rows, n = 4),
unconstrained, constrained with a JSON schema, and constrained with the mask fill not
overlapped with the forward pass (qvl's loop only differs); seconds per decode step, median of
--runs after one untimed run (which compiles the grammar and builds the tokenizer tables).
With --tokenizer: the grammar mask (xgrammar fill + apply + the control-character mask)
timed alone on random logits of that tokenizer's vocabulary, against a plain argmax.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SCHEMA = {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "integer"}}},
          "required": ["items"]}


def end_to_end(model_path: str, loops: list[str], tokens: int, runs: int) -> list[dict]:
    import torch

    from qwenvl_cli.engine import sampling
    from qwenvl_cli.engine.engine import Engine
    from qwenvl_cli.engine.options import EngineOptions
    from qwenvl_cli.generation import GenerationParams

    overlapped = sampling.GrammarMask.chosen

    torch.set_num_threads(1)
    messages = [{"role": "user", "content": [{"type": "text", "text": "List some numbers."}]}]
    rows = []
    for loop in loops:
        engine = Engine.load(model_path, EngineOptions(device="cpu", decode_loop=loop))
        for n in (1, 4):
            for mode in ("free", "json_schema", "json_schema, no overlap"):
                grammar = None if mode == "free" else ("json_schema", json.dumps(SCHEMA))
                # without the overlap, the mask is filled when the logits arrive (as in generate)
                sampling.GrammarMask.chosen = overlapped if mode == "json_schema" else (lambda self, tokens: None)
                params = GenerationParams(max_tokens=tokens, temperature=0, n=n, grammar=grammar)
                times = []
                for run in range(runs + 1):
                    job = engine.job(messages, params)
                    start = time.perf_counter()
                    finals = [c for _, c in engine.run_jobs([job]) if c.finish_reason]
                    seconds = time.perf_counter() - start
                    count = sum(c.usage.completion_tokens for c in finals) / n
                    if run:
                        times.append(seconds / max(1, count))
                rows.append({"loop": loop, "rows": n, "mode": mode, "ms_per_token": statistics.median(times) * 1e3})
    sampling.GrammarMask.chosen = overlapped
    return rows


def mask_alone(tokenizer_path: str, steps: int = 200) -> dict:
    import torch
    import xgrammar as xgr
    from transformers import AutoTokenizer

    from qwenvl_cli.engine.sampling import GrammarMask

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    vocab = len(tok)
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab)
    compiled = xgr.GrammarCompiler(info, max_threads=2).compile_builtin_json_grammar()
    control = torch.zeros(vocab, dtype=torch.bool)
    out = {"vocab": vocab}
    for batch in (1, 4):
        mask = GrammarMask(compiled, batch, 1, vocab, control)
        ids = torch.zeros((batch, 1), dtype=torch.long)
        gen = torch.Generator().manual_seed(0)
        masked, plain = [], []
        for _ in range(steps):
            logits = torch.randn(batch, vocab, generator=gen)
            start = time.perf_counter()
            torch.argmax(logits, -1)
            plain.append(time.perf_counter() - start)
            start = time.perf_counter()
            chosen = torch.argmax(mask(ids, logits.clone()), -1)
            masked.append(time.perf_counter() - start)
            if all(m.is_terminated() for m in mask.matchers):
                break
            ids = torch.cat([ids, chosen[:, None]], 1)
        out[f"b{batch}"] = {"argmax_ms": statistics.median(plain) * 1e3,
                            "mask_and_argmax_ms": statistics.median(masked) * 1e3, "steps": len(masked)}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path")
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--loops", default="qvl,generate")
    parser.add_argument("--tokenizer", help="a tokenizer folder for the mask-alone measurement")
    args = parser.parse_args()
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads 1; "
          f"greedy, at most {args.tokens} tokens, median of {args.runs} runs", flush=True)
    path = args.model_path
    if path is None:
        path = tempfile.mkdtemp(prefix="qvl-bench-grammar-")
        from importlib import util

        spec = util.spec_from_file_location("make_tiny_model", ROOT / "scripts" / "make_tiny_model.py")
        module = util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.make_tiny_model(Path(path))
    rows = end_to_end(path, args.loops.split(","), args.tokens, args.runs)
    print("| loop | rows | free ms/token | json_schema ms/token | ratio | json_schema, mask not overlapped | ratio |")
    print("|---|---|---|---|---|---|---|")
    for free, cons, sync in zip(rows[::3], rows[1::3], rows[2::3]):
        f, c, s = free["ms_per_token"], cons["ms_per_token"], sync["ms_per_token"]
        print(f"| {free['loop']} | {free['rows']} | {f:.2f} | {c:.2f} | {c / f:.2f}x | {s:.2f} | {s / f:.2f}x |")
    if args.tokenizer:
        print(json.dumps(mask_alone(args.tokenizer), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
