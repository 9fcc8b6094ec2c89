"""Online load test: streaming ``/v1/completions`` at fixed concurrency, vLLM's server vs ours.

    python benchmarks/online.py --model demo                       # vLLM server, then ours, 1/8/32 streams
    python benchmarks/online.py --model demo --systems vllm --duration 10 --concurrency 1,8
    python benchmarks/online.py --base-url http://127.0.0.1:8000 --model demo   # any running server

For each system in turn (never two at once): start the server on 127.0.0.1 and a free port, wait
until ``/v1/models`` answers, warm it up, then for each concurrency level run that many closed-loop
streams (each sends the next request when the previous one ends) for ``--duration`` seconds or
``--requests`` requests, then stop the server and everything it started. Every request is the same
work: ``max_tokens`` tokens, ``ignore_eos``, temperature sampling without top_p.

Measured per level: requests/s, output tokens/s, p50/p95 time to first token (first streamed
chunk) and end-to-end latency, errors. Results: a table, ``benchmarks/results/online-<model>.json``
and a PNG beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))


# ================================================================================================
# The load generator (works against any OpenAI-compatible base URL)
# ================================================================================================
@dataclass
class Result:
    ok: bool
    ttft: Optional[float] = None
    latency: Optional[float] = None
    tokens: int = 0
    error: Optional[str] = None


async def one_request(client: Any, url: str, body: dict[str, Any]) -> Result:
    start = time.perf_counter()
    ttft = None
    chunks = 0
    usage_tokens = None
    try:
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")[:200]
                return Result(False, error=f"HTTP {resp.status_code}: {text}")
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                if obj.get("error"):
                    return Result(False, error=f"stream error: {str(obj['error'])[:200]}")
                if obj.get("choices"):
                    if ttft is None:
                        ttft = time.perf_counter() - start
                    chunks += 1
                if obj.get("usage"):
                    usage_tokens = obj["usage"].get("completion_tokens")
    except Exception as exc:  # timeouts, resets: an error sample, not a crash
        return Result(False, error=f"{type(exc).__name__}: {str(exc)[:200]}")
    latency = time.perf_counter() - start
    if ttft is None:
        return Result(False, latency=latency, error="no tokens streamed")
    return Result(True, ttft, latency, usage_tokens if usage_tokens is not None else chunks)


def percentile(values: list[float], q: float) -> Optional[float]:
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


async def run_level(base_url: str, model: str, prompts: list[str], concurrency: int, duration: Optional[float],
                    requests: Optional[int], max_tokens: int, temperature: float, ignore_eos: bool,
                    request_timeout: float, seed: int = 0) -> dict[str, Any]:
    """``concurrency`` closed-loop streams for ``duration`` s (or ``requests`` requests in all)."""
    import httpx

    url = base_url.rstrip("/") + "/v1/completions"
    rng = random.Random(seed + concurrency)
    results: list[Result] = []
    started = 0
    stop_at = time.perf_counter() + duration if duration else None

    def next_body() -> Optional[dict[str, Any]]:
        nonlocal started
        if requests is not None and started >= requests:
            return None
        if stop_at is not None and time.perf_counter() >= stop_at:
            return None
        started += 1
        body = {"model": model, "prompt": rng.choice(prompts), "max_tokens": max_tokens, "temperature": temperature,
                "stream": True, "stream_options": {"include_usage": True}}
        if ignore_eos:
            body["ignore_eos"] = True  # vLLM's extension (equal work per request)
        return body

    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    timeout = httpx.Timeout(request_timeout, connect=10.0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False) as client:
        async def stream() -> None:
            while (body := next_body()) is not None:
                results.append(await one_request(client, url, body))

        t0 = time.perf_counter()
        hard_cap = (duration or 0) + request_timeout + 30 if duration else request_timeout * (requests or 1) + 30
        try:
            await asyncio.wait_for(asyncio.gather(*(stream() for _ in range(concurrency))), timeout=hard_cap)
            capped = False
        except asyncio.TimeoutError:
            capped = True
        elapsed = time.perf_counter() - t0
    ok = [r for r in results if r.ok]
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            key = (r.error or "?")[:120]
            errors[key] = errors.get(key, 0) + 1
    tokens = sum(r.tokens for r in ok)
    return {
        "concurrency": concurrency, "elapsed_s": elapsed, "requests": len(results), "ok": len(ok),
        "errors": len(results) - len(ok), "error_kinds": errors, "hit_hard_cap": capped,
        "requests_per_s": len(ok) / elapsed if elapsed else None, "output_tokens": tokens,
        "output_tokens_per_s": tokens / elapsed if elapsed else None,
        "tokens_per_request_mean": tokens / len(ok) if ok else None,
        "ttft_p50_s": percentile([r.ttft for r in ok], 0.5), "ttft_p95_s": percentile([r.ttft for r in ok], 0.95),
        "latency_p50_s": percentile([r.latency for r in ok], 0.5),
        "latency_p95_s": percentile([r.latency for r in ok], 0.95),
    }


# ================================================================================================
# Servers
# ================================================================================================
@dataclass
class Server:
    name: str
    cmd: list[str]
    base_url: str
    log: Path
    proc: Optional[subprocess.Popen] = None
    monitor: Any = None
    startup_s: Optional[float] = None
    notes: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)


def vllm_command(model: str, port: int, stream_interval: int = 1) -> tuple[list[str], dict[str, Any]]:
    """vLLM's own OpenAI server with our engine's arguments (read from ``engine_args``)."""
    from offline import engine_kwargs  # the same helper as the offline benchmark

    from pipeline.models import CONTEXT_LENGTH

    kw = engine_kwargs(model)
    flags = {
        "--model": kw["model"], "--served-model-name": model, "--dtype": kw["dtype"],
        "--max-model-len": kw.get("max_model_len") or CONTEXT_LENGTH,
        "--max-num-seqs": kw["max_num_seqs"], "--gpu-memory-utilization": kw["gpu_memory_utilization"],
        "--tensor-parallel-size": kw["tensor_parallel_size"], "--seed": kw["seed"],
    }
    if "kv_cache_memory_bytes" in kw:
        flags["--kv-cache-memory-bytes"] = kw["kv_cache_memory_bytes"]
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    for k, v in flags.items():
        cmd += [k, str(v)]
    cmd += ["--enforce-eager" if kw.get("enforce_eager") else "--no-enforce-eager",
            "--enable-prefix-caching" if kw.get("enable_prefix_caching") else "--no-enable-prefix-caching"]
    if kw.get("enable_chunked_prefill") is False:
        cmd += ["--no-enable-chunked-prefill"]
    if kw.get("disable_log_stats"):
        cmd += ["--disable-log-stats"]
    cmd += ["--stream-interval", str(stream_interval)]
    cmd += ["--disable-uvicorn-access-log", "--host", "127.0.0.1", "--port", str(port)]
    return cmd, kw


def ours_command(model: str, port: int, replicas: int, gpus_per_replica: float = 0.0, ingress: Optional[str] = None,
                 stream_interval: int = 1) -> tuple[Optional[list[str]], list[str]]:
    """``gpt2-pipeline serve ...`` if that command exists; else None and the reason."""
    from _common import bench_env

    exe = shutil.which("gpt2-pipeline")
    base = [exe] if exe else [sys.executable, "-m", "pipeline"]
    try:
        help_run = subprocess.run(base + ["serve", "--help"], capture_output=True, text=True, timeout=120,
                                  env=bench_env(), check=False)
    except subprocess.TimeoutExpired:
        return None, ["`gpt2-pipeline serve --help` did not answer within 120 s"]
    text = help_run.stdout + help_run.stderr
    if help_run.returncode != 0:
        lines = [ln.strip(" │╭╮╰╯─\t") for ln in text.splitlines()]
        why = next((ln for ln in lines if "No such command" in ln), None) or \
            next((ln for ln in lines if any(ch.isalpha() for ch in ln) and not ln.startswith(("Usage", "Try", "Error"))), "")
        return None, [f"`gpt2-pipeline serve` is not available yet (exit {help_run.returncode}: {why})"]
    cmd = base + ["serve", "--model", model, "--replicas", str(replicas), "--port", str(port)]
    notes = []
    if "--host" in text:
        cmd += ["--host", "127.0.0.1"]
    if gpus_per_replica:
        cmd += ["--gpus-per-replica", str(gpus_per_replica)]
    if "--no-access-log" in text:
        cmd += ["--no-access-log"]  # as vLLM's --disable-uvicorn-access-log
    if ingress:
        cmd += ["--ingress", ingress]
    if stream_interval != 1:
        cmd += ["--stream-interval", str(stream_interval)]
    if "--no-embeddings" in text:
        cmd += ["--no-embeddings"]  # generation only, like the vLLM server (no second engine)
        notes.append("started with --no-embeddings")
    else:
        notes.append("no --no-embeddings flag: an embeddings engine may run beside the generation engine")
    return cmd, notes


def start(server: Server) -> None:
    from _common import TreeMonitor, bench_env

    server.log.parent.mkdir(parents=True, exist_ok=True)
    with open(server.log, "w") as log:  # the child keeps its own copy of the descriptor
        server.proc = subprocess.Popen(server.cmd, stdout=log, stderr=subprocess.STDOUT, env=bench_env(server.env),
                                       start_new_session=True)
    server.monitor = TreeMonitor(server.proc.pid, interval=1.0).start()


def wait_ready(server: Server, model: str, timeout: float) -> None:
    import httpx

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.name} exited with {server.proc.returncode} during start-up:\n{tail(server.log)}")
        try:
            r = httpx.get(server.base_url + "/v1/models", timeout=5, trust_env=False)
            if r.status_code == 200 and model in r.text:
                server.startup_s = time.monotonic() - t0
                return
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise TimeoutError(f"{server.name} not ready after {timeout:.0f} s:\n{tail(server.log)}")


def stop(server: Server) -> dict[str, Any]:
    """SIGINT the server's process group (a clean shutdown), then SIGTERM/SIGKILL, then any
    descendant still alive (Ray workers, vLLM engine cores): nothing it started survives."""
    from _common import kill_tree

    if server.proc is None:
        return {}
    left_before = server.monitor.leftovers()
    for sig, wait in ((signal.SIGINT, 45), (signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        if server.proc.poll() is not None:
            break
        try:
            os.killpg(server.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            server.proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
    stats = server.monitor.stop()
    left = [p for p in left_before + server.monitor.leftovers() if _alive(p)]
    from _common import _label

    killed = sorted({f"{p.pid}:{_label(p)}" for p in left})
    if left:
        kill_tree(list({p.pid: p for p in left}.values()))
    return {"memory": stats.to_dict(), "leftover_processes_killed": killed, "returncode": server.proc.returncode}


def _alive(p: Any) -> bool:
    import psutil

    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def tail(path: Path, n: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def warm_up(base_url: str, model: str, max_tokens: int, prompts: list[str]) -> None:
    """10 s at 8 streams: both servers reach steady state (caches, lazy imports) before measuring."""
    r = asyncio.run(run_level(base_url, model, prompts, 8, 10.0, None, max_tokens, 1.0, True, 120, seed=99))
    if r["ok"] == 0:
        raise RuntimeError(f"warm-up failed: {r['error_kinds']}")


# ================================================================================================
# Driver
# ================================================================================================
def measure(a: argparse.Namespace, name: str, base_url: str, prompts: list[str]) -> list[dict[str, Any]]:
    from _common import wait_idle

    levels = []
    for c in [int(x) for x in a.concurrency.split(",")]:
        idle = wait_idle(a.wait_idle)
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {c} stream(s) ...", flush=True)
        r = asyncio.run(run_level(base_url, a.model, prompts, c, None if a.requests else a.duration, a.requests,
                                  a.max_tokens, a.temperature, not a.no_ignore_eos, a.request_timeout))
        r["idle_wait"] = idle
        levels.append(r)
        print(f"    {r['ok']} ok / {r['errors']} errors, {r['output_tokens_per_s'] or 0:,.0f} tok/s, "
              f"TTFT p50 {fmt_s(r['ttft_p50_s'])}, latency p50 {fmt_s(r['latency_p50_s'])}", flush=True)
    return levels


def fmt_s(x: Optional[float]) -> str:
    return "-" if x is None else f"{x * 1000:,.0f} ms" if x < 1 else f"{x:,.2f} s"


def run_system(a: argparse.Namespace, system: str, work: Path, prompts: list[str]) -> dict[str, Any]:
    from _common import free_port

    port = free_port()
    out: dict[str, Any] = {"system": system}
    env: dict[str, str] = {}
    if system in ("vllm", "vllm-1proc"):
        cmd, kw = vllm_command(a.model, port, a.stream_interval)
        out["engine_kwargs"] = {k: str(v) for k, v in kw.items()}
        notes: list[str] = []
        if system == "vllm-1proc":  # the model inside the engine-core process, as our CPU engines run it
            env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
            notes.append("VLLM_ENABLE_V1_MULTIPROCESSING=0: no separate worker process")
    else:
        # "ours": the default (auto ingress: direct on this embedded Ray); "ours-proxy": through Serve's proxy
        ingress = system.split("-", 1)[1] if "-" in system else None
        cmd, notes = ours_command(a.model, port, a.replicas, a.gpus_per_replica, ingress, a.stream_interval)
        if cmd is None:
            print(f"skipping ours: {notes[0]}", flush=True)
            return {**out, "status": "skipped", "reason": notes[0]}
    server = Server(system, cmd, f"http://127.0.0.1:{port}", work / f"server-{system}.log", notes=notes, env=env)
    out.update(command=" ".join(cmd), notes=notes)
    print(f"[{time.strftime('%H:%M:%S')}] starting {system}: {' '.join(cmd)}", flush=True)
    try:
        start(server)
        wait_ready(server, a.model, a.startup_timeout)
        out["startup_s"] = server.startup_s
        print(f"    ready after {server.startup_s:.1f} s", flush=True)
        warm_up(server.base_url, a.model, a.max_tokens, prompts)
        out["levels"] = measure(a, system, server.base_url, prompts)
        out["status"] = "ok"
    except Exception as exc:
        out.update(status="error", error=f"{type(exc).__name__}: {exc}")
        print(f"    {system} failed: {type(exc).__name__}: {str(exc)[:2000]}", flush=True)
    finally:
        out.update(stop(server))
        print(f"[{time.strftime('%H:%M:%S')}] stopped {system}", flush=True)
    return out


def compare(systems: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Ours / vLLM per concurrency level (throughput: >1 is better; latency: <1 is better)."""
    by = {s["system"]: s for s in systems if s.get("status") == "ok"}
    if "vllm" not in by:
        return []
    rows = []
    keys = ("requests_per_s", "output_tokens_per_s", "ttft_p50_s", "ttft_p95_s", "latency_p50_s", "latency_p95_s")
    for name in [n for n in by if n.startswith("ours")]:
        for lv, lo in zip(by["vllm"]["levels"], by[name]["levels"]):
            rows.append({"system": name, "concurrency": lv["concurrency"],
                         **{f"{k}_ours_over_vllm": (lo[k] / lv[k]) if lo.get(k) and lv.get(k) else None for k in keys}})
    return rows


