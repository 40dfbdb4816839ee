"""The API surface beyond plain chat, driven with the official `openai` client against one
real server process shared by the module (tiny checkpoint, CPU, loopback, a 512-token
context, CORS for one origin): request validation, structured output, the sampling fields,
/v1/completions, /v1/responses, /metrics, x-request-id, slashes, CORS, and the table of
docs/server.md, probed row by row."""

from __future__ import annotations

import base64
import json
import math
import re
import signal
from pathlib import Path
from typing import Literal

import httpx
import openai
import pydantic
import pytest

from media_fixtures import make_image
from serverutil import Foreground, isolated_env

UID = "tiny-api"
ORIGIN = "http://localhost:3000"
TEXT = [{"role": "user", "content": "Hello there."}]
CONTEXT = 512
ROOT = Path(__file__).resolve().parents[1]


class Served:
    def __init__(self, entry: dict, root: Path) -> None:
        self.url = entry["endpoint"]
        self.base = self.url[: -len("/v1")]
        self.root = root
        self.client = openai.OpenAI(base_url=self.url, api_key="none", max_retries=0, timeout=120)

    def chat(self, messages=TEXT, **kw):
        kw.setdefault("max_tokens", 6)
        kw.setdefault("temperature", 0)
        return self.client.chat.completions.create(model=UID, messages=messages, **kw)

    def post(self, path: str, body, **kw) -> httpx.Response:
        return httpx.post(f"{self.url}{path}", json=body, timeout=120, **kw)

    def alive(self) -> bool:
        return httpx.get(f"{self.base}/health", timeout=30).status_code == 200


@pytest.fixture(scope="module")
def served(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("served-api")
    proc = Foreground(["--model-path", str(tiny_model), "--device", "cpu", "--model-uid", UID,
                       "--context-length", str(CONTEXT), "--max-batch", "4",
                       "--allowed-origins", ORIGIN], isolated_env(root), root / "server.log")
    try:
        yield Served(proc.wait_ready(), root)
    finally:
        proc.stop(signal.SIGKILL if proc.proc.poll() is None else 0)
        log = (root / "server.log").read_text()
        assert "Traceback" not in log, log[-3000:]  # no request ever ends in a traceback


def image_uri(width: int = 64, height: int = 48) -> str:
    data = make_image(None, width, height, fmt="PNG")
    return "data:image/png;base64," + base64.b64encode(data).decode()


# --- nothing silently ignored: 400 naming the field ---------------------------------------------


@pytest.mark.parametrize("extra, param", [
    ({"best_of": 2}, "best_of"), ({"use_beam_search": True}, "use_beam_search"),
    ({"min_tokens": 4}, "min_tokens"), ({"guided_json": {"type": "object"}}, "guided_json"),
    ({"guided_regex": "a+"}, "guided_regex"), ({"some_new_field": 1}, "some_new_field"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"mm_processor_kwargs": {"max_pixels": 1}}, "mm_processor_kwargs"),
])
def test_fields_qvl_does_not_implement_are_400_naming_them(served, extra, param):
    with pytest.raises(openai.BadRequestError) as err:
        served.chat(extra_body=extra)
    assert err.value.body["param"] == param and param in err.value.body["message"]


def test_mm_processor_kwargs_mean_qvls_own_fields(served):
    content = [{"type": "image_url", "image_url": {"url": image_uri(448, 448)}}, {"type": "text", "text": "hi"}]
    msgs = [{"role": "user", "content": content}]
    small = served.chat(msgs, max_tokens=1, extra_body={"mm_processor_kwargs": {"max_pixels": 56 * 56}})
    same = served.chat(msgs, max_tokens=1, extra_body={"max_pixels": 56 * 56})
    large = served.chat(msgs, max_tokens=1, extra_body={"mm_processor_kwargs": {"max_pixels": 224 * 224}})
    assert small.usage.prompt_tokens == same.usage.prompt_tokens < large.usage.prompt_tokens


