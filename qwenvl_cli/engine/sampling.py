"""Token selection on the device, with transformers' own logits processors.

:meth:`Sampler.build` reads ``generate``'s keyword arguments the way ``generate`` does
(the checkpoint's generation_config, then the call's overrides) and builds the same
LogitsProcessorList, so that qvl's loop picks the same tokens: argmax for greedy decoding,
``torch.multinomial`` over the processed distribution when sampling (the same random
stream, so a seed gives the same answer). None of it reads device values on the host.

One shortcut: with ``top_k == 1`` (Qwen2-VL's published generation_config samples with
top_k 1, top_p 0.001, temperature 0.01) sampling can only return the most likely token,
so the warpers and the draw are skipped and the argmax is taken (identical unless two
logits are exactly equal).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

GENERATION_ONLY = ("max_new_tokens", "pad_token_id", "eos_token_id", "do_sample", "temperature", "top_p",
                   "top_k", "repetition_penalty", "min_new_tokens", "max_length", "min_length")


@dataclass
class Sampler:
    processors: Any  # LogitsProcessorList applied before the choice
    do_sample: bool
    max_new_tokens: int
    pad_id: int
    pad: Any  # pad id as a device tensor
    eos: Any  # eos ids as a device tensor, or None
    eos_set: frozenset[int]

    @classmethod
    def build(cls, model: Any, input_ids: Any, kwargs: dict[str, Any]) -> tuple[Sampler, dict[str, Any]]:
        """(sampler, the remaining model inputs) from ``generate``-style kwargs."""
        import torch

        kwargs = dict(kwargs)
        custom = kwargs.pop("logits_processor", None) or []
        config, model_inputs = model._prepare_generation_config(None, **kwargs)
        device = input_ids.device
        model._prepare_special_tokens(config, True, device=device)
        prompt = int(input_ids.shape[-1])
        max_new = config.max_new_tokens
        if max_new is None:
            max_new = max(0, int(config.max_length) - prompt)
        greedy = not config.do_sample or config.top_k == 1
        if greedy and config.do_sample:  # top_k 1: leave the warpers (and the draw) out
            config.do_sample = False
        processors = model._get_logits_processor(config, input_ids_seq_length=prompt, device=device)
        if custom:  # qvl's own processors first: they see the model's logits (see extra_processors)
            from transformers import LogitsProcessorList

            processors = LogitsProcessorList([*custom, *processors])
        eos = config._eos_token_tensor
        pad = config._pad_token_tensor
        if pad is None:
            pad = eos[0] if eos is not None else torch.tensor(0, device=device)
        eos_set = frozenset(int(e) for e in eos.reshape(-1).tolist()) if eos is not None else frozenset()
        sampler = cls(processors, bool(config.do_sample), int(max_new), int(pad), pad.to(device),
                      eos.to(device) if eos is not None else None, eos_set)
        return sampler, model_inputs

    def select(self, ids: Any, logits: Any) -> Any:
        """The next token of every row (B,) from the last logits (B, V) in float32; processors
        that want the choice at once (the grammar mask) get it."""
        import torch

        scores = self.processors(ids, logits) if len(self.processors) else logits
        if self.do_sample:
            probs = torch.nn.functional.softmax(scores, dim=-1)
            tokens = torch.multinomial(probs, num_samples=1).squeeze(1)
        else:
            tokens = torch.argmax(scores, dim=-1)
        for processor in self.processors:
            if hasattr(processor, "chosen"):
                processor.chosen(tokens)
        return tokens


SAMPLING_EPS = 1e-5  # as vLLM: a temperature below this is greedy (1e-300 would divide to inf)


def generate_kwargs(params: Any, max_new_tokens: int, pad_id: int, eos_ids: set[int]) -> dict[str, Any]:
    """Keyword arguments for ``model.generate`` from GenerationParams over the checkpoint's
    defaults. ``top_k`` 0 (vLLM's -1) switches the checkpoint's top-k off."""
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "pad_token_id": pad_id,
                              "eos_token_id": sorted(eos_ids)}
    if params.temperature is not None and params.temperature < SAMPLING_EPS:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    else:
        if params.temperature is not None:
            kwargs.update(do_sample=True, temperature=params.temperature)
        if params.top_p is not None:
            kwargs["top_p"] = params.top_p
        if params.top_k is not None:
            kwargs["top_k"] = params.top_k
        if params.min_p is not None:
            kwargs["min_p"] = params.min_p
    if params.repetition_penalty is not None:
        kwargs["repetition_penalty"] = params.repetition_penalty
    if params.logit_bias:
        kwargs["sequence_bias"] = {(token,): bias for token, bias in params.logit_bias}
    if params.ignore_eos:
        kwargs["min_new_tokens"] = max_new_tokens
    return kwargs


class Penalties:
    """OpenAI's presence and frequency penalties over the tokens generated so far (the
    columns after ``start``): ``logit -= frequency * count + presence * (count > 0)``."""

    def __init__(self, start: int, presence: float, frequency: float) -> None:
        self.start, self.presence, self.frequency = start, presence, frequency

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        out = input_ids[:, self.start:]
        if out.shape[1] == 0:
            return scores
        counts = torch.zeros_like(scores).scatter_add_(1, out, torch.ones_like(out, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


class LogprobRecorder:
    """First in the processor list: keeps each step's log-softmax of the model's own logits
    (before any penalty, bias, mask or temperature, as vLLM's default), to be matched with
    the tokens chosen, one step at a time, in order (generate runs it on another thread)."""

    def __init__(self, top: int) -> None:
        import collections

        self.top = top
        self.steps: collections.deque = collections.deque()

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        logprobs = torch.log_softmax(scores.float(), dim=-1)
        top = torch.topk(logprobs, self.top, dim=-1) if self.top else None
        self.steps.append((logprobs, top))
        return scores

    def take(self, tokens: list[int]) -> list[tuple[float, list[tuple[int, float]]]]:
        """Per row: (log-probability of its token, [(token, logprob) of the top ones])."""
        logprobs, top = self.steps.popleft()
        rows = []
        for row, token in enumerate(tokens):
            best = list(zip(top.indices[row].tolist(), top.values[row].tolist())) if top is not None else []
            rows.append((float(logprobs[row, token]), best))
        return rows


class GrammarMask:
    """The xgrammar logits mask for every row of a batch: each row has its own matcher,
    advanced by the token its row chose at the step before.

    In qvl's loop the sampler hands the chosen tokens over at once (:meth:`chosen`), and the
    matchers advance and fill the next mask on a thread while the model runs its forward
    pass (xgrammar releases the GIL); in transformers' generate, which has no such hook,
    the mask is filled when the next logits arrive, from the last column of the ids."""

    def __init__(self, compiled: Any, rows: int, start: int, vocab: int, control: Any) -> None:
        import xgrammar as xgr

        self.matchers = [xgr.GrammarMatcher(compiled) for _ in range(rows)]
        self.start, self.vocab, self.control = start, vocab, control
        self.bitmask = xgr.allocate_token_bitmask(rows, vocab)
        self.ahead: Any = None  # the thread filling the next mask, started by chosen()

    def _advance_and_fill(self, last: list[int] | None) -> None:
        for row, matcher in enumerate(self.matchers):
            if last is not None and not matcher.is_terminated():
                matcher.accept_token(last[row])
            if matcher.is_terminated():
                self.bitmask[row].fill_(-1)  # ended: nothing to constrain (its tokens are dropped)
            else:
                matcher.fill_next_token_bitmask(self.bitmask, row)

    def chosen(self, tokens: Any) -> None:
        """The tokens just chosen (B,): advance and fill the next mask beside the forward pass."""
        import threading

        self.ahead = threading.Thread(target=self._advance_and_fill, args=(tokens.tolist(),),
                                      name="qvl-grammar", daemon=True)
        self.ahead.start()

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch
        import xgrammar as xgr

        if self.ahead is not None:
            self.ahead.join()
            self.ahead = None
        else:
            steps = input_ids.shape[1] - self.start
            self._advance_and_fill(input_ids[:, -1].tolist() if steps > 0 else None)
        vocab = scores.shape[-1]
        if scores.device.type == "cpu" and scores.dtype != torch.float32:
            scores = scores.float()
        xgr.apply_token_bitmask_inplace(scores, self.bitmask.to(scores.device), vocab_size=min(vocab, self.vocab))
        # xgrammar lets raw control characters into JSON strings, which JSON parsers refuse:
        # no token holding one (the grammar, without free whitespace, never needs them).
        return scores.masked_fill_(self.control[:vocab].to(scores.device), float("-inf"))


def _compiler(engine: Any) -> Any:
    """The engine's xgrammar compiler, built once (the tokenizer's vocabulary: ~1 s for Qwen2's)."""
    compiler = getattr(engine, "_grammar_compiler", None)
    if compiler is None:
        import xgrammar as xgr

        vocab = engine.model.config.get_text_config().vocab_size
        info = xgr.TokenizerInfo.from_huggingface(engine.processor.tokenizer, vocab_size=vocab,
                                                  stop_token_ids=sorted(engine.eos_ids))
        compiler = engine._grammar_compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=True)
    return compiler


