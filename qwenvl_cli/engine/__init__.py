"""The engines: the only wing that imports torch and transformers."""
