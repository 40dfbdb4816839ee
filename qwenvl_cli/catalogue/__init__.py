"""The model-spec catalogue: records, strict YAML, the spec files, resolution (see docs/architecture.md)."""
