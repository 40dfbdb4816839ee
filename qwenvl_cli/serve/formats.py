"""The three OpenAI answer shapes over one generation: chat completions, text completions
(``/v1/completions``) and the Responses API (``/v1/responses``), whole and streamed.

Each ``*Format`` turns the engine's :class:`~qwenvl_cli.generation.Chunk` records into the
JSON its endpoint sends; the server's one request path (``server._answer``) picks the
format. ``parse_completion`` and ``parse_responses`` map the two other request bodies
onto the chat request's one schema (:mod:`qwenvl_cli.serve.schema`), so a field means
the same thing, with the same checks, on every endpoint. Plain data, no web framework.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from qwenvl_cli.generation import Answer, Chunk
from qwenvl_cli.serve import api
from qwenvl_cli.serve.api import BadRequest, ChatRequest, ServerConfig


# --- requests ---------------------------------------------------------------------------------


def parse_completion(body: Any, config: ServerConfig) -> ChatRequest:
    """A ``/v1/completions`` body: a text prompt (no chat template) and the chat's sampling fields."""
    if not isinstance(body, Mapping):
        raise BadRequest("the request body must be a JSON object", "send {\"model\": ..., \"prompt\": \"...\"}")
    body = dict(body)
    prompt = body.pop("prompt", None)
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise BadRequest("'prompt' must be a non-empty string (or a list of one)",
                         "send one prompt per request", param="prompt")
    for name in ("suffix",):
        if body.get(name) is not None:
            raise BadRequest(f"'{name}' is not supported", f"leave '{name}' out", param=name)
    logprobs = body.pop("logprobs", None)  # an integer here: the number of alternatives
    if logprobs is not None:
        if isinstance(logprobs, bool) or not isinstance(logprobs, int) or not 0 <= logprobs <= 5:
            raise BadRequest("'logprobs' must be an integer from 0 to 5", "fix 'logprobs'", param="logprobs")
        body.update(logprobs=True, top_logprobs=logprobs)
    body["messages"] = [{"role": "user", "content": ""}]
    chat = api.parse_chat(body, config)
    chat.prompt = prompt
    return chat


def _responses_messages(body: Mapping[str, Any]) -> list[Any]:
    messages: list[Any] = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise BadRequest("'instructions' must be a string", "fix 'instructions'", param="instructions")
        messages.append({"role": "system", "content": instructions})
    given = body.get("input")
    if isinstance(given, str):
        return messages + [{"role": "user", "content": given}]
    if not isinstance(given, list) or not given:
        raise BadRequest("'input' must be a string or a non-empty list of messages",
                         "send \"input\": \"...\" or [{\"role\": \"user\", \"content\": [...]}]", param="input")
    for i, item in enumerate(given):
        if not isinstance(item, Mapping) or item.get("type", "message") != "message":
            raise BadRequest(f"input[{i}]: only message items are supported", "send role / content items",
                             param="input")
        messages.append({"role": item.get("role"), "content": item.get("content")})
    return messages


def parse_responses(body: Any, config: ServerConfig) -> ChatRequest:
    """A ``/v1/responses`` body (``input`` text or messages with ``input_text`` /
    ``input_image`` parts, ``instructions``, ``max_output_tokens``, ``text.format``)."""
    if not isinstance(body, Mapping):
        raise BadRequest("the request body must be a JSON object", "send {\"model\": ..., \"input\": \"...\"}")
    rest = {k: v for k, v in body.items() if k not in ("input", "instructions", "max_output_tokens", "text",
                                                       "truncation", "include", "tool_choice", "tools")}
    for name in ("previous_response_id", "conversation", "background", "reasoning", "prompt"):
        if rest.pop(name, None) is not None:
            raise BadRequest(f"'{name}' is not supported by this server", f"leave '{name}' out", param=name)
    if body.get("tools"):
        raise BadRequest("'tools': tool calling is not supported by this server", "leave 'tools' out", param="tools")
    chat_body: dict[str, Any] = {**rest, "messages": _responses_messages(body)}
    if body.get("max_output_tokens") is not None:
        chat_body["max_tokens"] = body["max_output_tokens"]
    text = body.get("text")
    if text is not None:
        fmt = text.get("format") if isinstance(text, Mapping) else None
        if not isinstance(fmt, Mapping):
            raise BadRequest("'text' must be {\"format\": {\"type\": ...}}", "fix 'text'", param="text")
        if fmt.get("type") == "json_schema":
            chat_body["response_format"] = {"type": "json_schema", "json_schema": {
                "name": fmt.get("name", "response"), "schema": fmt.get("schema"), "strict": fmt.get("strict")}}
        else:
            chat_body["response_format"] = {"type": fmt.get("type")}
    chat = api.parse_chat(chat_body, config)
    chat.include_usage = False
    return chat


# --- answers ----------------------------------------------------------------------------------


class ChatFormat:
    """``chat.completion`` / ``chat.completion.chunk`` (see api.completion and api.chunk)."""

    done_marker = True

    def __init__(self, req_id: str, chat: ChatRequest) -> None:
        self.id, self.chat, self.created = req_id, chat, int(time.time())

    def body(self, answers: Sequence[Answer]) -> dict[str, Any]:
        return api.completion(self.id, self.chat.model, answers, self.created, self.chat.params.logprobs)

    def _chunk(self, **kw: Any) -> dict[str, Any]:
        return api.chunk(self.id, self.chat.model, self.created, include_usage=self.chat.include_usage, **kw)

    def head(self) -> list[dict[str, Any]]:
        return [self._chunk(delta={"role": "assistant", "content": ""}, index=i) for i in range(self.chat.params.n)]

    def delta(self, item: Chunk) -> list[dict[str, Any]]:
        return [self._chunk(delta={"content": item.text}, index=item.index, logprobs=item.logprobs)]

    def finish(self, item: Chunk) -> list[dict[str, Any]]:
        return [self._chunk(finish_reason=item.finish_reason, index=item.index)]

    def end(self, answers: Sequence[Answer]) -> list[dict[str, Any]]:
        if not self.chat.include_usage:
            return []
        return [api.chunk(self.id, self.chat.model, self.created, usage=api.total_usage(answers))]


