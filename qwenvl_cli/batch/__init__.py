"""`qvl batch`: JSONL in and out, batched, resumable (see docs/batch.md)."""
