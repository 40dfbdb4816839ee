"""`qvl download`, `verify`, `cached` and `remove-cache`: the models in the hubs' caches."""

from __future__ import annotations

from typing import Annotated

import typer

from qwenvl_cli import render, settings
from qwenvl_cli.cli.options import (
    ContextLength,
    DownloadHub,
    DryRun,
    Force,
    GpuIdx,
    JsonOutput,
    ModelEngine,
    ModelFormat,
    ModelName,
    Offline,
    Quantization,
    Quiet,
    Revision,
    SizeInBillions,
    Yes,
    examples,
)
from qwenvl_cli.cli.specs import HUB_SHORT


def download(
    model_name: ModelName = None,
    model_engine: ModelEngine = None,
    size_in_billions: SizeInBillions = None,
    model_format: ModelFormat = None,
    quantization: Quantization = None,
    download_hub: DownloadHub = None,
    revision: Revision = None,
    offline: Offline = False,
    gpu_idx: GpuIdx = None,
    context_length: ContextLength = None,
    force: Force = False,
    quiet: Quiet = False,
    json_output: JsonOutput = False,
) -> None:
    """Download a model spec into the hub's cache: only the files it needs, resumable, verified.

    Refuses a spec that will not fit the visible GPUs (unless --force) before fetching
    anything. Prints the model folder on stdout; progress and status go to stderr."""
    from qwenvl_cli.catalogue.resolve import SpecQuery
    from qwenvl_cli.fit import memory
    from qwenvl_cli.fit.preflight import check_spec
    from qwenvl_cli.hub import download as hub

    query = SpecQuery(model_name, model_engine, size_in_billions, model_format, quantization, download_hub)
    spec = check_spec(query, gpu_idx=gpu_idx, force=force, workload=memory.workload(context_length, None),
                      need_backend=False, quiet=quiet, announce=True).spec
    model = hub.ensure_local(spec, revision=revision, offline=True if offline else None, quiet=quiet)
    if json_output:
        render.print_json(model.to_dict())
    else:
        typer.echo(str(model.path))


def verify(
    model_name: ModelName = None,
    model_engine: ModelEngine = None,
    size_in_billions: SizeInBillions = None,
    model_format: ModelFormat = None,
    quantization: Quantization = None,
    download_hub: DownloadHub = None,
    json_output: JsonOutput = False,
) -> None:
    """Re-hash a cached model against what was verified at download; report bad or missing files.

    A copy that fails loses its "complete" mark, so the next `qvl download` fetches the bad files again."""
    from qwenvl_cli.catalogue.resolve import SpecQuery, resolve
    from qwenvl_cli.errors import ChecksumMismatch, NotCached
    from qwenvl_cli.hub import cache

    spec = resolve(SpecQuery(model_name, model_engine, size_in_billions, model_format, quantization, download_hub))
    entries = [e for e in cache.for_spec(spec) if e.snapshot_name]
    if not entries:
        raise NotCached(f"{spec.label()} is not in the cache", "download it with `qvl download` and the same flags")
    reports = [cache.verify(e) for e in entries]
    if json_output:
        render.print_json([r.to_dict() for r in reports])
    else:
        render.table(["hub", "repo", "revision", "checked against", "files", "result"],
                     [[HUB_SHORT[r.entry.hub], r.entry.repo_id, r.entry.revision[:40], r.against,
                       str(len(r.results)), "ok" if r.ok else f"{len(r.bad)} bad"] for r in reports])
        for r in reports:
            for name, problem in r.bad:
                typer.echo(f"{r.entry.repo_id}: {name}: {problem}")
    bad = [r for r in reports if not r.ok]
    if bad:
        first = bad[0].bad[0]
        raise ChecksumMismatch(f"{sum(len(r.bad) for r in bad)} file(s) do not match, e.g. {first[0]}: {first[1]}",
                               "run `qvl download` with the same flags to fetch them again")