def test_context_overflow_is_openais_error(served):
    with pytest.raises(openai.BadRequestError) as err:
        served.chat(max_tokens=CONTEXT)
    body = err.value.body
    assert body["code"] == "context_length_exceeded"
    match = re.fullmatch(rf"This model's maximum context length is {CONTEXT} tokens\. However, you requested "
                         r"(\d+) tokens \((\d+) in the messages, (\d+) in the completion\)\. Please reduce the "
                         r"length of the messages or completion\.", body["message"])
    assert match and int(match[1]) == int(match[2]) + CONTEXT
    long = [{"role": "user", "content": "hello " * CONTEXT}]
    with pytest.raises(openai.BadRequestError) as err:
        served.chat(long)
    assert err.value.body["code"] == "context_length_exceeded"
    assert err.value.body["message"].startswith(f"This model's maximum context length is {CONTEXT} tokens. "
                                                "However, your messages resulted in ")


# --- issue 15: odd values are 400s, never 500s ---------------------------------------------------


def _part(**extra):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_uri()}, **extra},
                                         {"type": "text", "text": "hi"}]}]


@pytest.mark.parametrize("body, param", [
    ({"messages": TEXT, "seed": 2**64 + 1}, "seed"),
    ({"messages": _part(max_pixels=1)}, "messages"),
    ({"messages": _part(min_pixels=20_000_000)}, "messages"),
    ({"messages": _part(min_pixels=60_000_000)}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "/tmp/a\x00.png"}}]}]},
     "messages"),
    ({"messages": TEXT, "temperature": "hot"}, "temperature"),
    ({"messages": TEXT, "logit_bias": {"999999999": 5}}, "logit_bias"),
])
def test_odd_values_are_400_naming_the_parameter(served, body, param):
    response = served.post("/chat/completions", {"model": UID, "max_tokens": 2, **body})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


