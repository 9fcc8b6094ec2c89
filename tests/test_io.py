"""Input planning and output shards: errors before any engine starts; atomic, readable output."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import write_prompts
from pipeline import io
from pipeline.config import ConfigError
from pipeline.records import ID


def test_missing_path(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        io.plan_input(str(tmp_path / "nope.parquet"), "prompt", "id", [])


def test_corrupt_parquet(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"this is not parquet at all")
    with pytest.raises(ConfigError, match="not a readable Parquet file"):
        io.plan_input(str(bad), "prompt", "id", [])


def test_missing_prompt_column_lists_columns(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"text": ["a"], "id": [1]}), path)
    with pytest.raises(ConfigError) as err:
        io.plan_input(str(path), "prompt", "id", [])
    assert "'prompt'" in str(err.value) and "text, id" in str(err.value)


def test_missing_passthrough_column(tmp_path):
    path = write_prompts(tmp_path / "p.parquet", ["a"])
    with pytest.raises(ConfigError, match="'topic'"):
        io.plan_input(str(path), "prompt", "id", ["topic"])


def test_empty_folder_and_unmatched_glob(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no .parquet files"):
        io.plan_input(str(tmp_path / "empty"), "prompt", "id", [])
    with pytest.raises(ConfigError, match="no files match"):
        io.plan_input(str(tmp_path / "*.parquet"), "prompt", "id", [])


def test_folder_glob_and_derived_ids(tmp_path):
    write_prompts(tmp_path / "in" / "a.parquet", ["a0", "a1", "a2"], row_group_size=2)
    write_prompts(tmp_path / "in" / "b.parquet", ["b0"])
    (tmp_path / "in" / "_ignored.txt").write_text("x")
    for source in (str(tmp_path / "in"), str(tmp_path / "in" / "*.parquet")):
        plan = io.plan_input(source, "prompt", "id", [])
        assert plan.total_rows == 4 and len(plan.fragments) == 3
        ids = [i for fr in plan.fragments for i in io.read_fragment(plan.fs, fr, plan.schema, "id")[ID].to_pylist()]
        assert ids == ["a.parquet#0", "a.parquet#1", "a.parquet#2", "b.parquet#0"]


def test_given_id_column_keeps_its_type(tmp_path):
    path = write_prompts(tmp_path / "p.parquet", ["x", "y"], id=pa.array([7, 9], pa.int64()))
    plan = io.plan_input(str(path), "prompt", "id", [])
    assert plan.id_type == pa.int64()
    assert io.read_fragment(plan.fs, plan.fragments[0], plan.schema, "id")[ID].to_pylist() == [7, 9]


def test_float_ids_are_refused(tmp_path):
    path = write_prompts(tmp_path / "p.parquet", ["x"], id=[1.5])
    with pytest.raises(ConfigError, match="id column"):
        io.plan_input(str(path), "prompt", "id", [])


def test_output_folder_refused_unless_overwrite_or_resume(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "something").write_text("x")
    with pytest.raises(ConfigError, match="--overwrite"):
        io.prepare_output(str(out), overwrite=False, resume=False)
    io.prepare_output(str(out), overwrite=False, resume=True)
    assert (out / "something").exists()
    io.prepare_output(str(out), overwrite=True, resume=False)
    assert not (out / "something").exists()


def test_shards_are_atomic_and_content_addressed(tmp_path):
    fs, folder = io.prepare_output(str(tmp_path / "out"), overwrite=False, resume=False)
    table = pa.table({ID: ["a", "b"], "sample_index": pa.array([0, 0], pa.int32()), "error": [None, None]})
    first = io.write_shard(fs, folder, table, "id", {b"k": b"v"})
    again = io.write_shard(fs, folder, table, "id", {b"k": b"v"})
    assert first == again  # a retried batch overwrites its own shard: no duplicates
    (tmp_path / "out" / ".tmp-dead-run.parquet").write_bytes(b"partial")
    assert [p.rsplit("/", 1)[-1] for p in io.committed_shards(fs, folder)] == [first]
    assert io.committed_ids(fs, folder, "id").to_pylist() == ["a", "b"]
    assert io.remove_temp_files(fs, folder) == 1
    written = pq.read_table(tmp_path / "out" / first)
    assert written.column_names[0] == "id" and written.schema.metadata[b"k"] == b"v"
