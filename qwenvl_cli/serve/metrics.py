"""``GET /metrics``: Prometheus metrics under vLLM's names, so that the dashboards and
alerts written for a vLLM server read a qvl server unchanged (``prometheus_client``, in a
registry of this server's own; imported only in the server process).

Requests running and waiting are read from the scheduler at each scrape; the latencies
and token counts are recorded when an answer ends: time to first token, inter-token
latency, end-to-end latency, queue time (admission to the start of preparation), prompt
and generation tokens, and finished requests by finish reason.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                   7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    def __init__(self, model: str) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        labels = ["model_name"]
        self.model = model

        def histogram(name: str, doc: str) -> Any:
            return Histogram(name, doc, labels, buckets=LATENCY_BUCKETS, registry=self.registry)

        self.running = Gauge("vllm:num_requests_running", "Requests decoding now.", labels, registry=self.registry)
        self.waiting = Gauge("vllm:num_requests_waiting", "Requests waiting for the model.", labels,
                             registry=self.registry)
        self.ttft = histogram("vllm:time_to_first_token_seconds", "Time to the first token.")
        self.itl = histogram("vllm:inter_token_latency_seconds", "Time between two output tokens.")
        self.e2e = histogram("vllm:e2e_request_latency_seconds", "Request latency, end to end.")
        self.queue = histogram("vllm:request_queue_time_seconds", "Time spent waiting in the queue.")
        self.prompt = Counter("vllm:prompt_tokens", "Prompt tokens processed.", labels, registry=self.registry)
        self.generated = Counter("vllm:generation_tokens", "Tokens generated.", labels, registry=self.registry)
        self.success = Counter("vllm:request_success", "Finished requests, by finish reason.",
                               [*labels, "finished_reason"], registry=self.registry)

    def finished(self, answers: Sequence[Any], started: float) -> None:
        """Record one answered request (``started``: time.monotonic() at its arrival)."""
        answer = answers[0] if answers else None
        if answer is None or answer.usage is None:
            return
        m = self.model
        elapsed = time.monotonic() - started
        self.e2e.labels(m).observe(elapsed)
        self.prompt.labels(m).inc(answer.usage.prompt_tokens)
        self.generated.labels(m).inc(sum(a.usage.completion_tokens for a in answers if a.usage))
        for a in answers:
            self.success.labels(m, a.finish_reason or "stop").inc()
        t = answer.timings
        if t is not None:
            self.ttft.labels(m).observe(t.time_to_first_token)
            self.queue.labels(m).observe(max(0.0, elapsed - t.total))
            if answer.usage.completion_tokens > 1:
                self.itl.labels(m).observe((t.total - t.time_to_first_token) / (answer.usage.completion_tokens - 1))

    def scrape(self, stats: dict[str, int] | None) -> bytes:
        from prometheus_client import generate_latest

        self.running.labels(self.model).set((stats or {}).get("running", 0))
        self.waiting.labels(self.model).set((stats or {}).get("waiting", 0))
        return generate_latest(self.registry)