@pytest.mark.parametrize("raw", [
    b"[" * 100_000 + b"]" * 100_000,  # RecursionError in the JSON parser
    b'{"model": "tiny-api", "messages": [{"role": "user", "content": "\\ud800"}]}',  # lone surrogate
    b'{"model": "tiny-api", "max_tokens": 2, "messages": [{"role": "user", "content": [{"type": "image_url", '
    b'"image_url": {"url": "x"}, "resized_height": NaN}]}]}',
    b'{"model": "tiny-api", "max_tokens": 2, "messages": [{"role": "user", "content": [{"type": "image_url", '
    b'"image_url": {"url": "x"}, "resized_height": 1e300}]}]}',
])
def test_malformed_bodies_are_400(served, raw):
    response = httpx.post(f"{served.url}/chat/completions", content=raw, timeout=60,
                          headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("extra", [{"temperature": 1e-300}, {"temperature": 2, "top_k": 0},
                                   {"seed": -1, "top_k": -1, "temperature": 0.8}])
def test_extreme_sampling_values_answer(served, extra):
    answer = served.chat(extra_body=extra, max_tokens=3, temperature=None)
    assert answer.choices[0].finish_reason in ("stop", "length")
    if extra.get("temperature") == 1e-300:  # below 1e-5 is greedy, as in vLLM
        assert answer.choices[0].message.content == served.chat(max_tokens=3).choices[0].message.content


# --- structured output --------------------------------------------------------------------------


class Pet(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=8)
    kind: Literal["cat", "dog"]
    legs: int = pydantic.Field(ge=0, le=8)


def test_parse_with_a_pydantic_model(served):
    completion = served.client.chat.completions.parse(model=UID, messages=TEXT, response_format=Pet,
                                                      max_tokens=80, temperature=0)
    choice = completion.choices[0]
    assert choice.finish_reason == "stop" and isinstance(choice.message.parsed, Pet)


def test_json_schema_holds_for_every_sampled_answer_of_a_batch(served):
    schema = {"type": "json_schema", "json_schema": {"name": "pet", "schema": Pet.model_json_schema()}}
    answers = served.chat(response_format=schema, n=3, temperature=1.0, max_tokens=80,
                          extra_body={"top_k": -1, "top_p": 1.0, "seed": 3})
    assert len(answers.choices) == 3
    for choice in answers.choices:
        assert choice.finish_reason == "stop"
        Pet.model_validate_json(choice.message.content)


def test_json_object_is_json_and_a_bad_schema_is_400(served):
    answer = served.chat(response_format={"type": "json_object"}, max_tokens=120)
    if answer.choices[0].finish_reason == "stop":
        json.loads(answer.choices[0].message.content)
    else:  # cut by max_tokens: still a prefix of a JSON value
        assert answer.choices[0].message.content.lstrip()[:1] in ("{", "[", '"') or \
            answer.choices[0].message.content.strip()[:1].isdigit()
    with pytest.raises(openai.BadRequestError) as err:
        served.chat(response_format={"type": "json_schema", "json_schema": {"name": "x",
                                                                           "schema": {"type": "no-such-type"}}})
    assert "response_format" in err.value.body["message"]


# --- sampling fields ----------------------------------------------------------------------------


def test_n_answers_decoded_together_and_greedy_unchanged(served):
    one = served.chat(max_tokens=8).choices[0].message.content
    many = served.chat(max_tokens=8, n=3)
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert all(c.message.content == one for c in many.choices)  # greedy: the same answer n times
    assert many.usage.completion_tokens == 3 * 8
    sampled = served.chat(max_tokens=8, n=4, temperature=1.0, extra_body={"top_k": -1, "top_p": 1.0})
    assert len({c.message.content for c in sampled.choices}) > 1
    texts, finishes = {0: "", 1: ""}, {}
    for chunk in served.chat(max_tokens=8, n=2, stream=True, stream_options={"include_usage": True}):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
        usage = chunk.usage or None
    reason = many.choices[0].finish_reason
    assert texts == {0: one, 1: one} and finishes == {0: reason, 1: reason}
    assert usage.completion_tokens == 16


def test_logprobs_whole_and_streamed(served):
    answer = served.chat(max_tokens=5, logprobs=True, top_logprobs=3)
    items = answer.choices[0].logprobs.content
    assert len(items) == 5 and "".join(i.token for i in items) == answer.choices[0].message.content
    for item in items:  # greedy: the chosen token is the most likely one
        assert len(item.top_logprobs) == 3 and item.logprob <= 0
        assert math.isclose(item.logprob, item.top_logprobs[0].logprob, abs_tol=1e-5)
        assert sum(math.exp(t.logprob) for t in item.top_logprobs) <= 1 + 1e-5
    streamed = [t for chunk in served.chat(max_tokens=5, logprobs=True, top_logprobs=3, stream=True)
                for c in chunk.choices if c.logprobs for t in c.logprobs.content]
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in items], abs=1e-5)


def test_logit_bias_penalties_min_p_and_seed(served):
    plain = served.chat(max_tokens=8)
    forced = served.chat(max_tokens=4, logit_bias={"100": 100}, logprobs=True)
    assert len({t.token for t in forced.choices[0].logprobs.content}) == 1  # token 100, four times
    assert forced.choices[0].message.content != plain.choices[0].message.content[:len(forced.choices[0].message.content)]
    penalised = served.chat(max_tokens=8, presence_penalty=2.0, frequency_penalty=2.0)
    assert penalised.choices[0].message.content != plain.choices[0].message.content
    kw = dict(max_tokens=8, temperature=1.0, seed=7, extra_body={"top_k": -1, "top_p": 1.0, "min_p": 0.05})
    assert served.chat(**kw).choices[0].message.content == served.chat(**kw).choices[0].message.content


# --- endpoints ----------------------------------------------------------------------------------


def test_completions_whole_and_streamed(served):
    whole = served.client.completions.create(model=UID, prompt="Once upon a time", max_tokens=6, temperature=0,
                                             logprobs=2)
    assert whole.object == "text_completion" and whole.choices[0].finish_reason == "length"
    assert len(whole.choices[0].logprobs.tokens) == 6 and whole.usage.completion_tokens == 6
    parts = [c.choices[0].text for c in served.client.completions.create(
        model=UID, prompt="Once upon a time", max_tokens=6, temperature=0, stream=True) if c.choices]
    assert "".join(parts) == whole.choices[0].text


