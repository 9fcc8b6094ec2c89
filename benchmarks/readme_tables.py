"""Print the README's Performance tables (markdown) from offline.py / online.py result files.

    python benchmarks/readme_tables.py --offline benchmarks/results/offline-demo.json \
        --online benchmarks/results/online-demo.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Optional

OFFLINE_NAMES = {"ours": "**gpt2-pipeline run**", "raw_vllm": "raw `vllm.LLM.generate`",
                 "raw_vllm_1proc": "raw `vllm.LLM.generate`, one process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`)",
                 "ray_data_llm": "Ray Data LLM (`build_processor`)", "hf_transformers": "HF `generate`, batched"}
ONLINE_NAMES = {"vllm": "`vllm serve`", "ours": "**ours, direct ingress**", "ours-proxy": "ours, Serve proxy ingress"}


def _n(value: Optional[float], digits: int = 0, suffix: str = "") -> str:
    return "-" if value is None else f"{value:,.{digits}f}{suffix}"


def _t(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def offline(path: Path) -> str:
    d = json.loads(path.read_text())
    m = d["meta"]
    lines = [f"Offline: `{m['model']}`, {m['rows']} prompts x {m['max_tokens']} tokens "
             f"(HF: {m.get('hf_rows') or m['rows']} prompts), {m['replicas']} replica(s), "
             f"{m.get('gpus_per_replica', 0):g} GPU(s) per replica", "",
             "| system | end to end tok/s | vs raw vLLM | steady tok/s | vs raw vLLM |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for r in d["results"]:
        name = OFFLINE_NAMES.get(r["system"], r["system"])
        if r.get("status") != "ok":
            lines.append(f"| {name} | {r.get('status')} | | | |")
            continue
        lines.append(f"| {name} | {_n(r.get('tokens_per_s_e2e'))} | {_n(r.get('vs_raw_e2e'), 2, 'x')} "
                     f"| {_n(r.get('steady_tokens_per_s'))} | {_n(r.get('vs_raw_steady'), 2, 'x')} |")
    return "\n".join(lines)


def online(path: Path) -> str:
    d = json.loads(path.read_text())
    m = d["meta"]
    systems = {s["system"]: s for s in d["systems"]}
    base = {lv["concurrency"]: lv for lv in (systems.get("vllm") or {}).get("levels", [])}
    lines = [f"Online: `{m['model']}`, streaming, {m['max_tokens']} tokens per request, "
             f"{m.get('duration_s') or m.get('requests_per_level')} {'s' if m.get('duration_s') else 'requests'} per level", "",
             "| streams | system | req/s | out tok/s | x vLLM tok/s | TTFT p50 / p95 | latency p50 / p95 |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    rows: list[tuple[int, int, str]] = []
    for order, (key, s) in enumerate(systems.items()):
        name = ONLINE_NAMES.get(key, key)
        if s.get("status") != "ok":
            rows.append((0, order, f"| - | {name} | {s.get('status')} | | | | |"))
            continue
        for lv in s["levels"]:
            ref = base.get(lv["concurrency"], {}).get("output_tokens_per_s")
            ratio = lv["output_tokens_per_s"] / ref if ref and lv.get("output_tokens_per_s") is not None else None
            rows.append((lv["concurrency"], order,
                         f"| {lv['concurrency']} | {name} | {_n(lv['requests_per_s'], 2)} | {_n(lv['output_tokens_per_s'])} "
                         f"| {_n(ratio, 2, 'x')} | {_t(lv['ttft_p50_s'])} / {_t(lv['ttft_p95_s'])} "
                         f"| {_t(lv['latency_p50_s'])} / {_t(lv['latency_p95_s'])} |"))
    return "\n".join(lines + [r for _, _, r in sorted(rows, key=lambda x: (x[0], x[1]))])


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--offline", type=Path, help="offline.py result JSON")
    p.add_argument("--online", type=Path, help="online.py result JSON")
    a = p.parse_args(argv)
    parts: list[Any] = []
    for path, fn in ((a.offline, offline), (a.online, online)):
        if path is None:
            continue
        parts.append(fn(path) if path.is_file() else f"(no results: {path} is missing)")
    print("\n\n".join(parts))


if __name__ == "__main__":
    main()