def _control_tokens(engine: Any, vocab: int) -> Any:
    """A (vocab,) bool tensor: the tokens whose text holds a control character (U+0000-U+001F)."""
    control = getattr(engine, "_control_tokens", None)
    if control is None:
        import torch

        texts = engine.processor.tokenizer.batch_decode([[i] for i in range(vocab)], skip_special_tokens=False)
        control = torch.tensor([any(ord(c) < 32 for c in text) for text in texts], dtype=torch.bool)
        for token in engine.eos_ids:
            control[token] = False
        engine._control_tokens = control
    return control


def compiled_grammar(engine: Any, grammar: tuple[str, str]) -> Any:
    """("json_object", "") or ("json_schema", schema as JSON text) -> a CompiledGrammar, or a
    UsageError (400 in the server) when the schema is not one xgrammar can compile."""
    from qwenvl_cli.errors import UsageError

    kind, text = grammar
    compiler = _compiler(engine)
    if kind == "json_object":
        return compiler.compile_builtin_json_grammar()
    try:
        return compiler.compile_json_schema(text, any_whitespace=False)
    except (RuntimeError, ValueError, TypeError) as exc:
        message = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        err = UsageError(f"response_format: the JSON schema cannot be used: {message}",
                         "send a JSON schema of objects, arrays, strings, numbers, enums (docs/server.md)")
        err.param = "response_format"
        raise err from None


