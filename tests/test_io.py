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
    written = pq.read_table(tmp_path / "out" / "_staging" / first)
    assert written.column_names[0] == "id" and written.schema.metadata[b"k"] == b"v"


# ---- text formats and duplicate ids (planning only: no engines) -------------------------------------
def test_jsonl_and_csv_plan_like_parquet(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"prompt": "x", "max_tokens": 3}\n\n{"prompt": null}\n')
    (tmp_path / "b.csv").write_text("prompt,topic\n1,t\n,u\n")
    plan = io.plan_input(str(tmp_path / "a.jsonl"), "prompt", "id", [])
    assert plan.format == "jsonl" and plan.total_rows == 2 and "max_tokens" in plan.schema.names
    fs, folder = io.prepare_output(str(tmp_path / "out"), overwrite=False, resume=False)
    io.stage_input(plan, fs, folder)
    table = io.read_fragment(plan.fs, plan.fragments[0], plan.schema, "id")
    assert table[ID].to_pylist() == ["a.jsonl#0", "a.jsonl#1"] and table["prompt"].to_pylist() == ["x", None]
    assert (tmp_path / "out" / "_input" / "00000.parquet").exists()
    plan = io.plan_input(str(tmp_path / "b.csv"), "prompt", "id", ["topic"])
    assert plan.schema.field("prompt").type == pa.string() and plan.total_rows == 2  # "1" stays a text


def test_malformed_lines_name_file_and_line(tmp_path):
    cases = {
        "bad.jsonl": ('{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "c",\n', "bad.jsonl line 3: not valid JSON"),
        "list.jsonl": ('{"prompt": "a"}\n[1, 2]\n', "list.jsonl line 2: not a JSON object"),
        "types.jsonl": ('{"prompt": "a"}\n\n{"prompt": 5}\n', "types.jsonl line 3: "),
        "bad.csv": ("id,prompt\n1,a\n2,b\n3,c,extra\n", "bad.csv line 4: "),
    }
    for name, (text, needle) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ConfigError) as err:
            io.plan_input(str(tmp_path / name), "prompt", "id", [])
        assert needle in str(err.value), str(err.value)


def test_folder_takes_its_one_format_and_input_format_picks(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.csv").write_text("prompt\nx\n")
    (tmp_path / "in" / "b.csv.gz").write_bytes(__import__("gzip").compress(b"prompt\ny\nz\n"))
    assert io.plan_input(str(tmp_path / "in"), "prompt", "id", []).total_rows == 3
    write_prompts(tmp_path / "in" / "c.parquet", ["p"])
    with pytest.raises(ConfigError, match="holds csv, parquet files; pass --input-format"):
        io.plan_input(str(tmp_path / "in"), "prompt", "id", [])
    assert io.plan_input(str(tmp_path / "in"), "prompt", "id", [], input_format="parquet").total_rows == 1


def test_duplicate_ids_refused_or_first_kept(tmp_path):
    write_prompts(tmp_path / "in" / "a.parquet", ["a", "b", "c"], id=["x", "y", "x"])
    write_prompts(tmp_path / "in" / "b.parquet", ["d", "e"], id=["y", "z"])
    with pytest.raises(ConfigError) as err:
        io.plan_input(str(tmp_path / "in"), "prompt", "id", [])
    assert "input has 2 duplicate ids (2 extra rows; e.g. 'x', 'y')" in str(err.value)
    plan = io.plan_input(str(tmp_path / "in"), "prompt", "id", [], dedupe="first")
    assert plan.total_rows == 3 and plan.deduplicated == 2
    assert plan.dropped == {"a.parquet": [2], "b.parquet": [0]}


def test_openai_batch_planning_errors(tmp_path):
    good = '{"custom_id": "r1", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}}\n'
    cases = [
        ('{"custom_id": "r2", "method": "GET", "url": "/v1/completions", "body": {}}', "line 2: method must be POST"),
        ('{"custom_id": "r2", "method": "POST", "url": "/v1/chat/completions", "body": {}}', "line 2: url '/v1/chat/completions' is not supported"),
        ('{"method": "POST", "url": "/v1/completions", "body": {}}', "line 2: custom_id must be a non-empty string"),
        ('{"custom_id": "r2", "method": "POST", "url": "/v1/completions", "body": "x"}', "line 2: body must be a JSON object"),
        ('{"custom_id": "r1", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}}', "1 duplicate ids"),
    ]
    for line, needle in cases:
        (tmp_path / "b.jsonl").write_text(good + line + "\n")
        with pytest.raises(ConfigError) as err:
            io.plan_input(str(tmp_path / "b.jsonl"), "prompt", "id", [], input_format="openai-batch")
        assert needle in str(err.value) and "b.jsonl" in str(err.value) or "duplicate" in needle, str(err.value)
    (tmp_path / "b.jsonl").write_text(good)
    with pytest.raises(ConfigError, match="pass --input-format openai-batch"):
        io.plan_input(str(tmp_path / "b.jsonl"), "prompt", "id", [])
    plan = io.plan_input(str(tmp_path / "b.jsonl"), "prompt", "id", [], input_format="openai-batch")
    assert plan.id_type == pa.string() and plan.schema.names == [ID, "body", "url"]
