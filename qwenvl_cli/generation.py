"""Generation parameters, the result records every consumer reads, and the pure text logic
of streaming (incremental detokenisation, stop strings). No torch here.

The engine yields :class:`Chunk` records: text deltas, then one final chunk with the finish
reason, token counts and timings. The one-shot printer, the REPL, the HTTP stream and
`qvl batch` all consume the same iterator.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from qwenvl_cli.errors import UsageError

DEFAULT_MAX_TOKENS = 2048


@dataclass(frozen=True)
class GenerationParams:
    """Sampling options; None means "what the checkpoint's generation_config says"."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # benchmarks: always generate max_tokens tokens
    min_p: float | None = None
    presence_penalty: float | None = None  # OpenAI's: subtracted once from every token seen
    frequency_penalty: float | None = None  # OpenAI's: subtracted per occurrence
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    n: int = 1  # answers per request, decoded together as rows of one batch
    logprobs: bool = False  # each token's log-probability (and top_logprobs alternatives)
    top_logprobs: int = 0
    grammar: tuple[str, str] | None = None  # ("json_object", "") or ("json_schema", schema JSON)

    def validated(self) -> GenerationParams:
        """Return self, or raise UsageError naming the bad value and its valid range."""
        checks = [
            ("max_tokens", self.max_tokens, lambda v: v >= 1, "a whole number of at least 1"),
            ("temperature", self.temperature, lambda v: 0 <= v <= 2, "between 0 and 2"),
            ("top_p", self.top_p, lambda v: 0 < v <= 1, "above 0 and at most 1"),
            ("top_k", self.top_k, lambda v: v >= -1, "-1 or 0 (off), or more"),
            ("min_p", self.min_p, lambda v: 0 <= v <= 1, "between 0 and 1"),
            ("presence_penalty", self.presence_penalty, lambda v: -2 <= v <= 2, "between -2 and 2"),
            ("frequency_penalty", self.frequency_penalty, lambda v: -2 <= v <= 2, "between -2 and 2"),
            ("n", self.n, lambda v: 1 <= v <= 16, "between 1 and 16"),
            ("repetition_penalty", self.repetition_penalty, lambda v: v > 0, "above 0"),
            ("seed", self.seed, lambda v: 0 <= v < 2**64, "0 or more, below 2**64"),
        ]
        for name, value, ok, wanted in checks:
            if value is not None and (isinstance(value, bool) or not ok(value)):
                raise UsageError(f"{name} must be {wanted}, not {value}",
                                 f"set --{name.replace('_', '-')} (\"{name}\" in a request) to {wanted}")
        if any(not isinstance(s, str) or s == "" for s in self.stop):
            raise UsageError("stop sequences must be non-empty strings", "fix --stop / 'stop'")
        if len(self.stop) > 16:
            raise UsageError(f"at most 16 stop sequences, not {len(self.stop)}", "send fewer stop sequences")
        return self

    def batch_key(self) -> tuple:
        """Requests with equal keys can be decoded together (one sampler for the batch);
        max_tokens and stop may differ: they are applied per request."""
        return (self.temperature, self.top_p, self.top_k, self.repetition_penalty, self.seed, self.ignore_eos,
                self.min_p, self.presence_penalty, self.frequency_penalty, self.logit_bias, self.n,
                self.logprobs, self.top_logprobs, self.grammar)

    def history_free(self) -> bool:
        """Whether the token choice looks at nothing but the last logits (no penalty on the
        tokens so far): such requests can join a continuous batch."""
        return (self.repetition_penalty in (None, 1.0) and not self.presence_penalty
                and not self.frequency_penalty and self.grammar is None and not self.logprobs and self.n == 1)

    def merged(self, **overrides: Any) -> GenerationParams:
        """A copy with the non-None overrides applied (per-request options over defaults)."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


def sampling_note(params: GenerationParams, default_top_k: int | None, default_top_p: float | None,
                  repl: bool = False) -> str | None:
    """A warning when --temperature cannot change anything: Qwen2-VL's generation_config
    keeps top_k 1 and top_p 0.001 (near greedy) unless --top-k / --top-p override them.
    The defaults are the checkpoint's; ``repl`` words it for the interactive chat (/set),
    where /retry would repeat the answer. Both engines call this."""
    if not params.temperature:
        return None
    top_k = params.top_k if params.top_k is not None else (default_top_k or 0)
    top_p = params.top_p if params.top_p is not None else (default_top_p or 1.0)
    if not (top_k == 1 or top_p < 0.01):
        return None
    if repl:
        return (f"temperature {params.temperature} has little effect while top_k is {top_k} and top_p {top_p} "
                "(the checkpoint's generation_config), so /retry gives the same answer: "
                "/set top_k 0 and /set top_p 0.9 for varied answers")
    return (f"--temperature {params.temperature} has little effect while top_k is {top_k} and top_p "
            f"{top_p} (the checkpoint's generation_config); add --top-k 0 --top-p 0.9 for varied answers")


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_dict(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.total_tokens}


@dataclass(frozen=True)
class Timings:
    """Seconds from the start of the request (preprocessing included) to the first token,
    and decode speed over the tokens after the first."""

    time_to_first_token: float
    total: float
    tokens_per_second: float

    def to_dict(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class Chunk:
    """One streamed record: a text delta, or (last) the finish reason with usage and timings."""

    text: str = ""
    finish_reason: str | None = None  # "stop", "length" or "cancelled" on the last chunk
    usage: Usage | None = None
    timings: Timings | None = None
    index: int = 0  # which of the request's n answers
    logprobs: tuple[TokenLogprob, ...] = ()  # the tokens of this delta, when asked for


@dataclass
class Answer:
    """A whole answer collected from a stream of chunks."""

    text: str = ""
    finish_reason: str | None = None
    usage: Usage | None = None
    timings: Timings | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    logprobs: list[TokenLogprob] = field(default_factory=list)

    def add(self, chunk: Chunk) -> None:
        self.text += chunk.text
        self.logprobs.extend(chunk.logprobs)
        if chunk.finish_reason is not None:
            self.finish_reason = chunk.finish_reason
            self.usage = chunk.usage
            self.timings = chunk.timings

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "finish_reason": self.finish_reason,
                "usage": self.usage.to_dict() if self.usage else None,
                "timings": self.timings.to_dict() if self.timings else None, **self.extra}


def collect(chunks) -> Answer:
    answer = Answer()
    for chunk in chunks:
        answer.add(chunk)
    return answer


def stats_line(answer: Answer) -> str:
    """'12 prompt + 34 completion tokens, first token 0.21 s, 38.5 tokens/s, finish: stop'."""
    u, t = answer.usage, answer.timings
    if u is None or t is None:
        return f"finish: {answer.finish_reason}"
    return (f"{u.prompt_tokens} prompt + {u.completion_tokens} completion tokens, "
            f"first token {t.time_to_first_token:.2f} s, {t.tokens_per_second:.1f} tokens/s, "
            f"finish: {answer.finish_reason}")


class IncrementalDecoder:
    """Turns a growing list of token ids into text deltas without re-decoding everything.

    Decodes only a short window (the standard prefix/read offset scheme) and holds text
    back while it ends in an incomplete UTF-8 sequence (U+FFFD).
    """

    def __init__(self, decode: Callable[[Sequence[int]], str]) -> None:
        self.decode = decode
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def push(self, token_ids: Sequence[int]) -> str:
        self.ids.extend(token_ids)
        prefix = self.decode(self.ids[self.prefix_offset:self.read_offset])
        full = self.decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return full[len(prefix):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete sequence at the very end)."""
        prefix = self.decode(self.ids[self.prefix_offset:self.read_offset])
        full = self.decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix):]


