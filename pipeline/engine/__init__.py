"""The engine package: the only place that imports vLLM.

Read it as ``precision.py`` (the dtype an engine runs in, and why) → ``args.py`` (our config →
vLLM's engine arguments; ``int8.py`` for ``quantization: int8``) → ``replica.py`` (``Engine``:
one replica's prompts, sampling, scoring and pooling) → ``inproc.py`` (vLLM's engine core in this process, for jobs on a CPU). The result types live in ``pipeline.outputs`` and are re-exported here.
"""

from pipeline.engine.args import collector_paused, engine_args, platform_info
from pipeline.engine.precision import Precision, auto_dtypes, choose_dtype, cpu_flags, resolve_dtype
from pipeline.engine.replica import Engine, complete_once
from pipeline.outputs import (
    PRIORITY_BATCH, PRIORITY_ONLINE, Completion, EngineFatalError, PromptError, Sample, Scored, TokenLogprob,
    score_windows,
)

__all__ = ["Engine", "collector_paused", "complete_once", "engine_args", "platform_info", "Precision", "auto_dtypes", "choose_dtype", "cpu_flags",
           "resolve_dtype", "PRIORITY_BATCH", "PRIORITY_ONLINE",
           "Completion", "EngineFatalError", "PromptError", "Sample", "Scored", "TokenLogprob", "score_windows"]
