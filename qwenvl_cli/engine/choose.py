"""The one place that picks the engine class --model-engine named (imported at load only)."""

from __future__ import annotations

from qwenvl_cli.engine.options import EngineOptions


def engine_class(options: EngineOptions) -> type:
    """VllmEngine for ``--model-engine vllm``, else the transformers Engine."""
    if options.engine == "vllm":
        from qwenvl_cli.engine.vllm import VllmEngine

        return VllmEngine
    from qwenvl_cli.engine.engine import Engine

    return Engine