class StopText:
    """Applies stop strings to streamed text: emits only what cannot be the start of a stop
    string, and cuts the text before the first stop string (which is not returned)."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            out, self.pending = self.pending[:min(hits)], ""
            return out
        keep = self._held_back()
        out = self.pending[:len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep:]
        return out

    def _held_back(self) -> int:
        """Length of the longest suffix of pending text that is a prefix of a stop string."""
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.pending)), best, -1):
                if self.pending.endswith(stop[:n]):
                    best = n
                    break
        return best

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out


class TokenStream:
    """One request's state while its tokens arrive: text deltas, stop strings, end of
    sequence, the token budget, and the final record with usage and timings.

    ``push`` and ``close`` return the chunks to hand to the consumer; after the final
    chunk the stream ignores further tokens (a batch may still be generating for others).
    """

    def __init__(self, decode: Callable[[Sequence[int]], str], eos_ids: set[int], stop: Sequence[str],
                 max_tokens: int, prompt_tokens: int, start: float, index: int = 0) -> None:
        self.decoder = IncrementalDecoder(decode)
        self.index = index
        self.held: list[TokenLogprob] = []  # logprobs of tokens whose text is held back
        self.stops = StopText(stop)
        self.eos_ids = eos_ids
        self.max_tokens = max_tokens
        self.prompt_tokens = prompt_tokens
        self.start = start
        self.count = 0
        self.first_at: float | None = None
        self.finish: str | None = None

    @property
    def done(self) -> bool:
        return self.finish is not None

    def push(self, ids: Sequence[int], now: float, logprobs: Sequence[tuple[float, list]] | None = None) -> list[Chunk]:
        """The chunks for these new tokens; ``logprobs`` (one (logprob, [(token, logprob)])
        per id) puts each kept token's log-probability on the chunk that carries its text."""
        if self.done:
            return []
        self.first_at = self.first_at or now
        kept: list[int] = []
        reason = None
        for token in ids:
            self.count += 1
            if token in self.eos_ids:
                reason = "stop"
                break
            kept.append(token)
            if logprobs is not None:
                value, top = logprobs[len(kept) - 1]
                self.held.append(TokenLogprob(self.decoder.decode([token]), value,
                                              tuple((self.decoder.decode([t]), v) for t, v in top)))
            if self.count >= self.max_tokens:
                reason = "length"
                break
        text = self.stops.feed(self.decoder.push(kept)) if kept else ""
        out = [self._chunk(text=text)] if text else []
        if self.stops.stopped:
            reason = "stop"
        if reason:
            out += self.close(reason, now)
        return out

    def close(self, reason: str, now: float) -> list[Chunk]:
        """Finish with ``reason`` (stop, length, cancelled): the held-back text, then the record."""
        if self.done:
            return []
        self.finish = reason
        tail = "" if self.stops.stopped else self.stops.feed(self.decoder.flush()) + self.stops.flush()
        first = self.first_at or now
        decode_s = now - first
        tps = (self.count - 1) / decode_s if self.count > 1 and decode_s > 0 else 0.0
        out = [self._chunk(text=tail)] if tail else []
        return out + [self._chunk(finish_reason=reason, usage=Usage(self.prompt_tokens, self.count),
                                  timings=Timings(first - self.start, now - self.start, tps))]

    def _chunk(self, **fields: Any) -> Chunk:
        held, self.held = tuple(self.held), []
        return Chunk(index=self.index, logprobs=held, **fields)
