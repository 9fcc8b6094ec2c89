"""``Engine``: one engine replica, shared by the batch job's executors and Serve replicas.

It turns prompts into token ids (with the context check), runs generation, scoring or pooling
with a bounded number of requests in flight, and returns plain dataclasses
(``pipeline.outputs``), so the batch job and the HTTP API never see vLLM types. vLLM drives the
model through ``AsyncLLM`` (engine core in its own process), or for jobs on a CPU through
``InprocLLM`` (``inproc.py``: the engine core in this process); both take the same requests.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from typing import Any, Optional, Union

from pipeline.config import EngineConfig, SamplingConfig, Task
from pipeline.engine.args import (
    REPLICA_OMP_SPIN, cap_onednn_cache, collector_paused, engine_args, freeze_start_up_heap, heap_step_buffers,
    model_in_engine_core, one_cpu_worker, short_omp_waits,
)
from pipeline.engine.decoding import beam_search, best_of, check_job_sampling, check_sampling, sampling_params
from pipeline.engine.precision import resolve_dtype
from pipeline.engine.prompts import PromptEncoder
from pipeline.outputs import (
    PRIORITY_ONLINE, Completion, EngineFatalError, PromptError, Sample, Scored, TokenLogprob, score_windows,
)

logger = logging.getLogger(__name__)
# Held by the process's in-process engine: vLLM keeps the model's forward context and parallel
# groups per process, so two engine cores stepping (or one shutting down) in one process collide.
_IN_PROCESS = threading.Lock()


class Engine:
    """One engine replica. Build it once per actor; call from one event loop.

    ``Engine(config)`` loads the model synchronously; ``generate``/``complete``/``embed`` are
    coroutines. ``colocated``: another engine of this replica shares its GPUs (memory split).
    A semaphore bounds requests in flight (``config.max_in_flight``).

    ``in_process``: on a CPU with one worker, run vLLM's engine core in this process (no second
    process to start: 8-10 s less start-up here). For jobs; the serving path leaves it off, so
    HTTP work and the engine's steps do not share one GIL. One engine per process at most: a
    second one (the pooling engine of a mixed Batch file) gets ``AsyncLLM``. Ignored on GPUs,
    whose engine core overlaps scheduling with the GPU's work in a process of its own.

    ``precision``: the dtype it runs in and why (``precision.resolve_dtype``; ``score`` engines
    may differ from ``generate`` ones under ``dtype: auto``).
    """

    def __init__(self, config: EngineConfig, task: Task = Task.generate, priority_scheduling: bool = False,
                 colocated: bool = False, in_process: bool = False):
        with collector_paused():  # imports and the model: see collector_paused
            os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
            self.config = config
            self.task = Task(task)
            self.precision = resolve_dtype(config, self.task)
            args = engine_args(config, self.task, priority_scheduling, colocated, precision=self.precision)
            self.in_process = in_process and one_cpu_worker(args) and _IN_PROCESS.acquire(blocking=False)
            if self.in_process:
                from pipeline.engine.cpu_ops import use_fused_gelu, use_prefaulted_kv_cache

                use_fused_gelu()  # before the model is built: its layers pick their forward then
                use_prefaulted_kv_cache()
            freeze_start_up_heap()
            try:
                with model_in_engine_core(args):
                    if self.in_process:
                        from pipeline.engine.inproc import InprocLLM

                        self._llm = InprocLLM(args)
                    else:
                        from vllm.v1.engine.async_llm import AsyncLLM

                        short_omp_waits(spin=REPLICA_OMP_SPIN)
                        heap_step_buffers()
                        cap_onednn_cache()
                        self._llm = AsyncLLM.from_engine_args(args)
            except BaseException:
                if self.in_process:
                    _IN_PROCESS.release()
                raise
            finally:
                from pipeline.engine.cpu_ops import drop_prefaulted

                drop_prefaulted()  # zeroed for an engine that did not take it (not in-process, or a GPU)
        self.tokenizer = self._llm.get_tokenizer()
        self.context_length: int = self._llm.model_config.max_model_len
        self.vocab_size: int = self._llm.model_config.get_vocab_size()
        self.hidden_size: int = self._llm.model_config.get_hidden_size()
        self.prompts = PromptEncoder(self.tokenizer, self.context_length, self.vocab_size, config.truncate)
        self._slots: Optional[asyncio.Semaphore] = None
        self.in_flight = 0

    # ---- prompts -------------------------------------------------------------------------
    def encode(self, prompt: Any, max_tokens: int = 1, truncate: Optional[bool] = None,
               check_length: bool = True, sampling: Optional[SamplingConfig] = None) -> list[int]:
        """Token ids for a prompt, checked against the context (``PromptEncoder.encode``)."""
        return self.prompts.encode(prompt, max_tokens, truncate, check_length, sampling)

    def encode_many(self, prompts: Sequence[Any], max_tokens: int = 1, truncate: Optional[bool] = None,
                    sampling: Optional[SamplingConfig] = None) -> list[Union[list[int], PromptError]]:
        """``encode`` for a block of prompts, a ``PromptError`` in place of each one that fails."""
        return self.prompts.encode_many(prompts, max_tokens, truncate, sampling)

    def check(self, sampling: SamplingConfig) -> None:
        """Raise ``ValueError`` (vLLM's message) for values this engine would refuse: token ids
        outside the vocabulary, a schema / regex / grammar that does not compile."""
        check_sampling(sampling, self.tokenizer, self.vocab_size)

    def _semaphore(self) -> asyncio.Semaphore:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.config.max_in_flight)
        return self._slots

    # ---- generation ----------------------------------------------------------------------
    async def generate(
        self,
        prompt_ids: list[int],
        sampling: SamplingConfig,
        *,
        stream: bool = False,
        request_id: Optional[str] = None,
        priority: int = PRIORITY_ONLINE,
    ) -> AsyncIterator[list[Sample]]:
        """Yield samples: once at the end, or (``stream=True``) deltas as tokens arrive.

        Cancelling the consumer aborts the request inside vLLM, freeing its KV-cache slot.
        """
        from vllm.sampling_params import RequestOutputKind

        if stream and sampling.use_beam_search:
            raise ValueError("Streaming is not currently supported with beam search")
        if stream and (sampling.best_of or 1) > sampling.n:
            raise ValueError("best_of greater than n cannot be streamed (the best samples are known at the end)")
        kind = RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY
        params = sampling_params(sampling, output_kind=kind)
        async with aclosing(self._outputs(prompt_ids, params, request_id, priority)) as outputs:
            async for out in outputs:
                yield [self._sample(o, sampling.logprobs) for o in out.outputs]

    async def _outputs(self, prompt_ids: list[int], params: Any, request_id: Optional[str], priority: int
                       ) -> AsyncIterator[Any]:
        """vLLM's RequestOutputs for one request, inside the in-flight bound."""
        from vllm.exceptions import VLLMClientError
        from vllm.inputs import TokensPrompt
        from vllm.v1.engine.exceptions import EngineDeadError

        rid = request_id or uuid.uuid4().hex
        async with self._semaphore():
            self.in_flight += 1
            try:
                # aclosing: a consumer that stops early aborts the request inside vLLM at once
                async with aclosing(self._llm.generate(
                    TokensPrompt(prompt_token_ids=prompt_ids), params, rid, priority=priority
                )) as outputs:
                    async for out in outputs:
                        yield out
            except (EngineDeadError, VLLMClientError) as exc:
                raise _engine_error(exc) from None
            finally:
                self.in_flight -= 1

    async def complete(
        self, prompt_ids: list[int], sampling: SamplingConfig, *, priority: int = PRIORITY_ONLINE,
        prompt_logprobs: Optional[int] = None,
    ) -> Completion:
        """Run one prompt to the end: ``sampling.n`` samples, ordered by index.

        ``prompt_logprobs=k``: also each prompt token's log-probability and the top k (echo).
        """
        from vllm.sampling_params import RequestOutputKind

        if sampling.use_beam_search:
            return await self._beam_search(prompt_ids, sampling, priority)
        params = sampling_params(sampling, prompt_logprobs=prompt_logprobs, output_kind=RequestOutputKind.FINAL_ONLY)
        outputs: dict[int, Any] = {}  # vLLM's samples by index, the latest of each
        prompt_lps = None
        async for out in self._outputs(prompt_ids, params, None, priority):
            outputs.update((o.index, o) for o in out.outputs)
            if prompt_logprobs is not None and out.prompt_logprobs is not None:
                prompt_lps = [None] + [self._token_logprob(t, e, prompt_logprobs)
                                       for t, e in zip(prompt_ids[1:], out.prompt_logprobs[1:])]
        return self._completion(len(prompt_ids), list(outputs.values()), sampling, prompt_lps)

    async def complete_many(self, prompts: Sequence[list[int]], sampling: SamplingConfig, *,
                            priority: int = PRIORITY_ONLINE) -> list[Union[Completion, BaseException]]:
        """``complete`` for a block of prompts with one sampling, in order, each failed request's
        error in its place (``EngineFatalError`` too: the caller raises it).

        An in-process engine takes the whole block as one message to its thread and answers once,
        when every prompt is done: no stream, queue or task per prompt (a job's one-token rows
        spend more time in that than in the model). These requests are outside the
        ``max_in_flight`` semaphore: the caller bounds its blocks (a job's blocks in flight).
        Otherwise, and for beam search, one ``complete`` per prompt.
        """
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        many = getattr(self._llm, "generate_many", None)
        if many is None or sampling.use_beam_search:
            return await asyncio.gather(*(self.complete(ids, sampling, priority=priority) for ids in prompts),
                                        return_exceptions=True)
        params = sampling_params(sampling, output_kind=RequestOutputKind.FINAL_ONLY)
        prefix = uuid.uuid4().hex
        self.in_flight += len(prompts)
        try:
            outs = await many([TokensPrompt(prompt_token_ids=ids) for ids in prompts], params,
                              [f"{prefix}-{i}" for i in range(len(prompts))], priority=priority)
        finally:
            self.in_flight -= len(prompts)
        return [_engine_error(out) if isinstance(out, BaseException) else self._completion(len(ids), out.outputs, sampling)
                for ids, out in zip(prompts, outs)]

    def _completion(self, prompt_tokens: int, outputs: Sequence[Any], sampling: SamplingConfig,
                    prompt_logprobs: Optional[list[Optional[TokenLogprob]]] = None) -> Completion:
        """A finished request's samples, ordered by index (the best ``n`` of ``best_of``)."""
        if (sampling.best_of or 1) > sampling.n:
            outputs = best_of(list(outputs), sampling.n)
        samples = sorted((self._sample(o, sampling.logprobs) for o in outputs), key=lambda s: s.index)
        return Completion(prompt_tokens, samples, prompt_logprobs)

    async def _beam_search(self, prompt_ids: list[int], sampling: SamplingConfig, priority: int) -> Completion:
        """vLLM's beam search (width ``sampling.n``): the n best beams, best first."""
        from vllm.v1.engine.exceptions import EngineDeadError

        async with self._semaphore():
            self.in_flight += 1
            try:
                out = await beam_search(self._llm, self.tokenizer, prompt_ids, sampling, uuid.uuid4().hex, priority)
            except EngineDeadError as exc:
                raise EngineFatalError(f"vLLM engine died: {exc}") from exc
            finally:
                self.in_flight -= 1
        if any(o.finish_reason == "error" for o in out.outputs):
            raise RuntimeError("beam search failed inside the engine")
        return Completion(len(prompt_ids), [self._sample(o, None) for o in out.outputs], None)

    # ---- scoring (log-likelihood of a given text) ----------------------------------------
    async def score(
        self, text_ids: list[int], *, stride: Optional[int] = None, score_first_token: bool = False,
        priority: int = PRIORITY_ONLINE,
    ) -> Scored:
        """Log-probability of each token of a text given the ones before it, as HF's
        ``model(ids, labels=ids)`` computes it: every token after the first is scored (with
        ``score_first_token``, <|endoftext|> goes first so every token is). A text longer than the
        context is scored with HF's sliding window (windows of context-1 tokens, the room vLLM
        leaves for one sampled token, every ``stride`` tokens; default half the context).
        """
        from pipeline.models import EOS_TOKEN_ID

        seq = [EOS_TOKEN_ID, *text_ids] if score_first_token else list(text_ids)
        if len(seq) < 2:
            raise PromptError("too_short", f"the text has {len(text_ids)} token; the first token is never scored "
                              "(use score_first_token to score it after <|endoftext|>)", tokens=len(text_ids))
        windows = score_windows(len(seq), self.context_length - 1, stride or self.context_length // 2)
        parts = await asyncio.gather(*(self._prompt_logprobs(seq[b:e], priority) for b, e, _ in windows))
        logprobs: list[float] = []
        for (begin, _, trg_len), part in zip(windows, parts):
            logprobs.extend(part if begin == 0 else part[-trg_len:])
        return Scored(len(text_ids), logprobs)

    async def _prompt_logprobs(self, ids: list[int], priority: int) -> list[float]:
        """log p(ids[i] | ids[:i]) for i >= 1, from vLLM's prompt logprobs (one sampled token
        is the least vLLM runs; prefix caching is bypassed for prompt-logprob requests)."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0, detokenize=False,
                                output_kind=RequestOutputKind.FINAL_ONLY)
        final = None
        async for out in self._outputs(ids, params, None, priority):
            final = out
        return [entry[tok].logprob for tok, entry in zip(ids[1:], final.prompt_logprobs[1:])]

    @staticmethod
    def _token_logprob(tok: int, entry: Any, k: int) -> TokenLogprob:
        """One position's chosen token and its top-k alternatives (token text -> logprob)."""
        chosen = entry.get(tok)
        # vLLM's (and OpenAI's) top: the position's first k + 1 entries (the chosen token, then the top k)
        top = {(lp.decoded_token or ""): lp.logprob for _, lp in zip(range(k + 1), entry.values())}
        ranked = {i: (lp.logprob, lp.rank, lp.decoded_token or "") for i, lp in entry.items()}
        if chosen is None:
            return TokenLogprob("", float("-inf"), top, ranked)
        return TokenLogprob(chosen.decoded_token or "", chosen.logprob, top, ranked)

    def _sample(self, out: Any, logprobs: Optional[int]) -> Sample:
        lps = None
        if logprobs is not None and out.logprobs is not None:
            lps = [self._token_logprob(tok, entry, logprobs) for tok, entry in zip(out.token_ids, out.logprobs)]
        return Sample(out.index, out.text, list(out.token_ids), out.finish_reason, lps, out.stop_reason)

    # ---- feature extraction --------------------------------------------------------------
    async def embed(self, prompt_ids: list[int], *, normalize: bool = True, priority: int = PRIORITY_ONLINE) -> list[float]:
        """One vector per text: the mean of GPT-2's final hidden states, L2-normalized by default."""
        from vllm import PoolingParams
        from vllm.inputs import TokensPrompt
        from vllm.v1.engine.exceptions import EngineDeadError

        if self.task != Task.embed:
            raise RuntimeError("this engine was started for generation; start one with task=embed")
        params = PoolingParams(task="embed", use_activation=normalize)
        final = None
        async with self._semaphore():
            self.in_flight += 1
            try:
                async for out in self._llm.encode(
                    TokensPrompt(prompt_token_ids=prompt_ids), params, uuid.uuid4().hex, priority=priority
                ):
                    final = out
            except EngineDeadError as exc:
                raise EngineFatalError(f"vLLM engine died: {exc}") from exc
            finally:
                self.in_flight -= 1
        return final.outputs.data.float().tolist()

    # ---- lifecycle -----------------------------------------------------------------------
    async def check_health(self) -> None:
        from vllm.v1.engine.exceptions import EngineDeadError

        try:
            await self._llm.check_health()
        except EngineDeadError as exc:
            raise EngineFatalError(str(exc)) from exc

    @property
    def queued(self) -> int:
        return self._llm.get_num_unfinished_requests()

    def shutdown(self, timeout: Optional[float] = None, free: bool = True) -> None:
        """Stop the engine (``timeout``: seconds an engine-core process gets to exit before it is
        killed, vLLM's default 5; an in-process engine stops after its current step, and keeps
        its memory with ``free=False``: for a process about to leave without its teardown)."""
        llm, self._llm = self._llm, None  # freed now: vLLM's __del__ at interpreter exit is noisy
        if llm is not None:
            try:
                if self.in_process:
                    llm.shutdown(timeout=timeout, free=free)
                else:
                    llm.shutdown(timeout=timeout)
            finally:
                if self.in_process:
                    _IN_PROCESS.release()


def complete_once(config: EngineConfig, prompt: Any, sampling: SamplingConfig) -> Completion:
    """One completion in-process (no Ray): for ``gpt2-pipeline generate`` and quick checks."""

    from pipeline.models import resolve_model

    check_job_sampling(sampling, resolve_model(config.model, config.revision, config.offline))  # before the engine

    async def main() -> Completion:
        engine = Engine(config, in_process=True)
        try:
            ids = engine.encode(prompt, sampling.max_tokens, sampling=sampling)
            return await engine.complete(ids, sampling)
        finally:
            engine.shutdown()

    return asyncio.run(main())


def _engine_error(exc: BaseException) -> BaseException:
    """vLLM's errors as ours: a dead engine is fatal (``EngineFatalError``), a request whose values
    vLLM refuses is a ``ValueError`` (a 400, an error row); anything else as it is."""
    from vllm.exceptions import VLLMClientError
    from vllm.v1.engine.exceptions import EngineDeadError

    if isinstance(exc, EngineDeadError):
        return EngineFatalError(f"vLLM engine died: {exc}")
    if isinstance(exc, VLLMClientError):
        return ValueError(str(exc))
    return exc
