"""The one schema of a chat request: every field checked by type and range at the edge.

``check_chat(body)`` runs the pydantic model :class:`ChatBody` over a decoded JSON body and
turns the first error into a :class:`FieldError` naming the field (``api.parse_chat``
answers it as a 400),
so that an odd value is a 400 with the OpenAI error shape, never a 500 deeper down.
Fields that would change the answer and that qvl does not implement are refused by name
(:data:`REFUSED`); fields that change nothing qvl does (``user``, ``metadata``, ...) are
accepted (:data:`NO_OP`); any other field is refused as unknown. pydantic comes with
fastapi and is imported only here, when the first request is parsed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from qwenvl_cli.errors import UsageError

# Qwen2-VL's own bounds (qwen-vl-utils): 4 patches of 28x28 at least, 16384 at most.
MIN_IMAGE_PIXELS = 4 * 28 * 28
MAX_IMAGE_PIXELS = 16384 * 28 * 28
MAX_SIDE = 32768
MAX_N = 16
MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS = 1024
SEED_MAX = 2**64 - 1

# vLLM / OpenAI fields that would change the output and that qvl does not implement.
REFUSED = {
    "best_of": "best_of is not supported (send n instead)",
    "use_beam_search": "beam search is not supported", "length_penalty": "beam search is not supported",
    "early_stopping": "beam search is not supported",
    "min_tokens": "min_tokens is not supported", "prompt_logprobs": "prompt logprobs are not supported",
    "guided_json": "use response_format {\"type\": \"json_schema\", ...} instead",
    "guided_regex": "regex-constrained output is not supported",
    "guided_choice": "choice-constrained output is not supported",
    "guided_grammar": "grammar-constrained output is not supported",
    "guided_decoding_backend": "guided decoding options are not supported",
    "guided_whitespace_pattern": "guided decoding options are not supported",
    "structured_outputs": "use response_format instead",
    "allowed_token_ids": "allowed_token_ids is not supported", "bad_words": "bad_words is not supported",
    "stop_token_ids": "stop_token_ids is not supported (send stop strings)",
    "include_stop_str_in_output": "include_stop_str_in_output is not supported",
    "skip_special_tokens": "skip_special_tokens is not supported",
    "spaces_between_special_tokens": "spaces_between_special_tokens is not supported",
    "truncate_prompt_tokens": "prompt truncation is not supported",
    "echo": "echo is not supported", "add_generation_prompt": "the chat template is fixed",
    "continue_final_message": "the chat template is fixed", "chat_template": "the chat template is fixed",
    "chat_template_kwargs": "the chat template is fixed", "documents": "documents are not supported",
    "functions": "function calling is not supported", "function_call": "function calling is not supported",
    "audio": "audio output is not supported", "modalities": "only text output is supported",
    "prediction": "predicted outputs are not supported", "web_search_options": "web search is not supported",
    "reasoning_effort": "this model does not reason", "logits_processors": "custom logits processors are not supported",
}
# Fields accepted that change nothing qvl does.
NO_OP = ("user", "metadata", "store", "service_tier", "parallel_tool_calls", "request_id", "priority")
PART_SIZING = ("min_pixels", "max_pixels", "resized_height", "resized_width", "total_pixels")
PART_VIDEO = ("fps", "nframes", "max_frames", "min_frames", "video_start", "video_end")


def _models() -> Any:
    """The pydantic models, built on first use (pydantic stays out of every start-up)."""
    global _CACHE
    if _CACHE is not None:
        return _CACHE
    from typing import Annotated, Literal, Union

    from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

    Num = Annotated[float, Field(strict=True, allow_inf_nan=False)]

    class Strict(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)

    class StreamOptions(Strict):
        include_usage: StrictBool | None = None
        continuous_usage_stats: StrictBool | None = None

    class MMKwargs(Strict):  # vLLM's mm_processor_kwargs, as qvl's own fields
        min_pixels: Annotated[StrictInt, Field(ge=MIN_IMAGE_PIXELS, le=MAX_IMAGE_PIXELS)] | None = None
        max_pixels: Annotated[StrictInt, Field(ge=MIN_IMAGE_PIXELS, le=MAX_IMAGE_PIXELS)] | None = None
        fps: Annotated[Num, Field(gt=0, le=60)] | None = None

    class JsonSchema(BaseModel):
        model_config = ConfigDict(extra="allow", strict=True)
        name: StrictStr = "response"
        schema_: dict[str, Any] | None = Field(default=None, alias="schema")
        strict: StrictBool | None = None
        description: StrictStr | None = None

    class ResponseFormat(Strict):
        type: Literal["text", "json_object", "json_schema"]
        json_schema: JsonSchema | None = None

    class ToolChoiceFunction(BaseModel):
        type: Literal["function"]

    class ChatBody(Strict):
        model: StrictStr | None = None
        messages: Any = None  # checked part by part by messages.from_openai
        max_tokens: Annotated[StrictInt, Field(ge=1, le=2**31)] | None = None
        max_completion_tokens: Annotated[StrictInt, Field(ge=1, le=2**31)] | None = None
        temperature: Annotated[Num, Field(ge=0, le=2)] | None = None
        top_p: Annotated[Num, Field(gt=0, le=1)] | None = None
        top_k: Annotated[StrictInt, Field(ge=-1, le=2**31)] | None = None
        min_p: Annotated[Num, Field(ge=0, le=1)] | None = None
        repetition_penalty: Annotated[Num, Field(gt=0, le=10)] | None = None
        presence_penalty: Annotated[Num, Field(ge=-2, le=2)] | None = None
        frequency_penalty: Annotated[Num, Field(ge=-2, le=2)] | None = None
        logit_bias: Annotated[dict[StrictStr, Annotated[Num, Field(ge=-100, le=100)]],
                              Field(max_length=MAX_LOGIT_BIAS)] | None = None
        seed: Annotated[StrictInt, Field(ge=-1, le=SEED_MAX)] | None = None
        n: Annotated[StrictInt, Field(ge=1, le=MAX_N)] | None = None
        logprobs: StrictBool | None = None
        top_logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
        stop: StrictStr | Annotated[list[StrictStr], Field(max_length=16)] | None = None
        stream: StrictBool | None = None
        stream_options: StreamOptions | None = None
        response_format: ResponseFormat | None = None
        tools: list[Any] | None = None
        tool_choice: Union[Literal["none", "auto", "required"], ToolChoiceFunction, None] = None  # noqa: UP007
        ignore_eos: StrictBool | None = None
        min_pixels: Annotated[StrictInt, Field(ge=MIN_IMAGE_PIXELS, le=MAX_IMAGE_PIXELS)] | None = None
        max_pixels: Annotated[StrictInt, Field(ge=MIN_IMAGE_PIXELS, le=MAX_IMAGE_PIXELS)] | None = None
        fps: Annotated[Num, Field(gt=0, le=60)] | None = None
        max_frames: Annotated[StrictInt, Field(ge=1, le=768)] | None = None
        mm_processor_kwargs: MMKwargs | None = None

    _CACHE = ChatBody
    return _CACHE


_CACHE: Any = None


class FieldError(UsageError):
    """A request field with a wrong type or value (the server answers it 400, naming ``param``)."""

    def __init__(self, message: str, hint: str | None = None, param: str | None = None) -> None:
        super().__init__(message, hint)
        self.param = param


def _bad(message: str, param: str | None, hint: str | None = None) -> Exception:
    return FieldError(message, hint or (f"fix '{param}' (docs/server.md lists the fields and their ranges)"
                                        if param else "check the request body"), param=param)


_WANTED = {"int_type": "an integer", "int_from_float": "an integer", "int_parsing": "an integer",
           "float_type": "a number", "finite_number": "a finite number", "bool_type": "true or false",
           "string_type": "a string", "list_type": "a list", "dict_type": "an object",
           "model_type": "an object", "model_attributes_type": "an object", "literal_error": "one of {expected}",
           "greater_than_equal": "at least {ge}", "greater_than": "above {gt}", "less_than_equal": "at most {le}",
           "less_than": "below {lt}", "too_long": "at most {max_length} long", "missing": "given"}
_UNIONS = {"stop": "a string or a list of at most 16 strings", "tool_choice": "\"none\" or \"auto\""}


def _first_error(exc: Any) -> Exception:
    """pydantic's first error as one line: "'top_p' must be above 0, not 0"."""
    error = exc.errors(include_url=False)[0]
    path = [p for p in error["loc"]]
    top = str(path[0]) if path else None
    if error["type"] == "extra_forbidden":
        loc = ".".join(str(p) for p in path)
        return _bad(f"'{loc}' is not a field this server knows", top,
                    f"leave '{loc}' out (docs/server.md lists the accepted fields)")
    if top in _UNIONS:
        path, wanted = [top], _UNIONS[top]
    else:
        path = [p for p in path if isinstance(p, int) or "[" not in str(p) and p not in ("str", "int", "float")]
        template = _WANTED.get(error["type"])
        wanted = template.format(**(error.get("ctx") or {})) if template else error["msg"].lower()
    loc = "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p)) for i, p in enumerate(path))
    shown = repr(error.get("input"))
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    tail = "" if error["type"] == "missing" else f", not {shown}"
    return _bad(f"'{loc}' must be {wanted}{tail}", top)


