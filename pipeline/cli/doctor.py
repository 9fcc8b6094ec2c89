"""``doctor``: platform, vLLM, torch/CUDA, GPUs, the Ray cluster and cached models, at a glance."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from pipeline.cli.common import Address, out, quiet_vllm

app = typer.Typer()


@app.command()
def doctor(
    address: Address = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON document on stdout (for scripts).")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for a Ray cluster to answer.")] = 10.0,
) -> None:
    """What this machine offers: platform, vLLM, torch/CUDA, GPUs, Ray cluster resources, cached models.

    Never starts Ray: the cluster probe joins --address / RAY_ADDRESS if given. A probe that fails
    says why; the report always completes (exit code 0).
    """
    from pipeline.doctor import report

    quiet_vllm(False)
    result = report(address, timeout)
    if as_json:
        typer.echo(json.dumps(result, indent=2, default=str))
        return
    _print(result)


def _fmt(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {_fmt(v)}" for k, v in value.items())
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _status(section: Any) -> tuple[str, str]:
    if isinstance(section, dict) and "error" in section:
        return "[red]failed[/]", section["error"]
    if isinstance(section, dict) and "skipped" in section:
        return "[yellow]skipped[/]", section["skipped"]
    return "[green]ok[/]", ""


def _print(r: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title="gpt2-pipeline doctor", show_lines=False)
    table.add_column("probe", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("details", overflow="fold")

    def row(name: str, section: Any, details: str) -> None:
        status, why = _status(section)
        table.add_row(name, status, why or details)

    p = r["platform"]
    row("platform", p, f"{p.get('platform')} ({p.get('platform_class')}, device {p.get('device_name')})")
    row("vLLM", p, f"{p.get('vllm_version')} (build: {p.get('vllm_build')})")
    t = r["torch"]
    row("torch", t, f"{t.get('torch_version')}, CUDA build {t.get('cuda_build')}, cuda available: {t.get('cuda_available')}")
    pr = r["precision"]
    row("dtype auto", pr, "; ".join(f"{name}: {task} {c['dtype']} ({c['dtype_reason']})" for name, tasks in
                                    pr.get("models", {}).items() for task, c in tasks.items()))
    g = r["gpus"]
    gpus = g.get("gpus", []) if isinstance(g, dict) else []
    if gpus:
        row("GPUs", g, "; ".join(f"{x['index']}: {x['name']} {x['memory_gib']:g} GiB" for x in gpus) + f" ({g.get('source')})")
    elif "error" in g:
        row("GPUs", g, "")
    else:
        table.add_row("GPUs", "[yellow]none[/]", g.get("reason", "no GPU visible"))
    ray = r["ray"]
    ray_details = (f"{ray.get('address')}: {ray.get('nodes_alive')} nodes alive; total {_fmt(ray.get('total', {}))}"
                   + (f"; available {_fmt(ray['available'])}" if ray.get("available") else ""))
    row("Ray cluster", ray, ray_details)
    pk = r["packages"]
    row("packages", pk, _fmt(pk) if "error" not in pk else "")
    out.print(table)

    m = r["models"]
    if "error" in m:
        out.print(f"[red]models: {m['error']}[/]", highlight=False)
        return
    models = Table(title="models in the caches")
    models.add_column("model", no_wrap=True)
    models.add_column("kind", no_wrap=True)
    models.add_column("size MiB", justify="right")
    models.add_column("where", overflow="fold")
    for b in m["builtin"]:
        models.add_row(b["name"], "built-in", _fmt(b["size_mib"]) if b["built"] else "-",
                       b["path"] if b["built"] else "not built yet (built on first use)")
    for h in m["hub"]:
        models.add_row(h["name"], "HF hub", _fmt(h["size_mib"]), h["path"])
    out.print(models)
    if m.get("hub_error") or not m["hub"]:
        out.print(f"HF cache {m['hf_cache']}: {m.get('hub_error') or 'no models'}", highlight=False, soft_wrap=True)
