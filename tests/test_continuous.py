"""Continuous batching (Engine.run_continuous, qwenvl_cli.engine.continuous) on the tiny checkpoint.

Every request decoded in a shared, changing batch must get the answer it gets alone
(greedy, float32): joining, growing the batch, shifting and compacting the cache, and
cancelling one request must not disturb the others.
"""

from __future__ import annotations

import pytest

from qwenvl_cli.generation import GenerationParams, collect
from test_fastpath import _engine

QUESTIONS = ["Hello there.", "Tell me a story about a cat.", "What is in the picture?", "Describe this image.",
             "Count the objects.", "Thank you!"]


@pytest.fixture(scope="module")
def fast(tiny_model):
    return _engine(tiny_model, decode_loop="qvl", static_cache="on")


def _alone(engine, question, params):
    return collect(engine.stream([{"role": "user", "content": question}], params))


def _schedule(engine, plan, params):
    """Jobs arriving by call of take(): plan = {call index: [questions]} -> (answers, calls)."""
    jobs = {i: [(q, engine.job([{"role": "user", "content": q}], params)) for q in qs] for i, qs in plan.items()}
    calls = []
    waiting = []

    def take(free, wait):
        n = len(calls)
        calls.append((free, wait))
        for i in sorted(k for k in jobs if k <= n):
            waiting.extend(jobs.pop(i))
        if wait and not waiting and jobs:  # nothing running: let the next arrival come now
            waiting.extend(jobs.pop(min(jobs)))
        out = waiting[:free]
        del waiting[:free]
        return [job for _, job in out], out

    names = {}

    def take_jobs(free, wait):
        out, pairs = take(free, wait)
        names.update({id(job): q for q, job in pairs})
        return out

    answers: dict[str, list] = {}
    for job, chunk in engine.run_continuous(take_jobs, max_batch=4):
        answers.setdefault(names[id(job)], []).append(chunk)
    return {q: collect(c) for q, c in answers.items()}, calls


def test_requests_joining_a_running_batch_get_their_own_answers(fast):
    params = GenerationParams(max_tokens=30, temperature=0)
    answers, calls = _schedule(fast, {0: QUESTIONS[:1], 2: QUESTIONS[1:2], 5: QUESTIONS[2:4], 9: QUESTIONS[4:]},
                               params)
    stats = fast.decoder.last["continuous"]
    assert stats["joins"] == len(QUESTIONS)
    assert stats["grows"] >= 1 and stats["shifts"] >= 1  # 1 -> 2 -> 4 rows; a longer prompt joined
    for q in QUESTIONS:
        alone = _alone(fast, q, params)
        assert (answers[q].text, answers[q].finish_reason, answers[q].usage) == \
            (alone.text, alone.finish_reason, alone.usage), q
    assert calls[0] == (4, True) and any(not wait for _, wait in calls)


def test_the_cache_is_compacted_when_a_joiner_would_not_fit(fast):
    from qwenvl_cli.engine import continuous

    params = GenerationParams(max_tokens=100, ignore_eos=True)
    # take() is called once per step while a row is free: A alone for 49 steps, B joins (rows
    # full), C takes A's row, D takes B's row at t ~ 175 while C (started at ~102) still runs:
    # 175 + 101 > 256, so the rows move left by C's start first.
    plan = {1: ["Hello there."], 50: ["Tell me a story about a cat."], 51: ["Thank you!"], 52: ["Count the objects."]}
    jobs = {i: [(q, fast.job([{"role": "user", "content": q}], params)) for q in qs] for i, qs in plan.items()}
    names, calls, waiting = {}, [0], []

    def take(free, wait):
        calls[0] += 1
        due = [i for i in sorted(jobs) if i <= calls[0]] or (sorted(jobs)[:1] if wait and not waiting else [])
        for i in due:
            waiting.extend(jobs.pop(i))
        ready, waiting[:] = waiting[:free], waiting[free:]
        names.update({id(j): q for q, j in ready})
        return [j for _, j in ready]

    answers: dict[str, list] = {}
    with fast.lock:
        for job, chunk in continuous.run(fast, take, max_batch=2, length=256):
            answers.setdefault(names[id(job)], []).append(chunk)
    stats = fast.decoder.last["continuous"]
    assert stats["length"] == 256 and stats["compactions"] >= 1, (stats, calls)
    for q in ("Hello there.", "Tell me a story about a cat.", "Thank you!", "Count the objects."):
        got, alone = collect(answers[q]), _alone(fast, q, params)
        assert got.text == alone.text and got.usage.completion_tokens == 100, q


