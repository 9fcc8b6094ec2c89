"""The engine on real vLLM: prompt checks, greedy parity with HF transformers, seeded sampling,
embeddings, and cancellation."""

import asyncio
import os
import threading

import pytest

from pipeline.config import SamplingConfig
from pipeline.engine import PromptError

PROMPTS = [
    "My name is Arthur and I live in",
    "Hello, I'm a language model,",
    "The history of the city begins",
    "In a shocking finding, scientists discovered a herd of unicorns",
]


def test_encode_rejects_bad_prompts(engine):
    for prompt, code in [(None, "null_prompt"), ("", "empty_prompt"), (42, "invalid_prompt"), ([], "empty_prompt"),
                         ([10**6], "invalid_prompt")]:
        with pytest.raises(PromptError) as err:
            engine.encode(prompt)
        assert err.value.code == code
    long = "hello " * 2000
    with pytest.raises(PromptError, match="context is 1024"):
        engine.encode(long, 16)
    ids = engine.encode(long, 16, truncate=True)
    assert len(ids) == 1024 - 16  # left-truncated to leave room for max_tokens


def test_greedy_matches_hf_generate(engine, loop, demo_model):
    import torch
    from transformers import AutoTokenizer, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(demo_model)
    hf = GPT2LMHeadModel.from_pretrained(demo_model, torch_dtype=torch.float32).eval()
    greedy = SamplingConfig(max_tokens=16, temperature=0, ignore_eos=True)
    for prompt in PROMPTS:
        ids = tok.encode(prompt)
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), max_new_tokens=16, min_new_tokens=16, do_sample=False,
                              pad_token_id=50256)[0, len(ids):].tolist()
        ours = loop.run(engine.complete(engine.encode(prompt), greedy)).samples[0]
        assert ours.token_ids == ref, prompt
        assert ours.text == tok.decode(ref)


def test_same_seed_same_samples_many_prompts(engine, loop):
    sampling = SamplingConfig(max_tokens=12, temperature=1.0, top_k=50, seed=1234)

    async def batch(s):
        return await asyncio.gather(*(engine.complete(engine.encode(p + f" {i}"), s) for i, p in enumerate(PROMPTS * 8)))

    first = [c.samples[0].token_ids for c in loop.run(batch(sampling))]
    second = [c.samples[0].token_ids for c in loop.run(batch(sampling))]
    other = [c.samples[0].token_ids for c in loop.run(batch(sampling.with_overrides({"seed": 99})))]
    assert first == second
    assert first != other


def test_n_samples_stop_and_min_tokens(engine, loop):
    ids = engine.encode(PROMPTS[0])
    done = loop.run(engine.complete(ids, SamplingConfig(max_tokens=8, n=3, seed=5)))
    assert [s.index for s in done.samples] == [0, 1, 2]
    assert len({tuple(s.token_ids) for s in done.samples}) > 1
    greedy = loop.run(engine.complete(ids, SamplingConfig(max_tokens=16, temperature=0))).samples[0]
    stop_word = greedy.text.split()[2]
    stopped = loop.run(engine.complete(ids, SamplingConfig(max_tokens=16, temperature=0, stop=[stop_word]))).samples[0]
    assert stopped.finish_reason == "stop" and stop_word not in stopped.text
    at_least = loop.run(engine.complete(ids, SamplingConfig(max_tokens=10, min_tokens=10, temperature=0)))
    assert len(at_least.samples[0].token_ids) == 10


def test_cancel_frees_the_slot(engine, loop):
    ids = engine.encode(PROMPTS[1])

    async def start_and_cancel():
        gen = engine.generate(ids, SamplingConfig(max_tokens=900, ignore_eos=True), stream=True)
        await gen.__anext__()
        await gen.aclose()  # what a disconnecting client does
        for _ in range(50):
            if engine.queued == 0:
                return True
            await asyncio.sleep(0.1)
        return False

    assert loop.run(start_and_cancel())
    assert engine.in_flight == 0


