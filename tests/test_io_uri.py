"""Input and output given as ``file://`` URIs go through pyarrow filesystems like s3:// or gs://
would: plan the input, read its row groups, prepare the output folder, write shards atomically.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import io
from pipeline.config import ConfigError
from pipeline.records import ID

pytestmark = pytest.mark.timeout(60)


def uri(path: Path) -> str:
    return path.resolve().as_uri()  # file:///..., spaces percent-encoded


@pytest.fixture()
def inputs(tmp_path: Path) -> Path:
    folder = tmp_path / "in put"  # a space: must be percent-encoded in the URI
    folder.mkdir()
    for k in range(2):
        ids = list(range(k * 10, k * 10 + 10))
        table = pa.table({"id": ids, "prompt": [f"prompt {i}" for i in ids], "topic": ["t"] * 10})
        pq.write_table(table, folder / f"part{k}.parquet", row_group_size=4)
    (folder / "_SUCCESS").write_text("")  # ignored: not a data file
    return folder


def test_plan_input_with_file_uris(inputs: Path):
    folder = io.plan_input(uri(inputs), "prompt", "id", ["topic"])
    assert "%20" in uri(inputs)
    assert folder.total_rows == 20
    assert [(f.name, f.row_group, f.offset, f.rows) for f in folder.fragments] == [
        ("part0.parquet", 0, 0, 4), ("part0.parquet", 1, 4, 4), ("part0.parquet", 2, 8, 2),
        ("part1.parquet", 0, 0, 4), ("part1.parquet", 1, 4, 4), ("part1.parquet", 2, 8, 2),
    ]
    assert folder.schema.names == [ID, "prompt", "topic"] and folder.id_type == pa.int64()
    # The same data spelled as a local path plans identically (resume fingerprints match).
    local = io.plan_input(str(inputs), "prompt", "id", ["topic"])
    assert local.fingerprint == folder.fingerprint
    assert [f.path for f in local.fragments] == [f.path for f in folder.fragments]

    one = io.plan_input(uri(inputs / "part1.parquet"), "prompt", "id", [])
    assert one.total_rows == 10 and {f.name for f in one.fragments} == {"part1.parquet"}
    glob = io.plan_input(uri(inputs) + "/part*.parquet", "prompt", "id", [])
    assert glob.total_rows == 20

    table = io.read_fragment(folder.fs, folder.fragments[4], folder.schema, "id")
    assert table[ID].to_pylist() == [14, 15, 16, 17]
    assert table["prompt"].to_pylist()[0] == "prompt 14"


def test_plan_input_errors_with_file_uris(inputs: Path, tmp_path: Path):
    with pytest.raises(ConfigError, match="does not exist"):
        io.plan_input(uri(tmp_path / "missing.parquet"), "prompt", "id", [])
    with pytest.raises(ConfigError, match="no column 'text'"):
        io.plan_input(uri(inputs), "text", "id", [])
    with pytest.raises(ConfigError, match="no files match"):
        io.plan_input(uri(inputs) + "/*.csv", "prompt", "id", [])
    with pytest.raises(ConfigError, match="cannot open"):
        io.plan_input("nosuchscheme://bucket/x.parquet", "prompt", "id", [])


def _result(ids: list[int]) -> pa.Table:
    n = len(ids)
    return pa.table({
        ID: pa.array(ids, pa.int64()), "sample_index": pa.array([0] * n, pa.int32()),
        "generated_text": [f"text {i}" for i in ids], "prompt_tokens": pa.array([3] * n, pa.int32()),
        "completion_tokens": pa.array([5] * n, pa.int32()), "error": pa.array([None] * n, pa.string()),
    })


def test_prepare_output_and_write_shards_with_file_uris(tmp_path: Path):
    out = tmp_path / "out dir" / "job"
    fs, folder = io.prepare_output(uri(out), overwrite=False, resume=False)
    assert out.is_dir() and folder == str(out)

    meta = {io.METADATA_KEY: b'{"model": "demo"}'}
    first = io.write_shard(fs, folder, _result([0, 1, 2]), "id", meta)
    again = io.write_shard(fs, folder, _result([0, 1, 2]), "id", meta)  # a retried block
    second = io.write_shard(fs, folder, _result([3, 4]), "id", meta)
    assert first == again != second
    staged = out / io.STAGING  # commits wait there, hidden from readers, until compacted into output files
    assert sorted(p.name for p in out.iterdir()) == [io.STAGING]
    assert sorted(p.name for p in staged.iterdir()) == sorted([first, second])  # no temp files left

    shard = pq.read_table(staged / first)
    assert shard.column_names[0] == "id" and shard["id"].to_pylist() == [0, 1, 2]
    assert shard.schema.metadata[io.METADATA_KEY] == b'{"model": "demo"}'
    assert sorted(io.committed_ids(fs, folder, "id").to_pylist()) == [0, 1, 2, 3, 4]

    io.write_json(fs, folder, io.SUMMARY_FILE, {"rows": 5})
    assert io.read_json(fs, folder, io.SUMMARY_FILE) == {"rows": 5}

    # A non-empty output: refused, kept on resume, cleared on overwrite.
    with pytest.raises(ConfigError, match="not empty"):
        io.prepare_output(uri(out), overwrite=False, resume=False)
    io.prepare_output(uri(out), overwrite=False, resume=True)
    assert len(io.committed_shards(fs, folder)) == 2
    io.prepare_output(uri(out), overwrite=True, resume=False)
    assert [p.name for p in out.iterdir()] == [io.STAGING] and list(staged.iterdir()) == []  # cleared


def test_output_uri_that_is_a_file_is_refused(tmp_path: Path):
    f = tmp_path / "file.parquet"
    f.write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        io.prepare_output(uri(f), overwrite=False, resume=False)


# ---- known io.py bugs (see the issue-5 report); strict: they fail loudly once fixed ----------------
def test_glob_does_not_descend_into_subfolders(inputs: Path):
    (inputs / "old").mkdir()
    pq.write_table(pa.table({"id": [99], "prompt": ["old"]}), inputs / "old" / "part9.parquet")
    assert io.plan_input(uri(inputs) + "/*.parquet", "prompt", "id", []).total_rows == 20


def test_home_in_local_paths_is_expanded():
    assert io.filesystem("~/data.parquet")[1] == str(Path.home() / "data.parquet")
