"""The REPL state machine and loop, driven by scripted input and a fake model."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from qwenvl_cli.chat.session import ChatSession, load_conversation, run_repl
from qwenvl_cli.errors import MediaError, UsageError
from qwenvl_cli.generation import Chunk, GenerationParams, Timings, Usage

from media_fixtures import make_image


class FakeModel:
    """Answers 'echo: <last user text> (<n> images, <m> videos)' in two chunks."""

    def __init__(self, interrupt_after: int | None = None, error: Exception | None = None):
        self.calls: list[tuple[list, GenerationParams]] = []
        self.interrupt_after = interrupt_after
        self.error = error

    def __call__(self, messages, params):
        self.calls.append((messages, params))
        if self.error:
            raise self.error
        user = messages[-1]
        text = "".join(p.get("text", "") for p in user["content"] if p["type"] == "text")
        n_img = sum(p["type"] == "image" for p in user["content"])
        n_vid = sum(p["type"] == "video" for p in user["content"])
        words = f"echo: {text} ({n_img} images, {n_vid} videos)".split(" ")
        for i, word in enumerate(words):
            if self.interrupt_after is not None and i == self.interrupt_after:
                raise KeyboardInterrupt
            yield Chunk(word + ("" if i == len(words) - 1 else " "))
        yield Chunk(finish_reason="stop", usage=Usage(10, len(words)), timings=Timings(0.1, 0.2, 50.0))


def scripted(lines):
    it = iter(lines)

    def read(prompt):
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None
    return read


def run(lines, session=None, model=None):
    session = session or ChatSession(model="tiny")
    model = model or FakeModel()
    out, err = io.StringIO(), io.StringIO()
    code = run_repl(session, model, scripted(lines), out, err)
    return code, out.getvalue(), err.getvalue(), session, model


def check_media(kind, ref):
    if "missing" in ref:
        raise MediaError(f"{kind} file not found: {ref}", "check the path")
    return ref


def test_transcript_with_media_history_and_exit():
    session = ChatSession(model="tiny", check_media=check_media,
                          image_options={"max_pixels": 1003520}, video_options={"fps": 1.0})
    code, out, err, session, model = run(
        ["/image a.png", "/image b.png", "/video c.mp4", "what are these?", "and now?", "/exit", "ignored"],
        session)
    assert code == 0
    assert out.splitlines() == ["echo: what are these? (2 images, 1 videos)", "echo: and now? (0 images, 0 videos)"]
    first_user = model.calls[0][0][-1]["content"]
    assert first_user[0] == {"type": "image", "image": "a.png", "max_pixels": 1003520}
    assert first_user[2] == {"type": "video", "video": "c.mp4", "fps": 1.0}
    second = model.calls[1][0]
    assert [m["role"] for m in second] == ["user", "assistant", "user"]  # history carried over
    assert len(model.calls) == 2  # nothing after /exit


def test_bad_media_is_an_error_and_the_prompt_comes_back():
    session = ChatSession(check_media=check_media)
    code, out, err, session, model = run(["/image missing.png", "/image", "hello"], session)
    assert code == 0
    assert "error: image file not found: missing.png (check the path)" in err
    assert "error: /image needs a path" in err
    assert out.strip() == "echo: hello (0 images, 0 videos)"


def test_system_set_show_clear_undo_retry():
    code, out, err, session, model = run([
        "/system Be brief.", "/set temperature 0.5", "/set max_tokens 7", "/set stop END|STOP", "hi",
        "/show", "/retry", "/undo", "/show", "/clear", "/show"])
    assert model.calls[0][0][0] == {"role": "system", "content": [{"type": "text", "text": "Be brief."}]}
    params = model.calls[0][1]
    assert params.temperature == 0.5 and params.max_tokens == 7 and params.stop == ("END", "STOP")
    assert "turns: 1; tokens used: 10 prompt" in err
    assert len(model.calls) == 2 and model.calls[1][0][-1] == model.calls[0][0][-1]  # retry resends
    assert err.count("turns: 0") == 2
    assert "conversation cleared" in err


@pytest.mark.parametrize("line,fragment", [
    ("/set temprature 1", "did you mean temperature"),
    ("/set max_tokens 0", "max_tokens must be a whole number of at least 1"),
    ("/set top_p lots", "top_p needs a number"),
    ("/imagee x.png", "did you mean /image"),
    ("/undo", "nothing to undo"),
    ("/retry", "no answer to retry"),
    ("/load", "/load needs a file name"),
])
def test_command_errors(line, fragment):
    code, out, err, *_ = run([line])
    assert code == 0 and fragment in err and out == ""


def test_multiline_block():
    code, out, err, session, model = run(['"""first line', "second line", 'third"""', '"""one-liner"""'])
    assert model.calls[0][0][-1]["content"][0]["text"] == "first line\nsecond line\nthird"
    assert model.calls[1][0][-1]["content"][0]["text"] == "one-liner"


def test_ctrl_c_stops_the_answer_and_keeps_what_was_said():
    model = FakeModel(interrupt_after=2)
    code, out, err, session, _ = run(["tell me", "/show"], model=model)
    assert "[answer stopped]" in err
    assert session.history[-1] == {"role": "assistant", "content": [{"type": "text", "text": "echo: tell "}]}
    assert "turns: 1" in err


def test_engine_error_keeps_the_media_for_a_retry():
    model = FakeModel(error=UsageError("the prompt is 40000 tokens long", "shorten it"))
    session = ChatSession(check_media=check_media)
    code, out, err, session, _ = run(["/image a.png", "describe"], session, model)
    assert "error: the prompt is 40000 tokens long (hint: shorten it)" in err
    assert session.history == [] and session.images == ["a.png"]


def test_ctrl_d_and_ctrl_c_at_the_prompt():
    session = ChatSession()
    calls = iter([KeyboardInterrupt, "hi", EOFError])
    out, err = io.StringIO(), io.StringIO()

    def read(prompt):
        item = next(calls)
        if isinstance(item, type) and issubclass(item, BaseException):
            raise item
        return item
    assert run_repl(session, FakeModel(), read, out, err) == 0
    assert "use /exit or Ctrl-D" in err.getvalue() and "echo: hi" in out.getvalue()


def test_save_and_load_roundtrip(tmp_path):
    path = tmp_path / "conv.json"
    session = ChatSession(check_media=check_media)
    run(["/system S", "/set seed 3", "/image pic.png", "q1", f"/save {path}"], session)
    data = json.loads(path.read_text())
    assert data["version"] == 1 and data["system"] == "S" and data["params"] == {"seed": 3}
    picture = str(Path.cwd() / "pic.png")  # absolute: /load from another folder still finds it
    assert data["messages"][0]["content"][0] == {"type": "image", "image": picture}
    fresh = ChatSession()
    code, out, err, fresh, model = run([f"/load {path}", "q2"], fresh)
    assert fresh.system == "S" and fresh.params.seed == 3
    sent = model.calls[0][0]
    assert [m["role"] for m in sent] == ["system", "user", "assistant", "user"]
    assert sent[1]["content"][0] == {"type": "image", "image": picture}


def test_save_from_one_folder_load_in_another(tmp_path, monkeypatch):
    """Relative paths typed in one folder; /save; /load in another: the media still resolve,
    as absolute paths or, with --embed, as data URIs that need no file at all."""
    from qwenvl_cli.chat.run import check_media as real_check

    here, there = tmp_path / "here", tmp_path / "there"
    here.mkdir(), there.mkdir()
    make_image(here / "cat.png")
    monkeypatch.chdir(here)
    session = ChatSession(check_media=real_check)
    run(["/image cat.png", "q1", f"/save {tmp_path / 'plain.json'}", f"/save --embed {tmp_path / 'embed.json'}"],
        session)
    monkeypatch.chdir(there)
    for name, want in (("plain.json", str(here / "cat.png")), ("embed.json", "data:image/png;base64,")):
        fresh = ChatSession(check_media=real_check)
        run([f"/load {tmp_path / name}"], fresh)
        image = fresh.history[0]["content"][0]["image"]
        assert image.startswith(want)
        real_check("image", image)  # resolves from the other folder


def test_failed_retry_leaves_the_conversation_as_it_was():
    session = ChatSession()
    run(["q1"], session)
    before = json.loads(json.dumps(session.history))
    model = FakeModel(error=UsageError("the server went away", "launch it again"))
    code, out, err, session, _ = run(["/retry"], session, model)
    assert "error: the server went away" in err
    assert session.history == before and session.images == [] and session._turn is None
    run(["/retry"], session)  # and a later /retry still works
    assert len(session.history) == 2


@pytest.mark.parametrize("typed", ['"my photos/a b.png"', "'my photos/a b.png'", "my\\ photos/a\\ b.png",
                                   "my photos/a b.png"])
def test_pasted_paths_quoted_or_escaped_are_accepted(tmp_path, monkeypatch, typed):
    from qwenvl_cli.chat.run import check_media as real_check

    (tmp_path / "my photos").mkdir()
    make_image(tmp_path / "my photos" / "a b.png")
    monkeypatch.chdir(tmp_path)
    session = ChatSession(check_media=real_check)
    code, out, err, session, _ = run([f"/image {typed}"], session)
    assert "error" not in err, err
    assert session.images == ["my photos/a b.png"]


def test_load_rejects_bad_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UsageError, match="is not JSON"):
        load_conversation(bad)
    bad.write_text(json.dumps({"version": 99}))
    with pytest.raises(UsageError, match="not a qvl conversation"):
        load_conversation(bad)
    with pytest.raises(UsageError, match="cannot read"):
        load_conversation(tmp_path / "nope.json")
    code, out, err, *_ = run([f"/load {bad}"])
    assert "error:" in err and "not a qvl conversation" in err


def test_save_writes_atomically_and_reports_unwritable(tmp_path):
    code, out, err, *_ = run([f"/save {tmp_path}/no/such/dir/x.json"])
    assert "cannot write" in err
    assert not list(tmp_path.rglob("*.tmp"))


def test_retry_says_once_why_the_answer_repeats_and_how_to_vary_it():
    code, out, err, session, model = run(["q1", "/retry", "/retry"])
    assert err.count("note: ") == 1 and "/set temperature 0.7" in err and "--" not in err.split("note: ")[1]
    code, out, err, session, model = run(["/set top_k 0", "q1", "/retry"])
    assert "note: " not in err  # the user has chosen sampling: nothing to explain


def test_local_backend_sampling_note_names_set_in_the_repl_and_shows_once(monkeypatch):
    """The warning comes from the engine once per chat, worded for where the user is."""
    from qwenvl_cli import render
    from qwenvl_cli.backend import local

    class Engine:
        notes, load_seconds = (), 0.0

        def describe(self):
            return {"device": "cpu", "dtype": "float32", "attn": "sdpa"}

        def sampling_note(self, params, repl=False):
            from qwenvl_cli.engine.engine import Engine as Real

            fake = type("M", (), {"generation_config": type("G", (), {"top_k": 1, "top_p": 0.001})()})()
            return Real.sampling_note(type("E", (), {"model": fake})(), params, repl=repl)

        def prepare(self, messages):
            return type("P", (), {"media": []})()

        def stream(self, messages, params, prepared=None):
            yield Chunk("ok", finish_reason="stop")

    warnings = []
    monkeypatch.setattr(local, "load_engine", lambda request, options: (Engine(), "tiny"))
    monkeypatch.setattr(render, "warn", warnings.append)
    for interactive, spelling in ((True, "/set top_k 0"), (False, "--top-k 0")):
        warnings.clear()
        backend = local.load_local(local.LocalRequest(model_path="x", interactive=interactive), None)
        for _ in range(3):
            list(backend.respond([], GenerationParams(temperature=0.7)))
        assert len(warnings) == 1 and spelling in warnings[0], warnings
