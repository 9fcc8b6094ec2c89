"""An engine's start-up keeps the garbage collector out of the way: paused while torch, vLLM and
the model load, the imports' objects frozen before vLLM's own collections, and back on after."""

import gc
import os
import subprocess
import sys
import threading

from pipeline.engine import collector_paused


def test_collector_paused_nests_and_restores_the_collector():
    assert gc.isenabled()
    with collector_paused():
        assert not gc.isenabled()
        with collector_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the outer start is still running
    assert gc.isenabled()
    gc.disable()  # a caller that runs with the collector off keeps it off
    try:
        with collector_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_collector_paused_is_shared_by_concurrent_starts():
    """Two engines starting side by side (serve builds two): the first one done leaves the
    collector off for the other; the last one out turns it back on."""
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    seen: dict[str, bool] = {}

    def first() -> None:
        with collector_paused():
            first_in.set()
            second_in.wait()
        first_out.set()

    def second() -> None:
        first_in.wait()
        with collector_paused():
            second_in.set()
            first_out.wait()
            seen["after the first left"] = gc.isenabled()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert seen == {"after the first left": False}
    assert gc.isenabled()


def test_a_process_forked_during_the_pause_starts_with_the_collector_on():
    """vLLM forks its engine core while an ``AsyncLLM`` engine starts: that process must not
    run with the collector off for good."""
    with collector_paused():
        pid = os.fork()
        if pid == 0:  # the child: exit 0 only if its collector is on and a pause there works
            ok = gc.isenabled()
            with collector_paused():
                ok = ok and not gc.isenabled()
            os._exit(0 if ok and gc.isenabled() else 1)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


START_UP = """
import gc
young = []
gc.callbacks.append(lambda phase, info: young.append(1) if phase == "stop" and info["generation"] == 0 else None)
from pipeline.config import EngineConfig
from pipeline.engine import Engine

if __name__ == "__main__":
    young.clear()
    engine = Engine(EngineConfig(model="demo"), in_process=True)
    assert engine.in_process
    print("YOUNG-COLLECTIONS", len(young), "ENABLED", gc.isenabled(), "FROZEN", gc.get_freeze_count())
    engine.shutdown()
"""


def test_engine_start_up_runs_no_automatic_collections(tmp_path):
    """From vLLM's import to the built engine the collector makes no collections of its own
    (with Python's defaults it made about 2,000 young ones, and 14 full ones that walked every
    object), and it is on again once the engine is built. Only the explicit calls remain:
    vLLM's heap freeze and ours collect the young generation once each."""
    script = tmp_path / "start_up.py"
    script.write_text(START_UP)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("YOUNG-COLLECTIONS")), None)
    assert line is not None, done.stderr[-3000:]
    _, young, _, enabled, _, frozen = line.split()
    assert int(young) <= 2, line
    assert enabled == "True" and int(frozen) > 100_000, line
