"""The fit check under vLLM's tensor parallel (every GPU holds 1/N of every layer; N must divide
the attention heads) against transformers' layer split. GPUs are simulated (QVL_FAKE_GPUS)."""

from __future__ import annotations

import pytest

from qwenvl_cli.catalogue.resolve import SpecQuery, resolve
from qwenvl_cli.fit import check as fit
from qwenvl_cli.fit import gpus, memory
from qwenvl_cli.fit.memory import Workload

TP = Workload(tensor_parallel=True)


@pytest.fixture
def machine(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)

    def make(value: str):
        monkeypatch.setenv(gpus.FAKE_ENV, value)
        return gpus.query(None)

    return make


def test_tensor_parallel_splits_weights_and_kv_evenly():
    spec = resolve(size_in_billions="72")
    layers, tp = memory.estimate(spec), memory.estimate(spec, TP)
    assert tp.total == layers.total  # the same bytes, placed differently
    for n in (2, 4, 8):
        shares = tp.per_gpu(n)
        assert len(set(shares)) == 1 and len(shares) == n
        # each GPU: 1/n of weights and KV cache, plus what every GPU repeats (prefill, context)
        assert shares[0] * n > tp.total and shares[0] < tp.total / n + 4 * 2**30
    assert [n for n in range(1, 9) if tp.splits_into(n)] == [1, 2, 4, 8]  # 64 heads, 8 KV heads
    seven = memory.estimate(resolve(size_in_billions="7"), TP)
    assert [n for n in range(1, 9) if seven.splits_into(n)] == [1, 2, 4]  # 28 heads, 4 KV heads: not 7


def test_three_gpus_hold_72b_as_layers_but_not_under_tensor_parallel(machine):
    report = machine("60GiB:59GiB,60GiB:59GiB,60GiB:59GiB")
    spread = fit.resolve_and_check(SpecQuery(size_in_billions="72"), report=report)
    assert spread.fits and len(spread.placement.gpus) == 3
    refused = fit.resolve_and_check(SpecQuery(size_in_billions="72", model_engine="vllm"), report=report)
    assert refused.fits is False  # 3 does not divide 64 heads, and 2 GPUs cannot hold half of 151 GiB
    assert "gptq -q Int8" in refused.suggestion


def test_auto_counts_the_gpus_tensor_parallel_can_use(machine):
    report = machine("60GiB:59GiB,60GiB:59GiB,60GiB:59GiB")
    hf = fit.resolve_and_check(SpecQuery(size_in_billions="auto"), report=report)
    vllm = fit.resolve_and_check(SpecQuery(size_in_billions="auto", model_engine="vllm"), report=report)
    assert (hf.spec.size_in_billions, hf.spec.model_format) == ("72", "pytorch")
    assert (vllm.spec.size_in_billions, vllm.spec.model_format, vllm.spec.quantization) == ("72", "gptq", "Int8")
    assert len(vllm.placement.gpus) == 2 and len(set(vllm.placement.shares)) == 1
    four = fit.resolve_and_check(SpecQuery(size_in_billions="auto", model_engine="vllm"),
                                 report=machine(",".join(["60GiB:59GiB"] * 4)))
    assert (four.spec.model_format, len(four.placement.gpus)) == ("pytorch", 4)