def test_a_block_of_prompts_encodes_and_completes_as_one_by_one(engine, loop):
    """``encode_many`` / ``complete_many`` (a job's block: one tokenizer call, one message to the
    engine thread) give what ``encode`` / ``complete`` give per prompt, errors in place."""
    texts = [*PROMPTS, None, "", "caf\u00e9 \U0001f600 \n\t  x", "lone \ud800", 7, [464, 2068], "hello " * 2000,
             " leading space", "a" * 50]
    many = engine.encode_many(texts, 16)
    for prompt, got in zip(texts, many):
        try:
            want = engine.encode(prompt, 16)
        except PromptError as exc:
            assert isinstance(got, PromptError) and got.code == exc.code, prompt
        else:
            assert got == want, prompt
    truncated = engine.encode_many(["hello " * 2000], 16, truncate=True)[0]
    assert truncated == engine.encode("hello " * 2000, 16, truncate=True)
    ok = [ids for ids in many if not isinstance(ids, PromptError)]
    for sampling in (SamplingConfig(max_tokens=6, temperature=0, ignore_eos=True),
                     SamplingConfig(max_tokens=6, n=2, best_of=3, seed=11, ignore_eos=True)):
        block = loop.run(engine.complete_many(ok, sampling))
        singles = [loop.run(engine.complete(ids, sampling)) for ids in ok]
        assert [[s.token_ids for s in c.samples] for c in block] == [[s.token_ids for s in c.samples] for c in singles]
        assert [c.prompt_tokens for c in block] == [len(ids) for ids in ok]
    bad = loop.run(engine.complete_many([ok[0], [10**6]], SamplingConfig(max_tokens=16)))
    assert len(bad[0].samples[0].token_ids) >= 1 and isinstance(bad[1], ValueError)  # out of the vocabulary: vLLM says no
    assert engine.in_flight == 0 and engine.queued == 0


def test_cancelling_a_block_aborts_its_requests(engine, loop):
    ids = [engine.encode(p) for p in PROMPTS]

    async def start_and_cancel():
        task = asyncio.ensure_future(engine.complete_many(ids, SamplingConfig(max_tokens=900, ignore_eos=True)))
        while engine.queued < len(ids):
            await asyncio.sleep(0.01)
        task.cancel()
        for _ in range(100):
            if engine.queued == 0:
                return task.cancelled()
            await asyncio.sleep(0.1)
        return False

    assert loop.run(start_and_cancel())
    assert engine.in_flight == 0


def test_job_engine_runs_vllm_in_this_process(engine, loop):
    """A job's CPU engine runs vLLM's engine core, model included, in this process: no engine-core
    or worker child to start (or to orphan when the process is killed), and the switch that
    allows it (V1 multiprocessing off while the config is built) does not leak."""
    import os

    import psutil

    from conftest import process_titles

    from pipeline.inline import _warm

    assert engine.in_process and any(t.name == "vllm-engine-core" for t in threading.enumerate())
    titles = process_titles(psutil.Process().children())
    apart = [e for e in _warm.values() if not e.in_process]  # e.g. a pooling engine of an earlier test
    assert len([t for t in titles if "EngineCore" in t]) == len(apart), titles
    assert not any("VLLM::Worker" in t for t in titles), titles
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in os.environ
    done = loop.run(engine.complete(engine.encode(PROMPTS[0]), SamplingConfig(max_tokens=4, temperature=0)))
    assert len(done.samples[0].token_ids) == 4 and engine.queued == 0


def test_in_process_engine_keeps_the_garbage_collector_out_of_the_way(engine):
    """While the in-process engine runs, young collections come every ``GC_YOUNG`` allocations
    (not Python's 700) and what the process held at the engine's start is frozen."""
    import gc

    from pipeline.engine.inproc import GC_YOUNG

    assert engine.in_process and gc.get_threshold()[0] >= GC_YOUNG


def test_in_process_engine_asks_for_one_malloc_arena(monkeypatch):
    """The in-process engine caps glibc at one malloc arena (its thread allocates what the
    caller's thread frees: with an arena per thread, memory grows with a job's rows), unless the
    user chose an arena count."""
    import platform

    from pipeline.engine.inproc import one_malloc_arena

    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    assert one_malloc_arena() is (platform.libc_ver()[0] == "glibc")
    monkeypatch.setenv("MALLOC_ARENA_MAX", "8")
    assert one_malloc_arena() is False