def test_responses_whole_streamed_and_with_images(served):
    whole = served.client.responses.create(model=UID, input="Hello there.", max_output_tokens=6, temperature=0)
    assert whole.status == "incomplete" and whole.usage.output_tokens == 6
    assert whole.output_text == served.chat(max_tokens=6).choices[0].message.content
    with served.client.responses.stream(model=UID, input="Hello there.", max_output_tokens=6, temperature=0) as s:
        deltas = [e.delta for e in s if e.type == "response.output_text.delta"]
        final = s.get_final_response()
    assert "".join(deltas) == final.output_text == whole.output_text
    fmt = {"format": {"type": "json_schema", "name": "pet", "schema": Pet.model_json_schema()}}
    pet = served.client.responses.create(model=UID, input="A pet?", text=fmt, max_output_tokens=80, temperature=0)
    Pet.model_validate_json(pet.output_text)
    content = [{"type": "input_image", "image_url": image_uri()}, {"type": "input_text", "text": "hi"}]
    seen = served.client.responses.create(model=UID, input=[{"role": "user", "content": content}],
                                          instructions="Be brief.", max_output_tokens=2)
    in_chat = served.chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": content}],
                          max_tokens=2)
    assert seen.usage.input_tokens == in_chat.usage.prompt_tokens > whole.usage.input_tokens


def test_metrics_count_requests_and_tokens(served):
    def scrape() -> dict[str, float]:
        text = httpx.get(f"{served.base}/metrics", timeout=30).text
        return {m[1]: float(m[2]) for m in re.finditer(r'^(vllm:[a-z0-9_]+)\{model_name="tiny-api"\} (\S+)$', text, re.M)
                } | {m[1]: float(m[2]) for m in re.finditer(r'^(vllm:[a-z0-9_]+_count)\{model_name="tiny-api"\} (\S+)$',
                                                            text, re.M)}
    before = scrape()
    served.chat(max_tokens=4)
    after = scrape()
    assert after["vllm:generation_tokens_total"] - before.get("vllm:generation_tokens_total", 0) == 4
    assert after["vllm:e2e_request_latency_seconds_count"] == before.get("vllm:e2e_request_latency_seconds_count", 0) + 1
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:time_to_first_token_seconds_count",
                 "vllm:inter_token_latency_seconds_count", "vllm:request_queue_time_seconds_count",
                 "vllm:prompt_tokens_total"):
        assert name in after


def test_request_id_slashes_tool_choice_none_and_system_only(served):
    given = httpx.get(f"{served.url}/models", headers={"x-request-id": "my-id-42"}, timeout=30)
    assert given.headers["x-request-id"] == "my-id-42"
    assert re.fullmatch(r"[0-9a-f]{32}", httpx.get(f"{served.url}/models", timeout=30).headers["x-request-id"])
    slash = httpx.get(f"{served.url}/models/", timeout=30, follow_redirects=False)
    assert slash.status_code == 200 and slash.json()["data"][0]["id"] == UID
    posted = httpx.post(f"{served.url}/chat/completions/", json={"model": UID, "messages": TEXT, "max_tokens": 2},
                        timeout=60, follow_redirects=False)
    assert posted.status_code == 200
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    assert served.chat(tools=tools, tool_choice="none").choices[0].message.content
    assert served.chat([{"role": "system", "content": "You are terse."}]).choices[0].finish_reason


def test_cors_preflight_for_the_allowed_origin_only(served):
    headers = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}
    ok = httpx.options(f"{served.url}/chat/completions", headers={"Origin": ORIGIN, **headers}, timeout=30)
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == ORIGIN
    assert "authorization" in ok.headers["access-control-allow-headers"]
    other = httpx.options(f"{served.url}/chat/completions", headers={"Origin": "http://evil.test", **headers},
                          timeout=30)
    assert "access-control-allow-origin" not in other.headers
    simple = httpx.get(f"{served.url}/models", headers={"Origin": ORIGIN}, timeout=30)
    assert simple.headers["access-control-allow-origin"] == ORIGIN