def report(systems: list[dict[str, Any]], ratios: list[dict[str, Any]], title: str) -> None:
    from _common import fmt, print_table

    cols = ["system", "streams", "ok", "errors", "req/s", "out tok/s", "TTFT p50", "TTFT p95", "latency p50",
            "latency p95", "tok/req"]
    rows = []
    for s in systems:
        if s.get("status") != "ok":
            rows.append([s["system"], s.get("status"), None, None, None, None, None, None, None, None, None])
            continue
        for lv in s["levels"]:
            rows.append([s["system"], lv["concurrency"], lv["ok"], lv["errors"], fmt(lv["requests_per_s"], 2),
                         fmt(lv["output_tokens_per_s"], 0), fmt_s(lv["ttft_p50_s"]), fmt_s(lv["ttft_p95_s"]),
                         fmt_s(lv["latency_p50_s"]), fmt_s(lv["latency_p95_s"]), fmt(lv["tokens_per_request_mean"], 1)])
    print_table(title, cols, rows)
    for s in systems:
        if s.get("status") != "ok":
            print(f"  {s['system']}: {s.get('status')}: {(s.get('reason') or s.get('error') or '').splitlines()[0][:300]}")
    if ratios:
        print_table("ours / vLLM (throughput: higher is better; times: lower is better)",
                    ["system", "streams", "req/s", "tok/s", "TTFT p50", "TTFT p95", "latency p50", "latency p95"],
                    [[r["system"], r["concurrency"]] + [fmt(r[f"{k}_ours_over_vllm"], 2) for k in (
                        "requests_per_s", "output_tokens_per_s", "ttft_p50_s", "ttft_p95_s", "latency_p50_s",
                        "latency_p95_s")] for r in ratios])


