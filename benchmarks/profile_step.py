"""Where a decode step's time goes: raw vLLM in one process with our engine's settings, timed and
profiled with torch's profiler (operators by self time).

    python benchmarks/profile_step.py --model gpt2-small-random --rows 256 --max-tokens 64
    python benchmarks/profile_step.py --model gpt2-small-random --ours   # with our in-process engine's
                                                                          # CPU choices (GELU, step buffers)

Each round generates the same prompts (``pipeline.prompts.make_prompts``, as ``offline.py``; greedy, EOS ignored) after a small warm-up; ``--profile``
then runs one more round under ``torch.profiler`` and prints its top operators. ``--ours`` applies
what our in-process engine adds to vLLM on a CPU: ATen's fused tanh GELU for half precision
(``engine/cpu_ops.py``) and, once the engine is built, a step's large buffers kept in glibc's heap
(``engine/inproc.keep_step_buffers``). Prints one line per round and writes nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt2-small-random")
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--ours", action="store_true", help="Our in-process engine's CPU choices (see above).")
    p.add_argument("--quantization", default="none", choices=["none", "int8"], help="Our engine's quantization.")
    p.add_argument("--kv-cache-dtype", default=None, help="vLLM's kv_cache_dtype (fp8_e5m2, fp8_e4m3).")
    p.add_argument("--profile", action="store_true", help="One more round under torch.profiler.")
    p.add_argument("--top", type=int, default=15, help="Operators printed by --profile.")
    p.add_argument("--shapes", action="store_true", help="--profile: group operators by input shapes.")
    a = p.parse_args()

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the model in this process, as our jobs run it
    from offline_workers import engine_kwargs
    from vllm import LLM, SamplingParams

    if a.ours:
        from pipeline.engine.cpu_ops import use_fused_gelu

        use_fused_gelu()
    kwargs = engine_kwargs(a.model, quantization=a.quantization)
    if a.kv_cache_dtype:
        kwargs["kv_cache_dtype"] = a.kv_cache_dtype
    llm = LLM(**kwargs)
    if a.ours:
        from pipeline.engine.inproc import keep_step_buffers

        keep_step_buffers()
    from pipeline.prompts import make_prompts

    prompts = make_prompts(a.rows)  # the prompt set offline.py measures (log-normal lengths)
    params = SamplingParams(max_tokens=a.max_tokens, temperature=0, ignore_eos=True)
    llm.generate(prompts[:8], SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)  # warm-up
    for r in range(1, a.rounds + 1):
        t0 = time.monotonic()
        outs = llm.generate(prompts, params, use_tqdm=False)
        took = time.monotonic() - t0
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        print(f"round {r}: {tokens} tokens in {took:.2f} s, {tokens / took:,.0f} tok/s", flush=True)
    if a.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], record_shapes=a.shapes) as prof:
            llm.generate(prompts, params, use_tqdm=False)
        print(prof.key_averages(group_by_input_shape=a.shapes).table(
            sort_by="self_cpu_time_total", row_limit=a.top, max_name_column_width=36, max_shapes_column_width=60))
    sys.stdout.flush()
    os._exit(0)  # skip vLLM's teardown


if __name__ == "__main__":
    main()