def cached(json_output: JsonOutput = False) -> None:
    """List the Qwen2-VL models in the Hugging Face and ModelScope caches."""
    from qwenvl_cli.hub import cache

    entries = cache.scan()
    if json_output:
        render.print_json([e.to_dict() for e in entries])
        return
    if not entries:
        render.note(f"no cached models in {settings.hf_hub_cache()} or {settings.modelscope_cache()}")
        return
    render.table(["spec", "hub", "repo", "revision", "state", "size", "path"], [_cached_row(e) for e in entries],
                 fold_constant=True)


def _cached_row(e) -> list[str]:
    from qwenvl_cli.hub.progress import human_bytes

    spec = e.spec
    quant = "" if spec["quantization"] == "none" else " " + spec["quantization"]
    label = f"{spec['size_in_billions']}B {spec['model_format']}{quant}"
    revision = e.revision if len(e.revision) < 40 else e.revision[:12]
    return [label, HUB_SHORT[e.hub], e.repo_id, revision, e.state, human_bytes(e.size_on_disk), str(e.path)]


def remove_cache(
    model_name: ModelName = None,
    model_engine: ModelEngine = None,
    size_in_billions: SizeInBillions = None,
    model_format: ModelFormat = None,
    quantization: Quantization = None,
    download_hub: DownloadHub = None,
    revision: Revision = None,
    all_partial: Annotated[bool, typer.Option("--all-partial", help="Every partial download.")] = False,
    dry_run: DryRun = False,
    yes: Yes = False,
    json_output: JsonOutput = False,
) -> None:
    """Delete cached models: shows what goes and the space freed, asks, then deletes.

    Every cached revision of the spec goes unless --revision names one. Files that another
    cached revision still uses are kept."""
    from qwenvl_cli.catalogue.resolve import SpecQuery
    from qwenvl_cli.hub import cache
    from qwenvl_cli.hub.progress import human_bytes

    query = SpecQuery(model_name, model_engine, size_in_billions, model_format, quantization, download_hub)
    plan = cache.plan_for(query, all_partial, revision)
    if json_output:
        render.print_json(plan.to_dict())
    else:
        _show_plan(plan)
    if dry_run or not plan.items:
        return
    if not yes and not _confirm(f"delete {len(plan.items)} cached cop{'y' if len(plan.items) == 1 else 'ies'}?"):
        render.note("nothing deleted")
        raise typer.Exit(1)
    render.note(f"freed {human_bytes(cache.execute(plan))}")


def _show_plan(plan) -> None:
    from qwenvl_cli.hub.progress import human_bytes

    if not plan.items:
        render.note("nothing to remove")
        return
    render.table(["hub", "repo", "revision", "state", "frees", "path"],
                 [[HUB_SHORT[i.entry.hub], i.entry.repo_id, i.entry.revision[:40], i.entry.state,
                   human_bytes(i.freed), str(i.entry.path)] for i in plan.items],
                 title=f"to delete: {human_bytes(plan.freed)}")
    for item in plan.items:
        if item.kept:
            render.note(f"kept (used by another cached revision of {item.entry.repo_id}): {', '.join(item.kept)}")


def _confirm(question: str) -> bool:
    try:
        return typer.confirm(question, default=False, err=True)
    except typer.Abort:  # end of input
        return False


def register(app: typer.Typer) -> None:
    app.command(epilog=examples("qvl download -s 7 -f awq", "HF_ENDPOINT=https://hf-mirror.com qvl download -s 2",
                                "qvl download -s 2 --download-hub modelscope --quiet"))(download)
    app.command(epilog=examples("qvl verify -s 2", "qvl verify -s 7 -f awq --json"))(verify)
    app.command(epilog=examples("qvl cached", "qvl cached --json"))(cached)
    app.command("remove-cache", epilog=examples("qvl remove-cache -s 7 -f awq", "qvl remove-cache --all-partial --yes",
                                                "qvl remove-cache -s 2 --dry-run"))(remove_cache)