class CompletionFormat(ChatFormat):
    """``text_completion``: ``choices[].text``, logprobs in the legacy shape."""

    @staticmethod
    def _logprobs(items: Sequence[Any]) -> dict[str, Any]:
        return {"tokens": [t.token for t in items], "token_logprobs": [t.logprob for t in items],
                "top_logprobs": [{a: v for a, v in t.top} for t in items], "text_offset": []}

    def _choice(self, index: int, text: str, finish: str | None, logprobs: Sequence[Any]) -> dict[str, Any]:
        return {"index": index, "text": text, "finish_reason": api._finish(finish) if finish else None,
                "logprobs": self._logprobs(logprobs) if self.chat.params.logprobs else None}

    def body(self, answers: Sequence[Answer]) -> dict[str, Any]:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.chat.model,
                "choices": [self._choice(i, a.text, a.finish_reason, a.logprobs) for i, a in enumerate(answers)],
                "usage": api.total_usage(answers).to_dict()}

    def _event(self, choice: dict[str, Any]) -> dict[str, Any]:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.chat.model,
                "choices": [choice]}

    def head(self) -> list[dict[str, Any]]:
        return []

    def delta(self, item: Chunk) -> list[dict[str, Any]]:
        return [self._event(self._choice(item.index, item.text, None, item.logprobs))]

    def finish(self, item: Chunk) -> list[dict[str, Any]]:
        return [self._event(self._choice(item.index, "", item.finish_reason, ()))]

    def end(self, answers: Sequence[Answer]) -> list[dict[str, Any]]:
        if not self.chat.include_usage:
            return []
        return [{**self._event({}), "choices": [], "usage": api.total_usage(answers).to_dict()}]


class ResponsesFormat:
    """The Responses API: a ``response`` object, streamed as typed events ending with
    ``response.completed`` (as vLLM: also when cut by max_output_tokens, then with status
    "incomplete", so that the clients' stream helpers get their final response)."""

    done_marker = False

    def __init__(self, req_id: str, chat: ChatRequest) -> None:
        self.chat, self.created = chat, int(time.time())
        self.id = "resp_" + req_id.split("-", 1)[-1]
        self.msg_id = "msg_" + uuid.uuid4().hex[:24]
        self.seq = 0
        self.text = ""

    def _message(self, text: str, status: str) -> dict[str, Any]:
        content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}] if status != "in_progress" else []
        return {"type": "message", "id": self.msg_id, "status": status, "role": "assistant", "content": content}

    def _response(self, answers: Sequence[Answer] | None) -> dict[str, Any]:
        params = self.chat.params
        answer = answers[0] if answers else None
        status = "in_progress" if answer is None else ("incomplete" if answer.finish_reason == "length" else "completed")
        usage = None
        if answer is not None:
            u = api.total_usage(answers)
            usage = {"input_tokens": u.prompt_tokens, "output_tokens": u.completion_tokens,
                     "total_tokens": u.total_tokens, "input_tokens_details": {"cached_tokens": 0},
                     "output_tokens_details": {"reasoning_tokens": 0}}
        return {"id": self.id, "object": "response", "created_at": self.created, "model": self.chat.model,
                "status": status, "output": [self._message(answer.text, status)] if answer is not None else [],
                "parallel_tool_calls": False, "tool_choice": "none", "tools": [],
                "temperature": params.temperature, "top_p": params.top_p, "max_output_tokens": params.max_tokens,
                "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
                "error": None, "usage": usage}

    def body(self, answers: Sequence[Answer]) -> dict[str, Any]:
        return self._response(answers)

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        self.seq += 1
        return {"type": kind, "sequence_number": self.seq - 1, **fields}

    def head(self) -> list[dict[str, Any]]:
        part = {"type": "output_text", "text": "", "annotations": []}
        return [self._event("response.created", response=self._response(None)),
                self._event("response.in_progress", response=self._response(None)),
                self._event("response.output_item.added", output_index=0, item=self._message("", "in_progress")),
                self._event("response.content_part.added", item_id=self.msg_id, output_index=0, content_index=0,
                            part=part)]

    def delta(self, item: Chunk) -> list[dict[str, Any]]:
        if item.index != 0:
            return []
        self.text += item.text
        return [self._event("response.output_text.delta", item_id=self.msg_id, output_index=0, content_index=0,
                            delta=item.text, logprobs=[])]

    def finish(self, item: Chunk) -> list[dict[str, Any]]:
        return []

    def end(self, answers: Sequence[Answer]) -> list[dict[str, Any]]:
        response = self._response(answers)
        part = {"type": "output_text", "text": answers[0].text, "annotations": []}
        return [self._event("response.output_text.done", item_id=self.msg_id, output_index=0, content_index=0,
                            text=answers[0].text, logprobs=[]),
                self._event("response.content_part.done", item_id=self.msg_id, output_index=0, content_index=0,
                            part=part),
                self._event("response.output_item.done", output_index=0, item=response["output"][0]),
                self._event("response.completed", response=response)]  # as vLLM, also when incomplete
