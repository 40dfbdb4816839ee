"""`qvl list-specs` and `qvl resolve`: the catalogue and the spec a launch would use."""

from __future__ import annotations

import typer

from qwenvl_cli import render
from qwenvl_cli.cli.options import (
    ContextLength,
    DownloadHub,
    Fit,
    GpuIdx,
    JsonOutput,
    MaxPixels,
    ModelEngine,
    ModelFormat,
    ModelName,
    Quantization,
    SizeInBillions,
    examples,
)

HUB_SHORT = {"huggingface": "hf", "modelscope": "ms"}


def list_specs(
    model_name: ModelName = None,
    model_engine: ModelEngine = None,
    model_format: ModelFormat = None,
    size_in_billions: SizeInBillions = None,
    quantization: Quantization = None,
    show_fit: Fit = False,
    gpu_idx: GpuIdx = None,
    context_length: ContextLength = None,
    json_output: JsonOutput = False,
) -> None:
    """List the model specs of the catalogue, one row per spec and quantization.

    The "cached" column looks at local files only: a hub's short name means that hub's cache
    holds the catalogue's revision complete and verified."""
    from qwenvl_cli.catalogue.load import load_catalogue
    from qwenvl_cli.catalogue.resolve import filter_rows
    from qwenvl_cli.hub import cache

    catalogue = load_catalogue()
    rows = filter_rows(catalogue, model_name, model_format, size_in_billions, quantization, model_engine)
    for row in rows:
        row["cached"] = cache.row_states(row)
    if show_fit:
        from qwenvl_cli.fit import check, gpus, memory

        report = gpus.query(gpu_idx)
        rows = check.annotate_rows(catalogue, rows, report, memory.workload(context_length))
        render.status("GPUs: " + report.describe())
    if json_output:
        render.print_json(rows)
        return
    extra = ["memory", "fits"] if show_fit else []
    render.table(
        ["name", "format", "size", "quantization", "engines", "huggingface", "modelscope", "cached", *extra],
        [[r["model_name"], r["model_format"], r["size_in_billions"] + "B", r["quantization"],
          ", ".join(r["engines"]), _repo(r, "huggingface"), _modelscope_cell(r), cached_cell(r["cached"]),
          *render.fit_cells(r, show_fit)] for r in rows],
        fold_constant=True,  # name and engines are the same on every row: said once, under the table
    )


def _repo(row: dict, hub: str) -> str:
    return (row[hub] or {}).get("model_id", "-")


def _modelscope_cell(row: dict) -> str:
    """'same name' where ModelScope's id is Hugging Face's but for the case of the org (--json: both)."""
    ms, hf = _repo(row, "modelscope"), _repo(row, "huggingface")
    return "same name" if ms != "-" and ms.lower() == hf.lower() else ms


def cached_cell(states: dict[str, str]) -> str:
    parts = [HUB_SHORT[h] + ("" if st == "complete" else f" {st}")
             for h, st in states.items() if st != "absent"]
    return ", ".join(parts) or "-"


def resolve(
    model_name: ModelName = None,
    model_engine: ModelEngine = None,
    size_in_billions: SizeInBillions = None,
    model_format: ModelFormat = None,
    quantization: Quantization = None,
    download_hub: DownloadHub = None,
    gpu_idx: GpuIdx = None,
    context_length: ContextLength = None,
    max_pixels: MaxPixels = None,
    json_output: JsonOutput = False,
) -> None:
    """Show the concrete spec that `launch` would use, its memory estimate and whether it fits."""
    from qwenvl_cli.catalogue.resolve import SpecQuery
    from qwenvl_cli.fit import check, memory

    query = SpecQuery(model_name, model_engine, size_in_billions, model_format, quantization, download_hub)
    result = check.resolve_and_check(query, gpu_idx, memory.workload(context_length, max_pixels))
    spec = result.spec
    if result.choice is not None:
        render.status(result.choice.reason)
    if json_output:
        render.print_json({**spec.to_dict(), **result.to_dict()})
        return
    data = spec.to_dict()
    fields = ["model_name", "model_engine", "model_format", "size_in_billions",
              "quantization", "hub", "model_id", "revision", "context_length"]
    render.key_values(
        [(f, f"{data[f]}" + (" (default)" if f in spec.defaulted else "")) for f in fields]
        + [(f"{s.hub} id", f"{s.model_id} @ {s.revision}") for s in spec.sources[1:]]
        + result.rows(),
        title=spec.label(),
    )


def register(app: typer.Typer) -> None:
    app.command("list-specs", epilog=examples("qvl list-specs -s 7", "qvl list-specs -f gptq --json"))(list_specs)
    app.command(epilog=examples("qvl resolve -s 7 -f awq", "qvl resolve -s 72 -f gptq -q Int8 --json"))(resolve)
