"""The engine's sampling additions on the tiny checkpoint, in qvl's decode loop and in
transformers' generate: the grammar mask per row of a batch, n answers, logprobs, the
presence / frequency penalties, logit_bias, and greedy answers unchanged by all of it."""

from __future__ import annotations

import json
import math
from typing import Literal

import pydantic
import pytest

from qwenvl_cli.engine.engine import Engine
from qwenvl_cli.engine.options import EngineOptions
from qwenvl_cli.engine.sampling import Penalties
from qwenvl_cli.generation import GenerationParams, collect

MESSAGES = [{"role": "user", "content": [{"type": "text", "text": "Tell me about a pet."}]}]


class Pet(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=8)
    kind: Literal["cat", "dog"]
    legs: int = pydantic.Field(ge=0, le=8)


SCHEMA = ("json_schema", json.dumps(Pet.model_json_schema()))


@pytest.fixture(scope="module", params=["qvl", "generate"])
def engine(request, tiny_model):
    return Engine.load(tiny_model, EngineOptions(device="cpu", decode_loop=request.param))


def answers(engine, params, messages=MESSAGES):
    """The request's n answers, by index."""
    chunks: dict[int, list] = {}
    for _, chunk in engine.run_jobs([engine.job(messages, params)]):
        chunks.setdefault(chunk.index, []).append(chunk)
    return [collect(chunks[i]) for i in sorted(chunks)]


def test_penalties_count_only_the_generated_tokens():
    import torch

    ids = torch.tensor([[7, 7, 1, 1, 2]])  # a prompt of 2 tokens (7, 7), then 1, 1, 2
    scores = torch.zeros((1, 10))
    out = Penalties(start=2, presence=0.5, frequency=0.25)(ids, scores)
    assert out[0, 1].item() == pytest.approx(-(0.5 + 2 * 0.25))
    assert out[0, 2].item() == pytest.approx(-(0.5 + 0.25))
    assert out[0, 7].item() == 0 and out[0, 0].item() == 0


def test_every_sampled_row_of_a_constrained_batch_validates(engine):
    params = GenerationParams(max_tokens=100, temperature=1.0, top_k=0, top_p=1.0, seed=5, n=3, grammar=SCHEMA)
    rows = answers(engine, params)
    assert len(rows) == 3
    for row in rows:
        assert row.finish_reason == "stop", row.text
        Pet.model_validate_json(row.text)


def test_greedy_is_unchanged_and_the_same_in_both_loops(engine, tiny_model):
    greedy = GenerationParams(max_tokens=12, temperature=0)
    one = answers(engine, greedy)[0].text
    assert [a.text for a in answers(engine, greedy.merged(n=2))] == [one, one]
    reference = Engine.load(tiny_model, EngineOptions(device="cpu", decode_loop="qvl"))
    constrained = GenerationParams(max_tokens=100, temperature=0, grammar=SCHEMA)
    assert answers(engine, constrained)[0].text == answers(reference, constrained)[0].text
    assert answers(reference, greedy)[0].text == one


def test_logprobs_match_the_greedy_choice(engine):
    rows = answers(engine, GenerationParams(max_tokens=6, temperature=0, logprobs=True, top_logprobs=2))
    items = rows[0].logprobs
    assert len(items) == rows[0].usage.completion_tokens
    for item in items:
        assert item.top[0][1] == pytest.approx(item.logprob, abs=1e-5) and item.logprob <= 0
        assert math.exp(item.top[0][1]) + math.exp(item.top[1][1]) <= 1 + 1e-5


def test_logit_bias_and_penalties_change_the_greedy_answer(engine):
    plain = answers(engine, GenerationParams(max_tokens=8, temperature=0, logprobs=True))[0]
    forced = answers(engine, GenerationParams(max_tokens=4, temperature=0, logit_bias=((100, 100.0),),
                                              logprobs=True))[0]
    assert {t.token for t in forced.logprobs} == {engine.processor.tokenizer.decode([100])}
    penalised = answers(engine, GenerationParams(max_tokens=8, temperature=0, frequency_penalty=2.0,
                                                 presence_penalty=2.0, logprobs=True))[0]
    tokens = [t.token for t in penalised.logprobs]
    assert penalised.text != plain.text and len(set(tokens)) >= len(set(t.token for t in plain.logprobs))


@pytest.mark.gpu
def test_the_grammar_mask_on_a_gpu(tiny_model):
    gpu = Engine.load(tiny_model, EngineOptions(device="cuda"))
    params = GenerationParams(max_tokens=100, temperature=1.0, top_k=0, top_p=1.0, seed=5, n=4, grammar=SCHEMA)
    for row in answers(gpu, params):
        Pet.model_validate_json(row.text)