def chart(systems: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [s for s in systems if s.get("status") == "ok"]
    if not ok:
        return
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for s in ok:
        c = [lv["concurrency"] for lv in s["levels"]]
        axes[0].plot(c, [lv["output_tokens_per_s"] or 0 for lv in s["levels"]], marker="o", label=s["system"])
        axes[1].plot(c, [lv["ttft_p50_s"] or 0 for lv in s["levels"]], marker="o", label=f"{s['system']} p50")
        axes[1].plot(c, [lv["ttft_p95_s"] or 0 for lv in s["levels"]], marker="x", linestyle="--", label=f"{s['system']} p95")
        axes[2].plot(c, [lv["latency_p50_s"] or 0 for lv in s["levels"]], marker="o", label=f"{s['system']} p50")
        axes[2].plot(c, [lv["latency_p95_s"] or 0 for lv in s["levels"]], marker="x", linestyle="--", label=f"{s['system']} p95")
    levels = sorted({lv["concurrency"] for s in ok for lv in s["levels"]})
    for ax, t, y in zip(axes, ("output tokens/s", "time to first token", "request latency"), ("tokens/s", "s", "s")):
        ax.set_title(t, fontsize=10)
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel(y)
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(v) for v in levels])
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo", help="Model to serve (and the 'model' field of each request).")
    p.add_argument("--systems", default="vllm,ours,ours-proxy",
                   help="Comma list, run one after the other: vllm, vllm-1proc (VLLM_ENABLE_V1_MULTIPROCESSING=0), ours (default ingress), ours-proxy, ours-direct.")
    p.add_argument("--stream-interval", type=int, default=1, help="Tokens per streamed chunk, for every server.")
    p.add_argument("--base-url", default=None, help="Measure this running server instead (nothing is started).")
    p.add_argument("--concurrency", default="1,8,32", help="Concurrent streams per level.")
    p.add_argument("--duration", type=float, default=30.0, help="Seconds per level (closed loop).")
    p.add_argument("--requests", type=int, default=None, help="Requests per level instead of --duration.")
    p.add_argument("--max-tokens", type=int, default=64, help="Tokens per request (ignore_eos: exact).")
    p.add_argument("--temperature", type=float, default=1.0, help="Temperature sampling, no top_p.")
    p.add_argument("--no-ignore-eos", action="store_true", help="Do not send ignore_eos (a server without it).")
    p.add_argument("--replicas", type=int, default=1, help="Replicas for ours.")
    p.add_argument("--gpus-per-replica", type=float, default=0.0, help="GPU boxes: passed to `gpt2-pipeline serve`.")
    p.add_argument("--prompts", type=int, default=256, help="Distinct prompts to draw from (pipeline.prompts).")
    p.add_argument("--startup-timeout", type=float, default=420, help="Seconds for a server to come up.")
    p.add_argument("--request-timeout", type=float, default=180, help="Seconds per request.")
    p.add_argument("--wait-idle", type=float, default=30, help="Before each level, wait up to N s for a quiet CPU.")
    p.add_argument("--name", default=None, help="Results file stem (default online-<model>).")
    return p.parse_args()


