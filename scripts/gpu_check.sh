#!/usr/bin/env bash
# The GPU check: ONE script for a machine with one H100 (under 8 minutes), printing one table
# and exiting non-zero when any step fails.
#
#   scripts/gpu_check.sh              run it (needs CUDA; vLLM's CUDA wheel for the vLLM rows)
#   scripts/gpu_check.sh --dry-run    print the steps and their commands, check the scripts parse
#   scripts/gpu_check.sh --cpu-smoke  the same steps on the CPU with the tiny checkpoint (minutes)
#
# Steps (each with its own time limit, so that the whole stays under 8 minutes):
#   1. pytest -m gpu                                 the GPU-marked tests
#   2. scripts/bench_generate.py --size 2, then 7    transformers generate (reference) vs qvl's
#                                                    fast path: TTFT for a 1,280-token image,
#                                                    decode tok/s at batch 1, req/s at 16 clients
#   3. scripts/bench_vllm.py --size 2, then 7        the same measures through --model-engine vllm
#   4. one table of all rows (markdown, for docs/performance.md)
# Random-weight checkpoints with the published 2B / 7B configs are built locally (no download).
#
# Environment: PYTHON (default: python) runs steps 1-2; QVL_VLLM_PYTHON (default: PYTHON) runs
# step 3 and must have vLLM's CUDA wheel and qvl installed (pip install "qvl[vllm]"; vLLM's pins
# differ from qvl's constraints.txt, so it is usually a venv of its own, see docs/engines.md).
set -uo pipefail
cd "$(dirname "$0")/.."
mode=run
case "${1:-}" in
    --dry-run) mode=dry ;;
    --cpu-smoke) mode=smoke ;;
    "") ;;
    *) echo "usage: scripts/gpu_check.sh [--dry-run | --cpu-smoke]" >&2; exit 2 ;;
esac
PY=${PYTHON:-python}
VPY=${QVL_VLLM_PYTHON:-$PY}
out=$(mktemp -d "${TMPDIR:-/tmp}/qvl-gpu-check.XXXXXX")
failed=()
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false

if [[ $mode == smoke ]]; then
    sizes=(2) tokens=8 runs=1 clients=4 smoke=(--smoke) limit=600 modes=static
    export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
else
    sizes=(2 7) tokens=128 runs=2 clients=16 smoke=() limit=0 modes=graphs
fi

step() {  # step NAME SECONDS COMMAND...: run with a time limit, remember a failure
    local name=$1 seconds=$2
    shift 2
    [[ $limit -gt 0 ]] && seconds=$limit
    echo "== $name (limit ${seconds} s): $*" >&2
    if [[ $mode == dry ]]; then return 0; fi
    local start=$SECONDS
    if timeout "$seconds" "$@" > "$out/$name.log" 2>&1; then
        echo "   ok in $(( SECONDS - start )) s" >&2
    else
        echo "   FAILED ($?) in $(( SECONDS - start )) s; the log's end:" >&2
        tail -20 "$out/$name.log" >&2
        failed+=("$name")
    fi
}

if [[ $mode == dry ]]; then
    for script in scripts/bench_generate.py scripts/bench_vllm.py scripts/bench_setup.py; do
        "$PY" -m py_compile "$script" || failed+=("parse-$script")
    done
fi

if [[ $mode == run ]] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no CUDA GPU here: use --cpu-smoke or --dry-run" >&2
    exit 1
fi

step pytest-gpu 75 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests
for size in "${sizes[@]}"; do
    step "transformers-${size}b" 75 "$PY" scripts/bench_generate.py --size "$size" --new-tokens "$tokens" \
        --runs "$runs" --modes "$modes" --concurrency "1,$clients" --requests 2 "${smoke[@]}" \
        --json "$out/transformers-${size}b.json"
done
if "$VPY" -c "import vllm" 2>/dev/null || [[ $mode == dry ]]; then
    for size in "${sizes[@]}"; do
        step "vllm-${size}b" 115 "$VPY" scripts/bench_vllm.py --size "$size" --new-tokens "$tokens" --runs "$runs" \
            --concurrency "$clients" --requests 2 "${smoke[@]}" --json "$out/vllm-${size}b.json"
    done
else
    echo "== vllm: not installed for $VPY (pip install \"qvl[vllm]\", or set QVL_VLLM_PYTHON)" >&2
    failed+=("vllm-not-installed")
fi

if [[ $mode != dry ]]; then
    "$PY" - "$out" "$clients" <<'EOF'
import json, sys
from pathlib import Path
out, clients = Path(sys.argv[1]), sys.argv[2]
print("\n| model | path | prompt tokens | TTFT ms | decode tok/s (batch 1) | req/s at "
      f"{clients} clients | peak GB |")
print("|---|---|---:|---:|---:|---:|---:|")
for f in sorted(out.glob("*.json")):
    data = json.loads(f.read_text())
    size = f.stem.split("-")[-1]
    conc = data.get("concurrency", {}).get(clients) or data.get("concurrency", {}).get(str(clients))
    for name, r in data["rows"].items():
        req = f"{conc['req_s']:.2f}" if conc and (name == "vllm" or name.startswith("qvl")) else "-"
        peak = f"{r['peak_gb']:.2f}" if r.get("peak_gb") else "-"
        label = name + (f" ({r['path']})" if r.get("path") else "")
        print(f"| {size} | {label} | {r['prompt_tokens']} | {r['ttft_ms']:.1f} | {r['tok_s']:.1f} | {req} | {peak} |")
EOF
fi
rm -rf "$out"
if [[ ${#failed[@]} -gt 0 ]]; then
    echo "gpu check: FAILED: ${failed[*]}" >&2
    exit 1
fi
echo "gpu check: all steps passed ($mode)" >&2
