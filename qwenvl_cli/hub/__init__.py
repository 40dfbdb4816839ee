"""Downloads from Hugging Face and ModelScope into their own caches, and the cache commands."""
