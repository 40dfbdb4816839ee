#!/usr/bin/env bash
# Offline demo of qvl's main job, on a machine with no GPU and no access to a model hub:
#
#   make a tiny random Qwen2-VL checkpoint -> serve it from a loopback "Hugging Face" under the
#   name Qwen/Qwen2-VL-2B-Instruct -> qvl launch -s 2 (download + background server)
#   -> qvl chat --image (one-shot, through the server) -> qvl list -> qvl terminate
#
# Everything lives in a temporary folder (QVL_HOME, HF_HOME, the hub) removed at the end.
# Usage: scripts/demo.sh        (PYTHON=/path/to/python to pick the interpreter)
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-python3}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/qvl-demo.XXXXXX")"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export QVL_HOME="$WORK/qvl" HF_HOME="$WORK/hf" MODELSCOPE_CACHE="$WORK/modelscope"
export HF_HUB_DISABLE_TELEMETRY=1
unset HF_HUB_OFFLINE HF_TOKEN QVL_API_KEY || true
HUB_PID=""

qvl() { "$PY" -m qwenvl_cli "$@"; }
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '\033[2m$ qvl %s\033[0m\n' "$*"; qvl "$@"; }

cleanup() {
    qvl terminate --all >/dev/null 2>&1 || true
    [ -n "$HUB_PID" ] && kill "$HUB_PID" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

# One line and a hint, not a traceback, when $PY is not an interpreter qvl is installed for.
if ! command -v "$PY" >/dev/null 2>&1; then
    echo "error: no Python interpreter '$PY'" >&2
    echo "hint: run it as PYTHON=/path/to/venv/bin/python scripts/demo.sh" >&2
    exit 2
fi
MISSING="$("$PY" -c 'import importlib.util as u; print(" ".join(m for m in ("typer", "httpx", "openai", "uvicorn", "PIL", "torch", "transformers") if u.find_spec(m) is None))' 2>/dev/null || echo "?")"
if [ -n "$MISSING" ]; then
    echo "error: $PY cannot run qvl: missing ${MISSING}" >&2
    echo "hint: install qvl into a virtual environment first (cd $ROOT && pip install -c constraints.txt .), then run PYTHON=/path/to/venv/bin/python scripts/demo.sh" >&2
    exit 2
fi

cat <<'EOF'
+----------------------------------------------------------------------------------+
| qvl offline demo. The model is a TINY RANDOM Qwen2-VL (under 1 MB, random        |
| weights) published under the real model's name by a local test hub, so every     |
| command runs as it would with Qwen/Qwen2-VL-2B-Instruct, but the answers are      |
| GIBBERISH. That is expected: the point is the workflow, not the words.           |
+----------------------------------------------------------------------------------+
EOF

say "1. Make the tiny checkpoint"
"$PY" "$ROOT/scripts/make_tiny_model.py" "$WORK/tiny"

say "2. Serve it from a loopback hub as Qwen/Qwen2-VL-2B-Instruct (at the catalogue's pinned commit)"
"$PY" "$ROOT/scripts/loopback_hub.py" "$WORK/tiny" "$WORK/hub.url" &
HUB_PID=$!
for _ in $(seq 100); do [ -f "$WORK/hub.url" ] && break; sleep 0.1; done
export HF_ENDPOINT="$(cat "$WORK/hub.url")" MODELSCOPE_ENDPOINT="$(cat "$WORK/hub.url")"
echo "hub at $HF_ENDPOINT"

say "3. Launch it: resolve the spec, download, start the OpenAI-compatible server in the background"
run launch -s 2

say "4. Ask about an image (qvl chat finds the launched model and talks to it over HTTP)"
"$PY" -c "from PIL import Image; Image.new('RGB', (320, 240), (200, 40, 40)).save('$WORK/red.png')"
run chat --image "$WORK/red.png" --max-tokens 24 --stats "What is in this picture?"
echo "(gibberish, as promised: the weights are random)"

say "5. What is running"
run list

say "6. Stop it"
run terminate qwen2-vl-instruct-2b-pytorch
run list --json

say "Done. With a real GPU and network, the same commands serve the real model."
