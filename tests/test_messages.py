"""OpenAI chat messages <-> Qwen's content format, and the defaults media parts receive."""

from __future__ import annotations

import base64

import pytest

from qwenvl_cli import messages as msgs
from qwenvl_cli.errors import UsageError


def test_openai_parts_become_qwen_parts_with_their_options():
    got = msgs.from_openai([
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "high"},
             "max_pixels": 401408},
            {"type": "video_url", "video_url": {"url": "clip.mp4", "fps": 1.0}},
            {"type": "video", "video": ["f1.png", "f2.png"]},
            {"image": "x.jpg", "min_pixels": 3136},
            {"type": "text", "text": "Compare."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "ok"}]}])
    assert got[0] == {"role": "system", "content": [{"type": "text", "text": "Be brief."}]}
    assert got[1]["content"] == [
        {"type": "image", "image": "data:image/png;base64,AAAA", "max_pixels": 401408},
        {"type": "video", "video": "clip.mp4", "fps": 1.0},
        {"type": "video", "video": ["f1.png", "f2.png"]},
        {"type": "image", "image": "x.jpg", "min_pixels": 3136},
        {"type": "text", "text": "Compare."}]
    assert got[2]["role"] == "assistant" and msgs.text_of(got[2]) == "ok"
    assert msgs.media_count(got) == (2, 2)


@pytest.mark.parametrize("body,fragment", [
    ([], "non-empty list"),
    ("hello", "non-empty list"),
    ([{"role": "tool", "content": "x"}], "unsupported role 'tool'"),
    ([{"role": "system", "content": "x"}], "no user message"),
    ([{"role": "user", "content": 5}], "string or a list of parts"),
    ([{"role": "user", "content": [{"type": "audio", "audio": "a.wav"}]}], "unsupported content part type 'audio'"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "needs a 'url'"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}, "max_pixels": "big"}]}],
     "max_pixels must be a number"),
    ([{"role": "user", "content": [{"type": "text"}]}], "needs a string 'text'"),
    ([{"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]},
      {"role": "user", "content": "hi"}], "only user messages may carry images"),
])
def test_bad_bodies_are_one_line_usage_errors(body, fragment):
    with pytest.raises(UsageError) as info:
        msgs.from_openai(body)
    assert fragment in info.value.message and info.value.hint


def test_defaults_fill_only_what_a_part_does_not_set():
    conv = [msgs.user_message("hi", images=["a.png"], videos=["c.mp4"])]
    conv[0]["content"][0]["max_pixels"] = 1000
    out = msgs.with_defaults(conv, image={"max_pixels": 5, "min_pixels": 4}, video={"fps": 1.0, "max_frames": None})
    assert out[0]["content"][0] == {"type": "image", "image": "a.png", "max_pixels": 1000, "min_pixels": 4}
    assert out[0]["content"][1] == {"type": "video", "video": "c.mp4", "fps": 1.0}
    assert "min_pixels" not in conv[0]["content"][0]  # the input is not changed


def test_to_openai_inlines_local_files_and_round_trips(tmp_path):
    image = tmp_path / "red.png"
    image.write_bytes(b"\x89PNG fake")
    conv = [msgs.text_message("system", "S"),
            {"role": "user", "content": [{"type": "image", "image": str(image), "max_pixels": 9},
                                         {"type": "image", "image": "https://example.com/a.png"},
                                         {"type": "text", "text": "What?"}]},
            msgs.text_message("assistant", "A")]
    wire = msgs.to_openai(conv)
    url = wire[1]["content"][0]["image_url"]["url"]
    assert url == "data:image/png;base64," + base64.b64encode(b"\x89PNG fake").decode()
    assert wire[1]["content"][0]["max_pixels"] == 9
    assert wire[1]["content"][1]["image_url"]["url"] == "https://example.com/a.png"
    assert wire[0] == {"role": "system", "content": "S"} and wire[2] == {"role": "assistant", "content": "A"}
    back = msgs.from_openai(wire)
    assert back[1]["content"][0] == {"type": "image", "image": url, "max_pixels": 9}