def test_cors_is_off_by_default():
    from starlette.applications import Starlette
    from starlette.testclient import TestClient

    from qwenvl_cli.serve import middleware

    client = TestClient(middleware.wrap(Starlette(), ()))
    response = client.options("/v1/models", headers={"Origin": ORIGIN, "Access-Control-Request-Method": "GET"})
    assert "access-control-allow-origin" not in response.headers


# --- docs/server.md's table, probed row by row --------------------------------------------------


def _status(served, path: str, body: dict) -> int:
    return served.post(path, {"model": UID, "max_tokens": 2, **body}).status_code


PROBES = {
    "chat": lambda s: _status(s, "/chat/completions", {"messages": TEXT}) == 200,
    "completions": lambda s: _status(s, "/completions", {"prompt": "hi"}) == 200,
    "responses": lambda s: _status(s, "/responses", {"input": "hi"}) == 200,
    "models": lambda s: httpx.get(f"{s.url}/models", timeout=30).status_code == 200,
    "metrics": lambda s: "vllm:num_requests_running" in httpx.get(f"{s.base}/metrics", timeout=30).text,
    "health": lambda s: s.alive(),
    "json_object": lambda s: _status(s, "/chat/completions", {"messages": TEXT,
                                                              "response_format": {"type": "json_object"}}) == 200,
    "json_schema": lambda s: _status(s, "/chat/completions", {"messages": TEXT, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}}) == 200,
    **{f: (lambda f, v: lambda s: _status(s, "/chat/completions", {"messages": TEXT, f: v}) == 200)(f, v)
       for f, v in {"n": 2, "logprobs": True, "presence_penalty": 0.5, "frequency_penalty": 0.5,
                    "logit_bias": {"5": 1}, "min_p": 0.1, "seed": -1, "top_k": -1, "stop": ["x"],
                    "repetition_penalty": 1.1, "temperature": 0.5, "top_p": 0.9,
                    "max_completion_tokens": 2, "mm_processor_kwargs": {"max_pixels": 50176}}.items()},
    "top_logprobs": lambda s: _status(s, "/chat/completions", {"messages": TEXT, "logprobs": True,
                                                               "top_logprobs": 2}) == 200,
    "stream": lambda s: _status(s, "/chat/completions", {"messages": TEXT, "stream": True}) == 200,
    "stream_options": lambda s: _status(s, "/chat/completions", {"messages": TEXT, "stream": True,
                                                                 "stream_options": {"include_usage": True}}) == 200,
    "tool_choice": lambda s: _status(s, "/chat/completions", {"messages": TEXT, "tool_choice": "none"}) == 200,
    "tools": lambda s: _status(s, "/chat/completions", {"messages": TEXT, "tools": [
        {"type": "function", "function": {"name": "f"}}]}) == 200,
    "input_image": lambda s: _status(s, "/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "input_image", "image_url": image_uri()}]}]}) == 200,
    "cors": lambda s: "access-control-allow-origin" in httpx.options(
        f"{s.url}/models", headers={"Origin": ORIGIN, "Access-Control-Request-Method": "GET"}, timeout=30).headers,
    "x_request_id": lambda s: "x-request-id" in httpx.get(f"{s.url}/models", timeout=30).headers,
    **{f: (lambda f, v: lambda s: _status(s, "/chat/completions", {"messages": TEXT, f: v}) == 200)(f, v)
       for f, v in {"best_of": 2, "use_beam_search": True, "min_tokens": 2, "guided_json": {"type": "object"},
                    "guided_regex": "a", "guided_choice": ["a"], "prompt_logprobs": 1, "echo": True}.items()},
}


def _table() -> list[tuple[str, str]]:
    text = (ROOT / "docs" / "server.md").read_text()
    rows = re.findall(r"^\| `([a-z_]+)` \|[^|]*\|[^|]*\| (yes|no)[^|]*\|", text, re.M)
    assert len(rows) >= 20, "docs/server.md lost its API table"
    return rows


def test_the_api_table_in_the_docs_is_true(served):
    rows = _table()
    assert sorted(PROBES) == sorted(name for name, _ in rows), "every row has a probe, every probe a row"
    wrong = [(name, said) for name, said in rows if PROBES[name](served) != (said == "yes")]
    assert wrong == [], f"docs/server.md says these wrongly (row, says): {wrong}"
    assert served.alive()


