"""`qvl batch` without a model: input lines, output records and resumption, planning, the
automatic batch size, the summary. Fast; no torch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qwenvl_cli.batch import files as batch_io
from qwenvl_cli.batch import plan as batch_plan
from qwenvl_cli.fit import memory
from qwenvl_cli.catalogue.load import load_catalogue
from qwenvl_cli.catalogue.resolve import resolve
from qwenvl_cli.batch.files import BadLine, Request
from qwenvl_cli.batch.progress import Tally, clock, plain_line
from qwenvl_cli.errors import UsageError
from qwenvl_cli.generation import GenerationParams

DEFAULTS = GenerationParams(max_tokens=32)
IMAGE = {"type": "image_url", "image_url": {"url": "cat.png"}}


def line(**data) -> str:
    return json.dumps(data)


def parse(text: str, number: int = 1, defaults: GenerationParams = DEFAULTS):
    return batch_io.parse_line(text, number, defaults, {"max_pixels": 50176}, {"fps": 1.0})


# --- input lines -----------------------------------------------------------------------------------


def test_openai_line_becomes_qwen_messages_with_media_defaults_and_options():
    item = parse(line(id="a", messages=[{"role": "user", "content": [IMAGE, {"type": "text", "text": "Hi"}]}],
                      temperature=0, stop="END", max_completion_tokens=7))
    assert isinstance(item, Request) and item.id == "a" and item.line == 1
    assert item.messages == [{"role": "user", "content": [
        {"type": "image", "image": "cat.png", "max_pixels": 50176}, {"type": "text", "text": "Hi"}]}]
    assert item.params == GenerationParams(max_tokens=7, temperature=0, stop=("END",))
    assert item.size == (0, 1, 2)


def test_qwen_line_and_openai_line_give_the_same_request():
    qwen = parse(line(id=1, messages=[{"role": "user", "content": [
        {"type": "image", "image": "cat.png"}, {"type": "video", "video": "clip.mp4"}, {"type": "text", "text": "Hi"}]}]))
    openai = parse(line(id=1, messages=[{"role": "user", "content": [
        IMAGE, {"type": "video_url", "video_url": {"url": "clip.mp4"}}, "Hi"]}]))
    assert qwen.messages == openai.messages
    assert qwen.messages[0]["content"][1] == {"type": "video", "video": "clip.mp4", "fps": 1.0}
    assert qwen.size == (1, 1, 2)


def test_openai_batch_api_line_uses_custom_id_and_body():
    item = parse(line(custom_id="req-7", method="POST", url="/v1/chat/completions",
                      body={"model": "x", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "seed": 3}))
    assert item.id == "req-7" and item.params.max_tokens == 5 and item.params.seed == 3


def test_line_without_id_gets_its_line_number():
    item = parse(line(messages=[{"role": "user", "content": "Hi"}]), number=12)
    assert item.id == 12


@pytest.mark.parametrize("text, expected", [
    ('{"id": "a", "messages": [', "line 3: not valid JSON"),
    ('[1, 2]', "line 3: expected a JSON object, got list"),
    (line(id=[1], messages=[]), "the id must be a string or an integer"),
    (line(id="a"), "'messages' must be a non-empty list"),
    (line(id="a", messages=[{"role": "robot", "content": "x"}]), "unsupported role 'robot'"),
    (line(id="a", messages=[{"role": "user", "content": "x"}], max_tokens="5"), "max_tokens must be an integer"),
    (line(id="a", messages=[{"role": "user", "content": "x"}], temperature=True), "temperature must be a number"),
    (line(id="a", messages=[{"role": "user", "content": "x"}], temperature=3), "temperature must be between 0 and 2"),
    (line(id="a", messages=[{"role": "user", "content": "x"}], max_token=5), "did you mean max_tokens?"),
    (line(id="a", messages=[{"role": "user", "content": "x"}], stop=[""]), "stop sequences must be non-empty"),
])
def test_bad_lines_become_errors_not_exceptions(text, expected):
    item = parse(text, number=3)
    assert isinstance(item, BadLine) and item.line == 3
    unreadable = ("not valid JSON", "expected a JSON object", "the id must be")
    assert item.id == (None if any(u in expected for u in unreadable) else "a")  # no readable id: null
    assert expected in item.error
    assert item.error.startswith("line 3: ")


def test_an_unreadable_line_never_takes_an_explicit_id(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join([line(id=2, messages=[{"role": "user", "content": "Hi"}]), "not json", "[1]"]) + "\n")
    items = batch_io.read_input(path, GenerationParams())  # no DuplicateIds
    assert [(type(i).__name__, i.id, i.line) for i in items] == [("Request", 2, 1), ("BadLine", None, 2),
                                                                  ("BadLine", None, 3)]


def test_unrelated_extra_keys_are_ignored():
    item = parse(line(id="a", messages=[{"role": "user", "content": "x"}], source="set-2", label=4))
    assert isinstance(item, Request)


def test_duplicate_ids_name_the_ids_and_lines(tmp_path):
    path = tmp_path / "in.jsonl"
    msgs = [{"role": "user", "content": "x"}]
    path.write_text("\n".join([line(id="a", messages=msgs), line(id=1, messages=msgs), "",
                               line(id="a", messages=msgs), line(id="1", messages=msgs),
                               line(messages=msgs)]) + "\n")
    # line 6 has no id: it gets 6, which clashes with nothing; 1 and "1" are different ids
    with pytest.raises(batch_io.DuplicateIds) as info:
        batch_io.read_input(path, DEFAULTS)
    assert 'id "a" on lines 1, 4' in info.value.message
    assert info.value.exit_code == 2
    path.write_text(line(id=2, messages=msgs) + "\n" + line(messages=msgs) + "\n")
    with pytest.raises(batch_io.DuplicateIds, match="id 2 on lines 1, 2"):
        batch_io.read_input(path, DEFAULTS)


# --- output and resumption ------------------------------------------------------------------------


def ok(id_, text="t"):
    return batch_io.record(id_, text, {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}, "stop")


def write_lines(path: Path, records, tail: str = "") -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


def test_resume_keeps_answers_drops_errors_and_a_torn_last_line(tmp_path):
    out, inp = tmp_path / "out.jsonl", tmp_path / "in.jsonl"
    inp.write_text("")
    write_lines(out, [ok("a"), batch_io.record("b", error="boom"), ok(3), ok("a", "again")],
                tail='{"id": "c", "text": "hal')
    output, existing = batch_io.open_output(out, inp)
    output.close()
    assert set(existing.done) == {'"a"', "3"}
    assert existing.failed == {'"b"'}
    assert existing.dropped == 2  # the second "a" and the torn line
    assert [json.loads(x) for x in out.read_text().splitlines()] == [ok("a"), ok(3)]
    assert not list(tmp_path.glob("*.qvl-tmp"))


def test_a_last_record_without_newline_is_kept_and_terminated(tmp_path):
    out, inp = tmp_path / "out.jsonl", tmp_path / "in.jsonl"
    inp.write_text("")
    out.write_text(json.dumps(ok("a")) + "\n" + json.dumps(ok("b")))
    output, existing = batch_io.open_output(out, inp)
    output.write(ok("c"))
    output.close()
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == ["a", "b", "c"]


def test_a_file_that_is_not_batch_output_is_never_touched(tmp_path):
    out, inp = tmp_path / "notes.jsonl", tmp_path / "in.jsonl"
    inp.write_text("")
    out.write_text('{"name": "my data"}\n{"id": 1, "error": null}\n')
    before = out.read_bytes()
    with pytest.raises(batch_io.NotBatchOutput, match="line 1 is not a `qvl batch` record"):
        batch_io.open_output(out, inp)
    assert out.read_bytes() == before
    with pytest.raises(UsageError, match="is the input file"):
        batch_io.open_output(inp, inp)


def test_two_runs_cannot_write_one_output(tmp_path):
    out, inp = tmp_path / "out.jsonl", tmp_path / "in.jsonl"
    inp.write_text("")
    first, _ = batch_io.open_output(out, inp)
    try:
        with pytest.raises(UsageError, match="being written by another"):
            batch_io.open_output(out, inp)
    finally:
        first.close()
    second, _ = batch_io.open_output(out, inp)
    second.close()


def test_pending_skips_answered_ids_only():
    items = [Request("a", 1, [], DEFAULTS), BadLine(2, 2, "x"), Request("b", 3, [], DEFAULTS)]
    existing = batch_io.Existing(done={'"a"': ok("a")}, failed={'"b"'})
    assert [i.id for i in batch_io.pending(items, existing)] == [2, "b"]


# --- planning ---------------------------------------------------------------------------------------


def req(id_, size, **params):
    return Request(id_, id_, [], GenerationParams(**params), size)


def test_batches_group_sampling_options_and_sort_by_length():
    items = [req(1, (0, 1, 50)), req(2, (0, 0, 10)), req(3, (0, 1, 5), temperature=0.7),
             req(4, (1, 0, 3)), req(5, (0, 0, 900)), req(6, (0, 1, 40), max_tokens=5)]
    batches = batch_plan.plan_batches(items, 2)
    assert [[r.id for r in b] for b in batches] == [[2, 5], [6, 1], [4], [3]]
    assert all(len({r.params.batch_key() for r in b}) == 1 for b in batches)


@pytest.mark.parametrize("value, expected", [(None, None), ("auto", None), (" AUTO ", None), ("8", 8)])
def test_parse_batch_size(value, expected):
    assert batch_plan.parse_batch_size(value) == expected


@pytest.mark.parametrize("value", ["0", "-2", "many"])
def test_parse_batch_size_refuses_nonsense(value):
    with pytest.raises(UsageError, match="--batch-size"):
        batch_plan.parse_batch_size(value)


def test_auto_batch_size_on_cpu_is_modest_and_says_so():
    sizing = batch_plan.auto_batch_size(None, None, on_gpu=False, pending=100, text_tokens=100, max_new_tokens=64)
    assert sizing.size == batch_plan.CPU_BATCH and "on CPU" in sizing.reason
    assert batch_plan.auto_batch_size(None, None, False, 2, 100, 64).size == 2


def _dims_7b():
    return resolve(size_in_billions="7", catalogue=load_catalogue()).dims


def test_auto_batch_size_on_gpu_follows_the_memory_estimate():
    dims = _dims_7b()
    gib = 1 << 30
    per, tokens = batch_plan.request_bytes(dims, 100, 512, images=1, frames=0, max_pixels=None)
    assert tokens == 100 + 1280 + 512
    assert per >= dims.kv_bytes_per_token(2) * tokens  # at least its KV cache
    sizing = batch_plan.auto_batch_size(dims, 10 * gib, True, 1000, 100, 512)
    assert sizing.size == int(10 * gib * batch_plan.MEMORY_SHARE // per)
    assert "GiB per request" in sizing.reason and "10.0 GiB free" in sizing.reason
    # more room, longer answers, more pixels: the size moves the right way, within its bounds
    assert batch_plan.auto_batch_size(dims, 60 * gib, True, 1000, 100, 512).size == batch_plan.MAX_AUTO_BATCH
    longer = batch_plan.auto_batch_size(dims, 10 * gib, True, 1000, 100, 4096).size
    assert 1 <= longer < sizing.size
    video = batch_plan.auto_batch_size(dims, 10 * gib, True, 1000, 100, 512, images=0, frames=768).size
    assert video < sizing.size
    assert batch_plan.auto_batch_size(dims, 1 * gib // 100, True, 1000, 100, 512).size == 1
    assert batch_plan.auto_batch_size(dims, 60 * gib, True, 3, 100, 512).size == 3


def test_request_bytes_uses_the_memory_module():
    dims = _dims_7b()
    per, _ = batch_plan.request_bytes(dims, 0, 1, images=1, frames=0, max_pixels=None)
    est = memory.compute(dims, "x", "pytorch", None, 1281, memory.Workload(
        context_length=1281, prompt_tokens=1280, images=1))
    assert per == est.kv_cache + est.activations


def test_dims_from_config_reads_flat_and_nested_layouts(tmp_path, tiny_model):
    from qwenvl_cli.catalogue.dims import from_config

    dims = from_config(json.loads((tiny_model / "config.json").read_text()))
    assert (dims.hidden_size, dims.num_hidden_layers, dims.num_key_value_heads, dims.head_dim) == (64, 2, 2, 16)
    assert dims.vision.embed_dim == 32 and dims.vision.patch_size == 14
    config = json.loads((tiny_model / "config.json").read_text())
    text = {k: config.pop(k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                        "num_attention_heads", "num_key_value_heads", "vocab_size")}
    assert from_config({**config, "text_config": text}) == dims


# --- summary -----------------------------------------------------------------------------------------


def test_tally_summary_without_any_request_run_has_no_speed():
    tally = Tally(total=2, started=100.0, ended=100.004)
    tally.add(batch_io.record(None, error="line 1: not valid JSON"))
    assert tally.summary() == '1 requests: none reached the model; 1 failed (their output lines have "error" ' \
        'set; rerun to retry them)'


def test_tally_summary_and_plain_progress_line():
    tally = Tally(total=10, skipped=4, started=100.0, ended=104.0, timed=True)
    tally.add(ok("a"))
    tally.add(batch_io.record("b", error="boom"))
    text = tally.summary()
    assert text.startswith("2 requests in 4.0 s: 0.50 requests/s, 0.5 tokens/s generated")
    assert "1 failed" in text and "4 skipped" in text
    assert tally.summary(interrupted=True).startswith("2 of 10 requests")
    assert plain_line(tally) == "batch: 2/10 done (1 failed), 0.50 requests/s, 0.5 tokens/s, ETA 0:16"
    assert clock(3725) == "1:02:05" and clock(None) == "?"


def test_progress_prints_plain_lines_off_a_terminal(monkeypatch, capsys):
    from qwenvl_cli.batch.progress import BatchProgress as Progress

    monkeypatch.setenv("TTY_COMPATIBLE", "0")
    tally = Tally(total=3, started=0.0)
    with Progress(tally, interval=0) as progress:
        assert progress.bar is None
        tally.add(ok("a"))
        progress.update()
    assert capsys.readouterr().err.startswith("batch: 1/3 done, ")
    with Progress(tally, quiet=True, interval=0) as progress:
        progress.update()
    assert capsys.readouterr().err == ""


def test_progress_shows_a_bar_on_a_terminal(monkeypatch):
    from qwenvl_cli.batch.progress import BatchProgress as Progress

    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    tally = Tally(total=4)
    with Progress(tally) as progress:
        tally.add(ok("a"))
        tally.add(batch_io.record("b", error="x"))
        progress.update()
        task = progress.bar.tasks[0]
        assert (task.completed, task.total) == (2, 4)
        assert "1 failed" in task.fields["info"] and "ETA" in task.fields["info"]


# --- the server path, with a stand-in for remote.Remote ----------------------------------------------


class _FakeRemote:
    """Answers "echo" requests; raises what remote.Remote raises for the others."""

    def __init__(self, target=None, down_after: int | None = None):
        self.calls = 0
        self.down_after = down_after

    def check(self):
        return "fake-model"

    def __call__(self, messages, params):
        import httpx
        import openai

        from qwenvl_cli.backend import remote
        from qwenvl_cli.generation import Chunk, Usage

        self.calls += 1
        target = remote.Target("http://127.0.0.1:1/v1", "fake-model")
        prompt = messages[0]["content"][0]["text"]
        request = httpx.Request("POST", target.base_url)
        if prompt == "refuse" or (self.down_after is not None and self.calls > self.down_after):
            exc = (openai.BadRequestError("bad image", response=httpx.Response(400, request=request), body=None)
                   if prompt == "refuse" else openai.APIConnectionError(request=request))
            try:
                raise exc
            except openai.OpenAIError as err:
                raise remote.translate_api_error(err, target) from None
        yield Chunk(text=prompt.upper())
        yield Chunk(finish_reason="stop", usage=Usage(3, 1))


def _remote_requests(*prompts):
    from qwenvl_cli import messages as msgs

    return [Request(p, i + 1, msgs.from_openai([{"role": "user", "content": p}]), DEFAULTS)
            for i, p in enumerate(prompts)]


def test_remote_records_answers_and_refusals(monkeypatch):
    from qwenvl_cli.batch import remote as batch_remote
    from qwenvl_cli.backend import remote

    monkeypatch.setattr(remote, "Remote", _FakeRemote)
    out = []
    batch_remote.run(remote.Target("http://x/v1", None), _remote_requests("a", "refuse", "b"), 2, out.append,
                     quiet=True)
    got = {r["id"]: r for r in out}
    assert got["a"]["text"] == "A" and got["a"]["usage"]["total_tokens"] == 4 and got["a"]["error"] is None
    assert got["refuse"]["error"].startswith("bad image") and got["refuse"]["text"] is None


def test_remote_connection_lost_stops_the_run_after_one_retry(monkeypatch):
    from qwenvl_cli.batch import remote as batch_remote
    from qwenvl_cli.backend import remote
    from qwenvl_cli.errors import ServerError

    fake = _FakeRemote(down_after=2)
    monkeypatch.setattr(remote, "Remote", lambda target: fake)
    monkeypatch.setattr(batch_remote, "RETRY_AFTER", 0.0)
    out = []
    with pytest.raises(ServerError, match="lost the server: cannot reach"):
        batch_remote.run(remote.Target("http://x/v1", None), _remote_requests("a", "b", "c", "d"), 1, out.append,
                         quiet=True)
    assert [r["id"] for r in out] == ["a", "b"] and fake.calls == 4  # c tried twice, d never


def test_auto_size_reads_the_free_memory_of_the_model_gpus(monkeypatch, tiny_model):
    from types import MethodType, SimpleNamespace

    import torch

    from qwenvl_cli.batch import run as batch
    from qwenvl_cli.engine.engine import Engine

    free = {0: 3 << 30, 1: 5 << 30}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (free[i], 80 << 30))
    from qwenvl_cli.catalogue.dims import from_config

    dims = from_config(json.loads((tiny_model / "config.json").read_text()))
    engine = SimpleNamespace(plan=SimpleNamespace(gpus=(0, 1)), path=tiny_model, dims=dims)
    engine.free_gpu_bytes = MethodType(Engine.free_gpu_bytes, engine)  # the real reading of torch.cuda
    reqs = [Request("a", 1, [], GenerationParams(max_tokens=100), (0, 2, 400)),
            Request("b", 2, [], GenerationParams(max_tokens=300), (0, 1, 40))]
    sizing = batch._sizing(engine, reqs, None, max_pixels=200704)
    per, tokens = batch_plan.request_bytes(dims, 400 // 2 + 64, 300, images=2, frames=0, max_pixels=200704)
    assert tokens == 264 + 2 * 256 + 300  # the largest request: its text, two images, the longest answer
    assert sizing.size == min(batch_plan.MAX_AUTO_BATCH, 2, int((6 << 30) * batch_plan.MEMORY_SHARE // per))
    assert "6.0 GiB free" in sizing.reason  # the smaller GPU's free memory, times two GPUs
    assert batch._sizing(engine, reqs, 5, None) == batch_plan.Sizing(5, "")
    engine.plan.gpus = ()
    assert batch._sizing(engine, reqs, None, None).reason.endswith("on CPU (set --batch-size to change it)")


# --- the local runner, with a stand-in engine ------------------------------------------------------


class _FakeEngine:
    """job() fails for prompts starting with "bad"; run_jobs() answers each prompt with its
    upper case, and runs out of memory for batches larger than ``fits``."""

    def __init__(self, fits: int = 99):
        from types import SimpleNamespace

        self.fits = fits
        self.batches: list[list[str]] = []
        self.plan = SimpleNamespace(gpus=())
        self.released = 0

    def release_memory(self):
        self.released += 1

    def job(self, messages, params):
        from qwenvl_cli.errors import MediaError

        prompt = messages[0]["content"][0]["text"]
        if prompt.startswith("bad"):
            raise MediaError(f"{prompt}.png could not be decoded", "re-save the image")
        if prompt.startswith("boom"):
            raise ValueError("a library error")
        return prompt

    def run_jobs(self, jobs):
        from qwenvl_cli.errors import OutOfMemory
        from qwenvl_cli.generation import Chunk, Usage

        self.batches.append(list(jobs))
        for i, prompt in enumerate(jobs):
            if i == min(1, len(jobs) - 1) and len(jobs) > self.fits:
                raise OutOfMemory("out of GPU memory: tried to allocate 2 GiB", "use fewer pixels")
            yield i, Chunk(text=prompt.upper())
            yield i, Chunk(finish_reason="stop", usage=Usage(1, 1))


def test_local_runner_records_preparation_failures_and_answers_the_rest():
    from qwenvl_cli.batch import local as batch_local

    engine, out = _FakeEngine(), []
    reqs = _remote_requests("a", "bad1", "b", "boom", "c")
    batch_local.run(engine, [reqs[:3], reqs[3:]], out.append, workers=2)
    got = {r["id"]: r for r in out}
    assert [got[k]["text"] for k in ("a", "b", "c")] == ["A", "B", "C"]
    assert got["bad1"]["error"] == "bad1.png could not be decoded (re-save the image)"
    assert got["boom"]["error"] == "ValueError: a library error"
    assert engine.batches == [["a", "b"], ["c"]]


def test_a_batch_that_runs_out_of_memory_is_split_until_it_fits():
    from qwenvl_cli.batch import local as batch_local

    engine, out = _FakeEngine(fits=2), []
    reqs = _remote_requests(*"abcdefg")
    batch_local.run(engine, [reqs], out.append)
    assert sorted(r["id"] for r in out) == list("abcdefg")  # every request once
    assert all(r["error"] is None and r["text"] == r["id"].upper() for r in out)
    # each failing batch keeps what finished before the failure and splits the rest in halves
    assert ["".join(b) for b in engine.batches] == ["abcdefg", "bcd", "c", "d", "efg", "f", "g"]


def test_a_single_request_that_fails_to_generate_gets_its_error():
    from qwenvl_cli.batch import local as batch_local

    engine, out = _FakeEngine(fits=0), []
    batch_local.decode(engine, [(r, engine.job(r.messages, r.params)) for r in _remote_requests("x", "y")],
                       out.append)
    assert {r["id"]: r["error"] is None for r in out} == {"x": True, "y": False}
    assert engine.batches == [["x", "y"], ["y"]]  # y was retried alone before it was given up
    assert "out of GPU memory" in next(r["error"] for r in out if r["id"] == "y")
