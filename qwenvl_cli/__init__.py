"""qvl: launch, chat with and serve the Qwen2-VL vision-language models."""

__version__ = "0.1.0"