# --- issue 15: random and boundary values at every field: never a 500 ---------------------------


def test_random_and_boundary_values_never_get_a_500(served):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    odd = st.one_of(
        st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
        st.sampled_from([0, 1, -1, 2, 16, 17, 20, 21, 100, 2**31, 2**63, 2**64, 2**64 + 1, 1e-300, -1e-300,
                         1e300, 0.5, 1.0, 2.0, 2.0000001, -2.0000001, 3136, 12845056, 12845057]),
        st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8), st.just("\ud800"),
        st.lists(st.integers(-5, 5) | st.text(max_size=3), max_size=3),
        st.dictionaries(st.text(max_size=4), st.integers(-200, 200) | st.text(max_size=2), max_size=3))
    fields = ["max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p",
              "repetition_penalty", "presence_penalty", "frequency_penalty", "logit_bias", "seed", "n",
              "logprobs", "top_logprobs", "stop", "stream", "stream_options", "response_format", "tools",
              "tool_choice", "ignore_eos", "min_pixels", "max_pixels", "fps", "max_frames",
              "mm_processor_kwargs", "user", "model", "messages"]
    part_fields = ["min_pixels", "max_pixels", "resized_height", "resized_width", "fps", "nframes"]
    image = image_uri()

    @settings(max_examples=40, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.dictionaries(st.sampled_from(fields), odd, max_size=4),
           st.dictionaries(st.sampled_from(part_fields), odd, max_size=2))
    def probe(body: dict, part: dict) -> None:
        content = [{"type": "image_url", "image_url": {"url": image}, **part}, {"type": "text", "text": "hi"}]
        body = {"model": UID, "messages": [{"role": "user", "content": content}], **body}
        if not isinstance(body.get("max_tokens"), int) or body.get("max_tokens", 0) > 3:
            body["max_completion_tokens"] = 2  # keep the answers that do run short
        raw = json.dumps(body, ensure_ascii=False, allow_nan=True).encode("utf-8", "surrogatepass")
        response = httpx.post(f"{served.url}/chat/completions", content=raw, timeout=120,
                              headers={"Content-Type": "application/json"})
        assert response.status_code in (200, 400, 404), (body, response.status_code, response.text[:300])
        if response.status_code != 200:
            error = response.json()["error"]
            assert error["message"] and error["type"] == ("not_found_error" if response.status_code == 404
                                                          else "invalid_request_error")

    probe()
    assert served.alive()


# --- the client libraries people use ------------------------------------------------------------


def test_langchain_chat_openai_plain_streamed_and_structured(served):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model=UID, base_url=served.url, api_key="none", temperature=0, max_tokens=6,
                     max_retries=0, timeout=120)
    plain = llm.invoke("Hello there.")
    assert plain.content == served.chat(max_tokens=6).choices[0].message.content
    assert "".join(chunk.content for chunk in llm.stream("Hello there.")) == plain.content
    structured = ChatOpenAI(model=UID, base_url=served.url, api_key="none", temperature=0, max_tokens=80,
                            max_retries=0, timeout=120).with_structured_output(Pet, method="json_schema")
    assert isinstance(structured.invoke("Describe a pet."), Pet)


def test_litellm_recognises_the_context_overflow(served, monkeypatch):
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no fetch of the price list
    import litellm

    answer = litellm.completion(model=f"openai/{UID}", api_base=served.url, api_key="none",
                                messages=TEXT, max_tokens=6, temperature=0)
    assert answer.choices[0].message.content == served.chat(max_tokens=6).choices[0].message.content
    with pytest.raises(litellm.ContextWindowExceededError):  # what its fallbacks key on
        litellm.completion(model=f"openai/{UID}", api_base=served.url, api_key="none", messages=TEXT,
                           max_tokens=CONTEXT, num_retries=0)


def test_a_malformed_content_length_gets_an_openai_400(served):
    import socket

    host, port = served.base.split("//")[1].split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 12abc\r\n\r\n{}")
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and b"application/json" in head
    assert json.loads(body)["error"]["type"] == "invalid_request_error"
    assert served.alive()
