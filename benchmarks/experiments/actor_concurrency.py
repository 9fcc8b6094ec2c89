"""Experiment: does `gpt2-pipeline run` keep its engine full? Stock vs one-line fix, back to back.

    python benchmarks/experiments/actor_concurrency.py --model gpt2-small-random --rows 384 --max-tokens 32

Finding it checks: ``pipeline/batch.py::_engine_stage`` builds the engine stage with
``ActorPoolStrategy(size=R, max_tasks_in_flight_per_actor=4)`` but leaves the actor's Ray
``max_concurrency`` at 1, so an ``EngineActor`` runs ONE block (``batch_size`` = 64 rows) at a
time; the other 3 tasks in flight only wait in the actor's queue. The engine therefore never
holds more than 64 sequences (``max_num_seqs`` is 256) and drains at the end of every block:
output shards are committed one by one, evenly spaced. The variant adds
``max_concurrent_calls_per_actor=4`` (Ray Data then sets the actor's ``max_concurrency``; the
async UDF calls share one event loop, as Ray Data LLM does with ``max_concurrent_batches``).

Runs the same prompt set through the stock CLI and through the CLI with that single change
(monkeypatched in a subprocess; nothing in ``pipeline/`` is edited) and writes
``benchmarks/results/experiment-actor-concurrency-<model>.json``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent.parent))


def patched_cli() -> None:
    """``gpt2-pipeline`` with the engine actors accepting TASKS_IN_FLIGHT_PER_REPLICA calls at once."""
    import ray.data

    import pipeline.batch as b

    def _engine_stage(ds, job, spec):
        compute = ray.data.ActorPoolStrategy(
            size=job.engine.replicas, max_tasks_in_flight_per_actor=b.TASKS_IN_FLIGHT_PER_REPLICA,
            max_concurrent_calls_per_actor=b.TASKS_IN_FLIGHT_PER_REPLICA,
        )
        return ds.map_batches(
            b.EngineActor, batch_size=None, batch_format="pyarrow", compute=compute,
            num_cpus=job.engine.cpus_per_replica,
            num_gpus=job.engine.gpus_per_replica * job.engine.tensor_parallel_size or None,
            fn_constructor_kwargs={"engine_config": job.engine, "spec": spec},
        )

    b._engine_stage = _engine_stage
    from pipeline.cli import main

    main()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt2-small-random")
    p.add_argument("--rows", type=int, default=384)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--wait-idle", type=float, default=60)
    a = p.parse_args()

    import offline
    from _common import RESULTS, machine, versions, write_json

    from pipeline.prompts import write_prompt_set

    args = offline.parse(["--model", a.model, "--rows", str(a.rows), "--max-tokens", str(a.max_tokens)])
    work = Path(tempfile.mkdtemp(prefix="gpt2-bench-exp-"))
    prompts = work / f"prompts-{a.rows}.parquet"
    write_prompt_set(prompts, a.rows, seed=0)
    stock = offline._cli
    variants = (("stock", stock), ("max_concurrent_calls_per_actor=4",
                                    lambda: [sys.executable, str(HERE), "--as-patched-cli"]))
    runs = []
    try:
        _run(a, args, prompts, work, variants, runs)
    finally:
        offline._cli = stock
        shutil.rmtree(work, ignore_errors=True)
    out = RESULTS / f"experiment-actor-concurrency-{a.model}.json"
    write_json(out, {"meta": {"model": a.model, "rows": a.rows, "max_tokens": a.max_tokens, "machine": machine(),
                              "versions": versions()}, "runs": runs})
    print(f"wrote {out}")


def _run(a, args, prompts, work, variants, runs) -> None:
    import offline
    from _common import wait_idle

    for name, cli in variants:
        offline._cli = cli
        idle = wait_idle(a.wait_idle)
        r = offline.run_ours(args, prompts, work, a.rows, 1, name.split("=")[0])
        mtimes = sorted(r.pop("_mtimes", []))
        t0 = mtimes[0][0] if mtimes else 0.0
        r.update(variant=name, idle_wait=idle, shard_commit_times_s=[round(t - t0, 2) for t, _ in mtimes])
        if r.get("first_output_s") is not None:
            r["last_output_s"] = r["first_output_s"] + (r.get("output_span_s") or 0.0)
        r.pop("summary", None)
        runs.append(r)
        print(f"{name}: {r.get('status')}, wall {r['wall_s']:.1f} s, first shard {r.get('first_output_s') or 0:.1f} s, "
              f"last shard {r.get('last_output_s') or 0:.1f} s, shard times {r['shard_commit_times_s']}", flush=True)


if __name__ == "__main__":
    if "--as-patched-cli" in sys.argv:
        sys.argv.remove("--as-patched-cli")
        patched_cli()
    else:
        main()