def main() -> None:
    a = parse()
    from _common import RESULTS, machine, versions, write_json
    from pipeline.prompts import make_prompts

    prompts = make_prompts(a.prompts, seed=1)
    meta = {"benchmark": "online", "model": a.model, "concurrency": a.concurrency, "duration_s": a.duration,
            "requests_per_level": a.requests, "max_tokens": a.max_tokens, "temperature": a.temperature,
            "ignore_eos": not a.no_ignore_eos, "replicas": a.replicas, "stream_interval": a.stream_interval, "prompts": a.prompts,
            "machine": machine(), "versions": versions(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if a.base_url:
        if not a.base_url.startswith(("http://127.0.0.1", "http://localhost")):
            print("note: --base-url is not on 127.0.0.1", file=sys.stderr)
        systems = [{"system": "external", "base_url": a.base_url, "status": "ok",
                    "levels": measure(a, "external", a.base_url, prompts)}]
    else:
        from pipeline.models import resolve_model

        resolve_model(a.model)
        work = Path(tempfile.mkdtemp(prefix="gpt2-bench-online-"))
        systems = []
        try:
            for system in [s.strip() for s in a.systems.split(",") if s.strip()]:
                systems.append(run_system(a, system, work, prompts))
        finally:
            for s in systems:
                if s.get("status") == "error":
                    s["server_log_tail"] = tail(work / f"server-{s['system']}.log", 40)
            shutil.rmtree(work, ignore_errors=True)
    ratios = compare(systems)
    name = a.name or f"online-{a.model.replace('/', '_')}"
    write_json(RESULTS / f"{name}.json", {"meta": meta, "systems": systems, "ours_over_vllm": ratios})
    title = (f"online, {a.model}: streaming /v1/completions, {a.max_tokens} tokens/request, "
             f"{f'{a.requests} requests' if a.requests else f'{a.duration:g}s'} per level")
    chart(systems, RESULTS / f"{name}.png", title)
    report(systems, ratios, title)
    print(f"wrote {RESULTS / (name + '.json')} and {RESULTS / (name + '.png')}")


if __name__ == "__main__":
    main()
