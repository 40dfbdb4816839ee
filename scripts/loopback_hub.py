"""Serve a checkpoint folder from a loopback hub as Qwen/Qwen2-VL-2B-Instruct, until killed.

    python scripts/loopback_hub.py CHECKPOINT_DIR URL_FILE

Publishes CHECKPOINT_DIR (e.g. from scripts/make_tiny_model.py) under the 2B spec's Hugging
Face and ModelScope ids at the catalogue's pinned commit (tests/hubserver.py speaks both
protocols), then writes the hub's URL to URL_FILE (atomically) for HF_ENDPOINT and
MODELSCOPE_ENDPOINT. Used by scripts/demo.sh and .ci/readme.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from hubserver import HubServer  # noqa: E402

from qwenvl_cli.catalogue.resolve import resolve  # noqa: E402


def main(checkpoint: Path, url_file: Path) -> None:
    spec = resolve(size_in_billions="2", hub="huggingface")
    hub = HubServer().start()
    hub.add_repo(checkpoint, hf_id=spec.model_id, ms_id="qwen/Qwen2-VL-2B-Instruct", hf_commit=spec.revision)
    tmp = url_file.with_name(url_file.name + ".tmp")
    tmp.write_text(hub.url)
    tmp.rename(url_file)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