def check_chat(body: Mapping[str, Any]) -> Any:
    """The body as a validated ChatBody, or a BadRequest naming the first wrong field."""
    from pydantic import ValidationError

    for name, why in REFUSED.items():
        if body.get(name) not in (None, False):
            raise _bad(f"'{name}': {why}", name, f"leave '{name}' out (docs/server.md lists the accepted fields)")
    data = {k: v for k, v in body.items() if k not in NO_OP and k not in REFUSED}
    try:
        chat = _models().model_validate(data)
    except ValidationError as exc:
        raise _first_error(exc) from None
    if chat.stream_options is not None and not chat.stream:
        raise _bad("'stream_options' is only allowed when 'stream' is true", "stream_options",
                   "send \"stream\": true, or leave 'stream_options' out")
    if chat.top_logprobs and not chat.logprobs:
        raise _bad("'top_logprobs' needs 'logprobs': true", "top_logprobs", "send \"logprobs\": true")
    if chat.tools and chat.tool_choice != "none":
        raise _bad("'tools': tool calling is not supported by this server", "tools",
                   "leave 'tools' out, or send \"tool_choice\": \"none\"")
    if chat.tool_choice not in (None, "none", "auto"):
        raise _bad("'tool_choice': tool calling is not supported by this server", "tool_choice",
                   "send \"tool_choice\": \"none\" or leave it out")
    fmt = chat.response_format
    if fmt is not None and fmt.type == "json_schema" and (fmt.json_schema is None or fmt.json_schema.schema_ is None):
        raise _bad("'response_format': json_schema needs {\"json_schema\": {\"name\": ..., \"schema\": {...}}}",
                   "response_format")
    if chat.ignore_eos and fmt is not None and fmt.type != "text":
        raise _bad("'ignore_eos' cannot be used with a JSON response_format: the grammar ends the answer",
                   "ignore_eos", "leave 'ignore_eos' out")
    for key, value in (chat.logit_bias or {}).items():
        if not key.isdigit() or int(key) >= 2**31:
            raise _bad(f"'logit_bias': {key!r} is not a token id", "logit_bias",
                       "keys are token ids as strings, e.g. {\"1234\": -100}")
    return chat