def validate(engine: Any, params: Any) -> None:
    """What only the loaded model can check: logit_bias token ids, the grammar's schema."""
    from qwenvl_cli.errors import UsageError

    vocab = engine.model.config.get_text_config().vocab_size
    bad = [token for token, _ in params.logit_bias if token >= vocab]
    if bad:
        err = UsageError(f"logit_bias: token id {bad[0]} is out of range: the vocabulary has {vocab} tokens",
                         f"send token ids from 0 to {vocab - 1}")
        err.param = "logit_bias"
        raise err
    if params.grammar is not None:
        compiled_grammar(engine, params.grammar)


def extra_processors(engine: Any, params: Any, start: int, rows: int) -> tuple[list[Any], LogprobRecorder | None]:
    """The processors transformers' generation_config cannot express, in the order they run
    (before the checkpoint's): the logprob recorder, the penalties, the grammar mask."""
    out: list[Any] = []
    recorder = LogprobRecorder(params.top_logprobs or 0) if params.logprobs else None
    if recorder is not None:
        out.append(recorder)
    if params.presence_penalty or params.frequency_penalty:
        out.append(Penalties(start, params.presence_penalty or 0.0, params.frequency_penalty or 0.0))
    if params.grammar is not None:
        vocab = engine.model.config.get_text_config().vocab_size
        out.append(GrammarMask(compiled_grammar(engine, params.grammar), rows, start, vocab,
                               _control_tokens(engine, vocab)))
    return out, recorder


def generate_with_processors(model: Any, input_ids: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``generate`` arguments that run qvl's processor list (extra_processors first, then the
    checkpoint's) as its only processing: transformers would append custom processors after
    its top-k / top-p warpers, where a grammar mask could leave no token at all."""
    from transformers import LogitsProcessorList

    sampler, _ = Sampler.build(model, input_ids, kwargs)
    neutral = {k: v for k, v in kwargs.items() if k in ("max_new_tokens", "pad_token_id", "eos_token_id",
                                                          "min_new_tokens")}
    neutral.update(do_sample=sampler.do_sample, temperature=1.0, top_k=0, top_p=1.0, min_p=None,
                   repetition_penalty=1.0, sequence_bias=None,
                   logits_processor=LogitsProcessorList(list(sampler.processors)))
    return neutral
