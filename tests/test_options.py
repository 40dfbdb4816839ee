"""One builder for the engine options, one record for the spec flags, one parser of --gpu-idx:
`chat`, `batch` and `launch` stop at the same bad value, before anything is downloaded."""

from __future__ import annotations

import json

import pytest

from qwenvl_cli.catalogue.resolve import SpecQuery, resolve
from qwenvl_cli.cli.app import main
from qwenvl_cli.engine.options import EngineOptions, build
from qwenvl_cli.errors import UsageError


def run_main(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    out = capsys.readouterr()
    return info.value.code, out.out, out.err


def test_build_checks_every_engine_flag():
    assert build() == EngineOptions()
    assert build("CPU", "0, 2", None, "20GiB", "BF16", "sdpa", "qvl", "off", "on", "off", True) == EngineOptions(
        device="cpu", gpu_idx=(0, 2), max_memory="20GiB", dtype="bf16", attn="sdpa", decode_loop="qvl",
        compile="off", static_cache="on", gpu_preprocess="off", warmup=True)
    for kwargs, text in (({"device": "tpu"}, "unknown --device 'tpu'"), ({"dtype": "fp17"}, "unknown --dtype 'fp17'"),
                         ({"attn": "fast"}, "unknown --attn"), ({"gpu_idx": "0,0"}, "names GPU 0 twice"),
                         ({"gpu_idx": "x"}, "is not a GPU number"), ({"n_gpu": 0}, "--n-gpu 0 must be at least 1"),
                         ({"max_memory": "lots"}, "not an amount"), ({"decode_loop": "fast"}, "unknown --decode-loop"),
                         ({"compile": "maybe"}, "unknown --compile"), ({"static_cache": "y"}, "unknown --static-cache"),
                         ({"gpu_preprocess": "y"}, "unknown --gpu-preprocess")):
        with pytest.raises(UsageError, match=text):
            build(**kwargs)


@pytest.mark.parametrize("argv,text", [
    (["chat", "-s", "7", "--dtype", "fp17", "hi"], "unknown --dtype 'fp17'"),
    (["chat", "-s", "7", "--gpu-idx", "0,0", "hi"], "names GPU 0 twice"),
    (["batch", "in.jsonl", "-o", "out.jsonl", "-s", "7", "--device", "tpu"], "unknown --device 'tpu'"),
    (["batch", "in.jsonl", "-o", "out.jsonl", "--attn", "fast"], "unknown --attn 'fast'"),
    (["launch", "-s", "7", "--dtype", "fp17"], "unknown --dtype 'fp17'"),
])
def test_chat_batch_and_launch_stop_at_a_bad_engine_flag_before_any_download(argv, text, capsys, tmp_path,
                                                                               monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # a download would fail differently
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", "http://127.0.0.1:9")
    code, out, err = run_main(argv, capsys)
    assert code == 2 and out == ""
    assert text in err and err.count("\n") == 2  # one line and a hint
    assert not list(tmp_path.iterdir())  # nothing written: no batch output, no cache


def test_spec_query_travels_to_resolution():
    query = SpecQuery(size_in_billions="7", model_format="AWQ")
    assert query.given and not SpecQuery().given
    assert resolve(query).label() == resolve(size_in_billions="7", model_format="awq").label()
    assert json.dumps(query.to_dict())  # plain data


def test_one_shot_chat_checks_each_image_once(monkeypatch, tmp_path):
    """The image checked at the edge is the value the engine gets: it is not probed again."""
    from qwenvl_cli.chat import run as chat_run
    from qwenvl_cli.engine.vision import prepare_vision
    from qwenvl_cli.generation import Chunk
    from qwenvl_cli.media import sources
    from qwenvl_cli.backend.local import Backend
    from media_fixtures import make_image

    path = make_image(tmp_path / "x.png", 64, 48)
    probes = []
    real = sources._probe_path
    monkeypatch.setattr(sources, "_probe_path", lambda *a, **k: probes.append(a[0]) or real(*a, **k))
    seen = {}

    def respond(messages, params):
        seen["inputs"] = prepare_vision(messages)
        yield Chunk(text="ok", finish_reason="stop")

    monkeypatch.setattr(chat_run, "open_backend", lambda request: Backend("fake", respond))
    code = chat_run.run(chat_run.ChatCommand(prompt="what?", images=(str(path),), quiet=True))
    assert code == 0 and len(probes) == 1
    assert seen["inputs"].infos[0].width == 64


def test_context_length_above_the_models_is_refused(capsys):
    """Qwen2-VL serves at most 32,768 tokens: a longer --context-length is bad usage, not a plan."""
    from qwenvl_cli.catalogue.load import load_catalogue
    from qwenvl_cli.cli.options import MAX_CONTEXT_LENGTH

    assert {fam.context_length for fam in load_catalogue().families} == {MAX_CONTEXT_LENGTH}
    for command in (["resolve"], ["list-specs", "--fit"]):
        code, out, err = run_main([*command, "--context-length", "65536"], capsys)
        assert code == 2 and out == "", err
        assert "--context-length" in err and "32768" in err and "Traceback" not in err
    code, _, err = run_main(["resolve", "--context-length", "32768", "--json"], capsys)
    assert code == 0, err


def test_decode_loop_help_says_what_auto_picks_on_each_device():
    """--decode-loop auto is qvl's loop on CPU and CUDA alike; the help must not say generate."""
    from qwenvl_cli.cli.options import DecodeLoop
    from qwenvl_cli.engine import fastpath

    text = DecodeLoop.__metadata__[0].help
    for on_gpu in (False, True):
        assert fastpath.resolve(EngineOptions(), on_gpu=on_gpu).loop == "qvl"
    assert "qvl's loop everywhere" in text and "on a CPU it runs on the calling thread" in text
    assert "generate on CPU" not in text