def test_in_process_engine_keeps_a_steps_large_buffers_in_the_heap(engine, monkeypatch):
    """Once the in-process engine is built, a large allocation (a step's logits: 51 MB at 256
    sequences of GPT-2) comes from glibc's heap instead of a fresh mapping the kernel faults in
    page by page; a user's own malloc settings are kept."""
    import ctypes
    import platform

    from pipeline.engine.inproc import keep_step_buffers

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc's malloc only")

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                     "fordblks", "keepcost")]

    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = MallInfo2
    assert engine.in_process
    mapped = libc.mallinfo2().hblks
    block = bytearray(64 * 2**20)  # malloc'd by Python, above glibc's largest mmap threshold
    assert libc.mallinfo2().hblks == mapped and len(block) == 64 * 2**20
    del block
    monkeypatch.setenv("MALLOC_MMAP_MAX_", "65536")
    assert keep_step_buffers() is False


def test_in_process_engine_shares_vllms_thread_safe_tokenizer(engine, loop):
    """The caller's thread encodes with vLLM's tokenizer pool (each call borrows a copy of its
    own) while the engine thread detokenizes: no second deep copy at start-up, and a tokenizer
    that is not such a pool gets a copy of its own."""
    from vllm.tokenizers.hf import ThreadSafeHFTokenizerMixin

    from pipeline.engine.inproc import own_tokenizer

    tokenizer = engine._llm.get_tokenizer()
    assert isinstance(tokenizer, ThreadSafeHFTokenizerMixin) and own_tokenizer(tokenizer) is tokenizer
    plain = {"vocab": [1, 2]}
    assert own_tokenizer(plain) == plain and own_tokenizer(plain) is not plain

    async def encode_while_generating():
        busy = asyncio.ensure_future(engine.complete(engine.encode(PROMPTS[0]), SamplingConfig(max_tokens=32)))
        ids = [engine.encode(p) for p in PROMPTS * 20]
        return ids, await busy

    ids, done = loop.run(encode_while_generating())
    assert ids[:len(PROMPTS)] == ids[-len(PROMPTS):] and len(done.samples[0].token_ids) == 32


def test_in_process_engine_caps_onednn_primitive_cache(engine, monkeypatch):
    """vLLM's CPU kernels keep a oneDNN primitive per batch size; the in-process engine caps
    oneDNN's cache (set before its first primitive) unless the user chose a capacity."""
    from pipeline.engine.args import ONEDNN_CACHE, ONEDNN_CACHE_ENV, cap_onednn_cache

    assert engine.in_process and os.environ.get(ONEDNN_CACHE_ENV) == str(ONEDNN_CACHE)
    monkeypatch.setenv(ONEDNN_CACHE_ENV, "7")
    assert cap_onednn_cache() is False and os.environ[ONEDNN_CACHE_ENV] == "7"
    monkeypatch.delenv(ONEDNN_CACHE_ENV)
    assert cap_onednn_cache() is True and os.environ[ONEDNN_CACHE_ENV] == str(ONEDNN_CACHE)


def test_in_process_engine_releases_free_memory_as_requests_finish(engine, loop):
    """Every ``trim_every`` finished requests the engine thread hands the free pages inside
    glibc's heaps back to the OS (``malloc_trim``): freed memory of a long job's earlier rows
    does not stay resident. Counted before the request's output goes out."""
    import platform

    from pipeline.engine.inproc import TRIM_EVERY, InprocLLM, release_free_memory

    glibc = platform.libc_ver()[0] == "glibc"
    assert release_free_memory() is glibc
    llm = engine._llm
    assert isinstance(llm, InprocLLM) and llm.trim_every == TRIM_EVERY
    sampling = SamplingConfig(max_tokens=2, temperature=0)
    llm.trim_every = 2
    try:
        loop.run(engine.complete(engine.encode(PROMPTS[0]), sampling))  # the count earlier tests left: now 0 or 1
        before = llm.trims
        for prompt in PROMPTS:  # one at a time: 4 finished requests, 2 releases
            loop.run(engine.complete(engine.encode(prompt), sampling))
        assert llm.trims - before == (2 if glibc else 0)
    finally:
        llm.trim_every = TRIM_EVERY


