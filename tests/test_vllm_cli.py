"""`qvl chat`, `qvl launch` and `qvl batch` with `--model-engine vllm`, as real processes, against
the same commands on the transformers engine (where vLLM is installed: .ci/vllm; skips elsewhere)."""

from __future__ import annotations

import base64
import json
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("vllm")
pytestmark = pytest.mark.timeout(600)  # each test starts vLLM (20-40 s) once or twice

import httpx  # noqa: E402
import openai  # noqa: E402
from conftest import run_qvl  # noqa: E402
from media_fixtures import make_image, make_video  # noqa: E402

VLLM = ("--model-engine", "vllm")
COMMON = ("--device", "cpu", "--dtype", "float32")
START = 300  # seconds: vLLM starts in 20-40 s here, slower on a loaded machine


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm-cli-media")
    return {"image": make_image(root / "a.png", 336, 224), "video": make_video(root / "v.mp4", 2.0, 10, 168, 112)}


def _chat(model, *args):
    result = run_qvl("chat", "--model-path", str(model), *COMMON, "--temperature", "0", "--max-tokens", "12",
                     "--json", "--verbose", *args, timeout=START)
    assert result.returncode == 0, result.stderr[-3000:]
    report = [line for line in result.stderr.splitlines() if line.startswith(("image ", "video "))]
    return json.loads(result.stdout), report


def test_chat_with_an_image_and_a_video_answers_as_transformers_does(tiny_model_hs32, media):
    args = ("--image", str(media["image"]), "--video", str(media["video"]), "Describe both.")
    ours, our_report = _chat(tiny_model_hs32, *VLLM, *args)
    theirs, their_report = _chat(tiny_model_hs32, *args)
    assert ours["text"] == theirs["text"] and ours["finish_reason"] == theirs["finish_reason"]
    assert ours["usage"] == theirs["usage"]
    assert len(our_report) == 2 and our_report == their_report  # the per-item token report
    assert ours["model"]["engine"] == "vllm" and ours["model"]["device"] == "cpu (vLLM)"


def test_refusals_before_loading(tiny_model_hs32, media):
    attn = run_qvl("chat", *VLLM, "--attn", "sdpa", "--model-path", str(tiny_model_hs32), "hi")
    assert attn.returncode == 2 and "--attn is a setting of the transformers engine" in attn.stderr
    awq = run_qvl("chat", *VLLM, "-s", "2", "-f", "awq", "--device", "cpu", "hi")
    assert awq.returncode == 2 and "AWQ checkpoints of Qwen2-VL on CUDA GPUs only" in awq.stderr
    assert "Traceback" not in attn.stderr + awq.stderr
    too_many = run_qvl("chat", *VLLM, *COMMON, "--model-path", str(tiny_model_hs32),
                       *[a for _ in range(9) for a in ("--image", str(media["image"]))], "hi", timeout=START)
    assert too_many.returncode == 2 and "9 images in one request" in too_many.stderr, too_many.stderr[-2000:]


def _uri(path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def test_launch_serves_the_openai_api_with_streaming_concurrency_and_security(tiny_model_hs32, media):
    launched = run_qvl("launch", *VLLM, *COMMON, "--model-path", str(tiny_model_hs32), "--model-uid", "vl",
                       "--api-key", "sekret", "--json", timeout=START)
    assert launched.returncode == 0, launched.stderr[-3000:]
    entry = json.loads(launched.stdout)
    try:
        assert entry["endpoint"].startswith("http://127.0.0.1:") and entry["device"] == "cpu (vLLM)"
        client = openai.OpenAI(base_url=entry["endpoint"], api_key="sekret", max_retries=0, timeout=120)
        image_turn = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _uri(media["image"])}},
                                                   {"type": "text", "text": "Describe this image."}]}]
        text_turn = [{"role": "user", "content": "Hello there."}]
        single = {name: client.chat.completions.create(model="vl", messages=m, max_tokens=10, temperature=0)
                  for name, m in (("image", image_turn), ("text", text_turn))}
        assert single["image"].usage.prompt_tokens > single["text"].usage.prompt_tokens + 50

        def streamed(i: int) -> tuple[str, str]:
            name, messages = ("image", image_turn) if i % 2 else ("text", text_turn)
            parts = client.chat.completions.create(model="vl", messages=messages, max_tokens=10, temperature=0,
                                                   stream=True)
            return name, "".join(c.choices[0].delta.content or "" for c in parts if c.choices)

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(streamed, range(8)))
        assert len(answers) == 8
        for name, text in answers:
            assert text == single[name].choices[0].message.content

        # The security defaults hold in front of vLLM: the key, no local files, no fetching.
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=entry["endpoint"], api_key="wrong", max_retries=0).models.list()
        headers = {"Authorization": "Bearer sekret"}
        for url, said in ((f"file://{media['image']}", "local files are not allowed"),
                          ("http://127.0.0.1:9/x.png", "")):
            refused = httpx.post(f"{entry['endpoint']}/chat/completions", headers=headers, timeout=30, json={
                "model": "vl", "messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": url}}]}]})
            assert refused.status_code == 400 and said in refused.text
        nine = [{"type": "image_url", "image_url": {"url": _uri(media["image"])}}] * 9
        refused = httpx.post(f"{entry['endpoint']}/chat/completions", headers=headers, timeout=60,
                             json={"model": "vl", "messages": [{"role": "user", "content": nine}]})
        assert refused.status_code == 400 and "at most 8" in refused.json()["error"]["message"]
        after = client.chat.completions.create(model="vl", messages=text_turn, max_tokens=10, temperature=0)
        assert after.choices[0].message.content == single["text"].choices[0].message.content
    finally:
        stopped = run_qvl("terminate", "vl", timeout=60)
    assert stopped.returncode == 0, stopped.stderr


def test_batch_answers_as_the_transformers_engine(tiny_model_hs32, media, tmp_path):
    requests = [
        {"id": "text", "messages": [{"role": "user", "content": "Hello there."}]},
        {"id": "image", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": str(media["image"])}}, {"type": "text", "text": "Caption."}]}]},
        {"id": "video", "messages": [{"role": "user", "content": [
            {"type": "video", "video": str(media["video"])}, {"type": "text", "text": "What happens?"}]}]},
    ]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in requests))

    def run(out, *engine):
        result = run_qvl("batch", str(source), "-o", str(out), "--model-path", str(tiny_model_hs32), *COMMON,
                         "--temperature", "0", "--max-tokens", "10", *engine, timeout=START)
        assert result.returncode == 0, result.stderr[-3000:]
        return {row["id"]: row for row in map(json.loads, out.read_text().splitlines())}

    ours, theirs = run(tmp_path / "vllm.jsonl", *VLLM), run(tmp_path / "hf.jsonl")
    assert set(ours) == {"text", "image", "video"}
    for key in ours:
        assert ours[key]["text"] == theirs[key]["text"], key
        assert ours[key]["usage"] == theirs[key]["usage"], key