def test_a_cancelled_request_leaves_the_others_alone(fast):
    params = GenerationParams(max_tokens=40, ignore_eos=True)
    jobs = [fast.job([{"role": "user", "content": q}], params) for q in QUESTIONS[:3]]
    waiting = list(jobs)

    def take(free, wait):
        out = waiting[:free]
        del waiting[:free]
        return out

    chunks: dict[int, list] = {0: [], 1: [], 2: []}
    for job, chunk in fast.run_continuous(take, max_batch=4):
        i = next(k for k, j in enumerate(jobs) if j is job)
        chunks[i].append(chunk)
        if i == 1 and len(chunks[1]) == 3:
            job.cancel.set()
    assert collect(chunks[1]).finish_reason == "cancelled"
    for i in (0, 2):
        got, alone = collect(chunks[i]), _alone(fast, QUESTIONS[i], params)
        assert got.text == alone.text and got.finish_reason == "length"


def test_a_repetition_penalty_request_runs_on_its_own(fast):
    params = GenerationParams(max_tokens=20, temperature=0, repetition_penalty=1.3)
    job = fast.job([{"role": "user", "content": "Tell me a story."}], params)
    sent = [job]

    def take(free, wait):
        out = sent[:]
        sent.clear()
        return out

    got = collect(c for _, c in fast.run_continuous(take))
    assert got.text == _alone(fast, "Tell me a story.", params).text


def test_without_a_static_cache_requests_are_batched_statically(tiny_model):
    plain = _engine(tiny_model)  # transformers' generate on CPU
    params = GenerationParams(max_tokens=16, temperature=0)
    jobs = [plain.job([{"role": "user", "content": q}], params) for q in QUESTIONS[:3]]
    waiting, takes = list(jobs), []

    def take(free, wait):
        takes.append(free)
        out = waiting[:2]  # two now, the third joins the next batch
        del waiting[:2]
        return out

    answers: dict[int, list] = {}
    for job, chunk in plain.run_continuous(take, max_batch=4):
        answers.setdefault(next(k for k, j in enumerate(jobs) if j is job), []).append(chunk)
    for i, q in enumerate(QUESTIONS[:3]):
        assert collect(answers[i]).text == _alone(plain, q, params).text
    assert len(takes) >= 3


def test_the_server_scheduler_joins_requests_into_the_running_batch(fast):
    """The server's Scheduler uses continuous batching when the engine has a static cache."""
    import threading

    from qwenvl_cli.serve.scheduler import DONE, QueuedRequest, Scheduler

    params = GenerationParams(max_tokens=24, temperature=0)
    scheduler = Scheduler(fast, max_pending=16, max_batch=4)
    results: dict[str, list] = {}
    done = {q: threading.Event() for q in QUESTIONS}

    def emit_for(q):
        def emit(item):
            if item is DONE:
                done[q].set()
            else:
                results.setdefault(q, []).append(item)
        return emit

    try:
        for q in QUESTIONS:
            messages = [{"role": "user", "content": q}]
            scheduler.submit(QueuedRequest(messages, params, fast.prepare(messages), emit_for(q)))
        assert all(event.wait(120) for event in done.values())
        stats = scheduler.stats()
    finally:
        scheduler.close()
    assert stats["completed"] == len(QUESTIONS) and stats["failed"] == 0 and stats["largest_batch"] > 1
    for q in QUESTIONS:
        assert not any(isinstance(item, BaseException) for item in results[q])
        assert collect(results[q]).text == _alone(fast, q, params).text


@pytest.mark.gpu
def test_on_a_gpu_graphs_and_gpu_preprocessing_keep_the_answers(tiny_model, tmp_path):
    """CUDA graphs in a continuous batch, and pixels normalised on the GPU, change no answer."""
    from PIL import Image

    from qwenvl_cli.engine.engine import Engine

    from qwenvl_cli.engine.options import EngineOptions

    image = tmp_path / "noise.png"
    Image.effect_noise((112, 84), 60).convert("RGB").save(image)
    fast = Engine.load(tiny_model, EngineOptions(device="cuda", dtype="float32", compile="graphs"))
    plain = Engine.load(tiny_model, EngineOptions(device="cuda", dtype="float32", decode_loop="generate",
                                                  gpu_preprocess="off"))
    assert fast.describe()["decode"] == "qvl loop, cuda-graph step, GPU preprocessing"
    messages = [{"role": "user", "content": [{"type": "image", "image": str(image)},
                                             {"type": "text", "text": "Describe this image."}]}]
    assert fast.prepare(messages).inputs["pixel_values"].is_cuda
    params = GenerationParams(max_tokens=24, temperature=0)
    assert collect(fast.stream(messages, params)).text == collect(plain.stream(messages, params)).text
    answers, _ = _schedule(fast, {0: QUESTIONS[:2], 3: QUESTIONS[2:]}, params)
    for q in QUESTIONS:
        assert answers[q].text == _alone(plain, q, params).text
