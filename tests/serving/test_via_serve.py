"""One fleet for both paths: a batch job whose rows go through the serving replicas."""

import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from conftest import write_prompts
from pipeline import compact
from pipeline.batch import run_job
from pipeline.config import JobConfig
from tests.serving.conftest import APP


def test_batch_job_through_serve_replicas_exactly_once(server, client, tmp_path):
    prompts = [f"Via serve prompt {i}" for i in range(30)] + [None, "word " * 1100]
    src = write_prompts(tmp_path / "in.parquet", prompts, row_group_size=10)
    job = JobConfig(input=str(src), output=str(tmp_path / "out"), via_serve=APP, batch_size=16,
                    sampling={"max_tokens": 5, "seed": 3, "n": 2})
    summary = run_job(job)
    assert summary.status == "succeeded", summary.message
    # row groups of 10, 10, 10 and 2 rows; the first slice is the 8-row lead, run alone: 5 commits,
    # compacted into one output file
    assert compact.committed_blocks(pafs.LocalFileSystem(), str(tmp_path / "out")) == 5
    assert summary.shards == 1 and summary.phases["first_shard"] <= summary.phases["last_shard"]
    table = pq.read_table(tmp_path / "out")
    assert table.num_rows == 32 * 2 and table.group_by(["id", "sample_index"]).aggregate([]).num_rows == 64
    errors = table.filter(pc.is_valid(table["error"]))
    assert errors.num_rows == 4 and summary.error_rows == 4
    assert max(table["completion_tokens"].drop_null().to_pylist()) <= 5
    metrics = client.get("/metrics").text
    line = next(l for l in metrics.splitlines() if l.startswith("gpt2_pipeline_batch_jobs_running"))
    assert float(line.split()[-1]) == 0  # the job is done; nothing left running on the replica