def test_second_engine_of_a_process_runs_its_core_apart(engine, loop):
    """vLLM's model state is per process: while a job's engine runs in-process, a second engine
    (a mixed Batch file's pooling engine) gets an engine-core process, and both answer at once."""
    from pipeline.config import EngineConfig, Task
    from pipeline.inline import warm_engine

    async def embedder():
        return warm_engine(EngineConfig(model="demo"), Task.embed)

    embed = loop.run(embedder())
    assert engine.in_process and not embed.in_process

    async def both():
        return await asyncio.gather(engine.complete(engine.encode(PROMPTS[1]), SamplingConfig(max_tokens=4)),
                                    embed.embed(embed.encode(PROMPTS[1])))

    done, vec = loop.run(both())
    assert len(done.samples[0].token_ids) == 4 and len(vec) == embed.hidden_size


DEAD_ENGINE = """
import asyncio
import pytest
from pipeline.config import EngineConfig, SamplingConfig
from pipeline.engine import Engine, EngineFatalError

async def main():
    engine = Engine(EngineConfig(model="demo"), in_process=True)
    assert engine.in_process
    ids = engine.encode("The history of the city begins")
    first = asyncio.ensure_future(engine.complete(ids, SamplingConfig(max_tokens=900, ignore_eos=True)))
    while engine.queued == 0:
        await asyncio.sleep(0.01)

    def broken_step():
        raise RuntimeError("injected failure")

    engine._llm._engine.step = broken_step  # the next step raises, as a crashing model would
    with pytest.raises(EngineFatalError, match="injected failure"):
        await first
    with pytest.raises(EngineFatalError):
        await engine.complete(ids, SamplingConfig(max_tokens=4))
    with pytest.raises(EngineFatalError):
        await engine.check_health()
    engine.shutdown()
    print("DEAD-ENGINE-OK")

if __name__ == "__main__":
    asyncio.run(main())
"""


def test_dead_in_process_engine_fails_every_request_and_health(tmp_path):
    """A step that raises kills the in-process engine: the request waiting and new ones get
    EngineFatalError and the health check fails (what a job and a batch actor act on). In a
    process of its own: the session's engine holds this process's in-process slot."""
    import subprocess
    import sys

    script = tmp_path / "dead_engine.py"
    script.write_text(DEAD_ENGINE)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert "DEAD-ENGINE-OK" in done.stdout, done.stderr[-3000:]


LEFT_RUNNING = """
import asyncio, gc, os
from pipeline.config import EngineConfig, SamplingConfig
from pipeline.engine import cpu_ops
from pipeline.inline import warm_engine

taken = []
take = cpu_ops.take_prefaulted

def record(nbytes):
    buffer = take(nbytes)
    taken.append(None if buffer is None else buffer.data_ptr())
    return buffer

cpu_ops.take_prefaulted = record

async def main():
    engine = warm_engine(EngineConfig(model="demo"), "generate")  # a job's engine: its KV cache zeroed early
    runner = engine._llm._engine.model_executor.driver_worker.worker.model_runner
    kv = {t.untyped_storage().data_ptr() for t in runner.kv_caches}
    print("KV", taken[0] is not None and kv == {taken[0]}, flush=True)
    done = await engine.complete(engine.encode("The history of the city begins"), SamplingConfig(max_tokens=4))
    finalizer = engine._llm._engine.engine_core._finalizer  # holds no reference to the engine
    engine.shutdown(free=False)
    del engine
    gc.collect()
    print("LEFT", len(done.samples[0].token_ids), finalizer.alive, finalizer.atexit, flush=True)
    os._exit(0)

if __name__ == "__main__":
    asyncio.run(main())
"""


def test_job_engine_takes_its_kv_cache_zeroed_early_and_skips_vllms_shutdown(tmp_path):
    """A job's engine (``inline.warm_engine``) gets its KV cache zeroed on another thread while
    vLLM imports: the cache vLLM allocates is that buffer. ``shutdown(free=False)`` (a CLI job's
    end, just before the process leaves) stops the engine thread and keeps vLLM's engine
    referenced, its finalizer kept from running at exit: either way it would run vLLM's whole
    shutdown (1.5 s on ``gpt2-small-random``), which the process leaving makes moot."""
    import subprocess
    import sys

    script = tmp_path / "left_running.py"
    script.write_text(LEFT_RUNNING)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert "KV True" in done.stdout and "LEFT 4 True False" in done.stdout, done.stdout[-1000:] + done.stderr[-3000:]


