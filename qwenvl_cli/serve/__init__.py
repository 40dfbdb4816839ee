"""The OpenAI-compatible server, its queue, and `qvl launch`."""