def check_part_values(messages: list[dict[str, Any]], max_pixels: int) -> None:
    """Every sizing and video field of every media part finite and within Qwen2-VL's bounds,
    and no NUL byte in a media reference (Qwen-format messages, after ``from_openai``)."""
    limit = min(MAX_IMAGE_PIXELS, max_pixels)
    for i, msg in enumerate(messages):
        for j, part in enumerate(msg["content"]):
            where = f"messages[{i}].content[{j}]"
            kind = part.get("type")
            if kind not in ("image", "video"):
                continue
            refs = part[kind] if isinstance(part[kind], list) else [part[kind]]
            if any("\x00" in ref for ref in refs):
                raise _bad(f"{where}: the {kind} reference holds a NUL byte", "messages",
                           "send a URL, a data URI or a path without NUL bytes")
            for name in (*PART_SIZING, *PART_VIDEO):
                value = part.get(name)
                if value is None:
                    continue
                if not math.isfinite(value):
                    raise _bad(f"{where}: {name} must be a finite number, not {value}", "messages")
                low, high = _part_range(name, limit)
                if not low <= value <= high:
                    raise _bad(f"{where}: {name} must be between {low} and {high}, not {value}", "messages",
                               f"send {name} within [{low}, {high}] (the server's limits)")


def _part_range(name: str, limit: int) -> tuple[float, float]:
    if name in ("min_pixels", "max_pixels"):
        return MIN_IMAGE_PIXELS, limit
    if name == "total_pixels":
        return MIN_IMAGE_PIXELS, 768 * limit
    if name in ("resized_height", "resized_width"):
        return 28, min(MAX_SIDE, limit // 28)
    if name == "fps":
        return 0.01, 60
    if name in ("nframes", "max_frames", "min_frames"):
        return 1, 768
    return 0, 86400  # video_start / video_end, seconds
