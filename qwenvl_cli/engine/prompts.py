"""Model inputs for a plain text prompt (``/v1/completions``): tokenized as given, without
the chat template, checked against the context length like a conversation."""

from __future__ import annotations

import time
from typing import Any

from qwenvl_cli.errors import PromptTooLong


def prepare_text(engine: Any, prompt: str) -> Any:
    """The engine's Prepared for ``prompt`` (no chat template, no media)."""
    from qwenvl_cli.engine.engine import Prepared

    start = time.perf_counter()
    inputs = engine.processor.tokenizer([prompt], return_tensors="pt")
    inputs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    tokens = int(inputs["input_ids"].shape[-1])
    if tokens >= engine.context_length:
        err = PromptTooLong(f"the prompt is {tokens} tokens long; the model's context length is {engine.context_length}",
                            "shorten the prompt")
        err.prompt_tokens, err.context_length = tokens, engine.context_length
        raise err
    return Prepared(inputs, tokens, [], time.perf_counter() - start)