def test_scoring_shares_the_warm_generation_engine(engine, loop):
    from pipeline.config import EngineConfig, Task
    from pipeline.inline import warm_engine

    async def get(task: Task):
        return warm_engine(EngineConfig(model="demo"), task)

    assert loop.run(get(Task.score)) is loop.run(get(Task.generate))


def test_engine_core_process_gets_short_omp_waits_unless_set(monkeypatch):
    from pipeline.engine.args import OMP_SPIN_KEY, OMP_WAIT_KEY, REPLICA_OMP_SPIN, short_omp_waits

    monkeypatch.delenv(OMP_SPIN_KEY, raising=False)
    monkeypatch.setenv(OMP_WAIT_KEY, "ACTIVE")
    assert short_omp_waits() is False and os.environ[OMP_WAIT_KEY] == "ACTIVE"  # the user's value is kept
    monkeypatch.delenv(OMP_WAIT_KEY)
    assert short_omp_waits() is True and os.environ[OMP_WAIT_KEY] == "PASSIVE"
    # a Ray Data engine actor says whether it runs on CPU (it must not import vLLM before torch)
    monkeypatch.delenv(OMP_WAIT_KEY)
    assert short_omp_waits(cpu=False) is False and OMP_WAIT_KEY not in os.environ  # GPU actors untouched
    assert short_omp_waits(cpu=True) is True and os.environ[OMP_WAIT_KEY] == "PASSIVE"
    # a replica's engine core: a short spin, then sleep; a user's spin count is kept
    monkeypatch.delenv(OMP_WAIT_KEY)
    assert short_omp_waits(spin=REPLICA_OMP_SPIN) is True and os.environ[OMP_SPIN_KEY] == str(REPLICA_OMP_SPIN)
    assert OMP_WAIT_KEY not in os.environ
    monkeypatch.setenv(OMP_SPIN_KEY, "7")
    assert short_omp_waits(spin=REPLICA_OMP_SPIN) is False and os.environ[OMP_SPIN_KEY] == "7"


HEAP_CHECK = """
import ctypes
class M(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = M
libc.malloc.restype = ctypes.c_void_p
mapped = []
for size in (51 * 2**20, 51 * 2**20, 512 * 2**20):  # a step's logits twice, then a KV cache
    before = libc.mallinfo2().hblks
    block = libc.malloc(size)
    mapped.append(libc.mallinfo2().hblks - before)
    libc.free(ctypes.c_void_p(block))
print("MAPPED", mapped)
"""


def test_engine_core_process_keeps_step_buffers_in_the_heap_unless_set(monkeypatch, tmp_path):
    """A replica's engine-core process starts with glibc told to serve a step's 51 MB logits from
    its heap and keep them there (the KV cache is still mapped), unless the user tuned glibc."""
    import platform
    import subprocess
    import sys

    from pipeline.engine.args import CORE_MMAP_THRESHOLD, HEAP_KEEP_FREE, MALLOC_ENV, heap_step_buffers

    for key in MALLOC_ENV:  # set, then unset: the test's end restores each as it was
        monkeypatch.setenv(key, "0")
        monkeypatch.delenv(key)
    monkeypatch.setenv("MALLOC_MMAP_MAX_", "65536")
    assert heap_step_buffers() is False and "MALLOC_MMAP_THRESHOLD_" not in os.environ  # the user's choice
    monkeypatch.delenv("MALLOC_MMAP_MAX_")
    assert heap_step_buffers() is True
    assert os.environ["MALLOC_MMAP_THRESHOLD_"] == str(CORE_MMAP_THRESHOLD)
    assert os.environ["MALLOC_TRIM_THRESHOLD_"] == str(HEAP_KEEP_FREE)
    if platform.libc_ver()[0] != "glibc":
        return
    script = tmp_path / "heap_check.py"
    script.write_text(HEAP_CHECK)
    child = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert "MAPPED [0, 0, 1]" in child.stdout, child.stdout + child.stderr  # glibc took the values
    for key in MALLOC_ENV:
        os.environ.pop(key, None)
    child = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert "MAPPED [1, 1, 1]" in child.stdout, child.stdout + child.stderr  # glibc's own choices
