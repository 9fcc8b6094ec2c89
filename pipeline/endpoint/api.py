"""OpenAI semantics on top of the engine: prompts → engine calls → response objects or SSE events.

Route handlers call these and only map the results to HTTP; this module knows nothing of
FastAPI or Ray Serve.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np

from pipeline.config import SamplingConfig
from pipeline.endpoint.errors import APIError, error_event
from pipeline.endpoint.metrics import Meter
from pipeline.endpoint.protocol import (
    CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse, Embedding, EmbeddingRequest,
    EmbeddingResponse, PromptLogprob, Usage,
)
from pipeline.engine import Engine, PromptError, Sample, TokenLogprob


MIN_LOGPROB = -9999.0  # what -inf (a token a constraint or ban excludes) is sent as, as vLLM does (JSON has no -inf)


@dataclass
class Prepared:
    """A validated completion request: sampling and (text, token ids) per prompt."""

    sampling: SamplingConfig
    prompts: list[tuple[str, list[int]]]


def _encode(engine: Engine, prompts: list[Union[str, list[int]]], budget: int, max_prompts: int,
            param: str, sampling: Optional[SamplingConfig] = None) -> list[tuple[str, list[int]]]:
    if not prompts:
        raise APIError(400, f"{param} must not be empty", param)
    if len(prompts) > max_prompts:
        raise APIError(400, f"at most {max_prompts} prompts per request, got {len(prompts)}", param)
    out = []
    for p in prompts:
        try:
            ids = engine.encode(p, truncate=False, sampling=sampling)
        except PromptError as exc:
            if exc.tokens is None:
                raise APIError(400, exc.message, param, exc.code) from None
            _over_context(engine, exc.tokens, budget, param)
        if len(ids) + budget > engine.context_length:
            _over_context(engine, len(ids), budget, param)
        cut = sampling is not None and sampling.truncate_prompt_tokens is not None
        out.append((p if isinstance(p, str) and not cut else engine.tokenizer.decode(ids), ids))
    return out


def _over_context(engine: Engine, tokens: int, budget: int, param: str) -> None:
    raise APIError(
        400,
        f"This model's maximum context length is {engine.context_length} tokens. However, you requested "
        f"{tokens + budget} tokens ({tokens} in the prompt, {budget} in the completion).",
        param, "context_length_exceeded",
    )


def check_model(served: str, requested: Optional[str]) -> None:
    """A request naming another model is a 404, as OpenAI answers."""
    if requested not in (None, served):
        raise APIError(404, f"model {requested!r} does not exist; this server serves {served!r}", "model",
                       "model_not_found")


def prepare(engine: Engine, req: CompletionRequest, max_prompts: int) -> Prepared:
    sampling = req.to_sampling()  # ValidationError / ValueError → 400 (errors.install)
    engine.check(sampling)  # vLLM's checks: token ids in the vocabulary, the constraint compiles
    return Prepared(sampling, _encode(engine, req.prompts(), sampling.max_tokens, max_prompts, "prompt", sampling))


def _prompt_entries(entries: list[Optional[TokenLogprob]]) -> list[Optional[dict[int, PromptLogprob]]]:
    """vLLM's ``prompt_logprobs``: per prompt position its tokens' logprob, rank and text."""
    return [None if e is None else {i: PromptLogprob(logprob=max(lp, MIN_LOGPROB), rank=rank, decoded_token=tok)
                                    for i, (lp, rank, tok) in e.ranked.items()} for e in entries]


def _extend(lp: CompletionLogprobs, entries: Any, offset: int) -> CompletionLogprobs:
    """Append tokens' logprobs, their offsets counted over the text from ``offset``."""
    for t in entries:
        lp.text_offset.append(offset)
        lp.tokens.append(t.token)
        lp.token_logprobs.append(max(t.logprob, MIN_LOGPROB))
        lp.top_logprobs.append({k: max(v, MIN_LOGPROB) for k, v in t.top.items()})
        offset += len(t.token)
    return lp


def _logprobs(sample: Sample, offset: int) -> Optional[CompletionLogprobs]:
    return None if sample.logprobs is None else _extend(CompletionLogprobs(), sample.logprobs, offset)


def _prompt_logprobs(text: str, entries: list[Optional[TokenLogprob]], tokenizer: Any, first_id: int) -> CompletionLogprobs:
    """The echoed prompt's logprobs, as OpenAI's legacy API gave them: the first token has none."""
    rest = "".join(e.token for e in entries[1:] if e is not None)
    first = text[: len(text) - len(rest)] if text.endswith(rest) else tokenizer.decode([first_id])
    lp = CompletionLogprobs(text_offset=[0], token_logprobs=[None], tokens=[first], top_logprobs=[None])
    return _extend(lp, entries[1:], len(first))


async def complete(engine: Engine, req: CompletionRequest, job: Prepared, model: str, priority: int,
                   meter: Meter) -> CompletionResponse:
    """Non-streaming completions. ``echo`` with ``logprobs`` scores the prompt too (its tokens'
    logprobs come first); ``max_tokens`` 0 with ``echo`` only scores: no generated text."""
    score_prompt = req.echo and req.logprobs is not None
    asked = req.prompt_logprobs if req.prompt_logprobs is not None else (req.logprobs if score_prompt else None)
    done = await asyncio.gather(*(
        engine.complete(ids, job.sampling, priority=priority + req.priority, prompt_logprobs=asked)
        for _, ids in job.prompts
    ))
    choices, usage = [], Usage()
    for i, ((text, ids), completion) in enumerate(zip(job.prompts, done)):
        usage.prompt_tokens += completion.prompt_tokens
        head = text if req.echo else ""
        prompt_lp = _prompt_logprobs(text, completion.prompt_logprobs, engine.tokenizer, ids[0]) if score_prompt else None
        extra = {"prompt_token_ids": ids} if req.return_token_ids else {}
        if asked is not None:  # vLLM answers them for echo with logprobs too
            extra["prompt_logprobs"] = _prompt_entries(completion.prompt_logprobs)
        for s in completion.samples:
            if req.max_tokens == 0:
                s = Sample(s.index, "", [], "length", [] if s.logprobs is not None else None)
            usage.completion_tokens += len(s.token_ids)
            lp = _logprobs(s, len(head))
            if prompt_lp is not None:
                lp = CompletionLogprobs(**{k: getattr(prompt_lp, k) + getattr(lp, k) for k in CompletionLogprobs.model_fields})
            if req.return_token_ids:
                extra["token_ids"] = s.token_ids
            choices.append(CompletionChoice(index=i * job.sampling.n + s.index, text=head + s.text,
                                            finish_reason=s.finish_reason, logprobs=lp, stop_reason=s.stop_reason,
                                            **extra))
    usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
    meter.tokens(usage.prompt_tokens, usage.completion_tokens)
    return CompletionResponse(choices=choices, model=model, usage=usage)


async def _echo_logprobs(engine: Engine, text: str, ids: list[int], k: int, priority: int) -> dict:
    """A streamed echo's prompt logprobs (the first event): the prompt scored on its own, as the
    non-streaming path scores it within the generation request."""
    scored = await engine.complete(ids, SamplingConfig(max_tokens=1, temperature=0), priority=priority,
                                   prompt_logprobs=k)
    return _prompt_logprobs(text, scored.prompt_logprobs, engine.tokenizer, ids[0]).model_dump()


def _sse(data: Any) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def stream(engine: Engine, req: CompletionRequest, job: Prepared, model: str, priority: int,
                 meter: Meter) -> AsyncIterator[str]:
    """SSE events, one per delta per choice, then usage (if asked) and ``[DONE]``.

    If the client goes away, the generator is closed: the engine streams are cancelled or closed,
    which aborts their requests inside vLLM and frees the slots.
    """
    n = job.sampling.n
    queue: asyncio.Queue = asyncio.Queue()
    template = CompletionResponse(choices=[], model=model)
    usage = Usage(prompt_tokens=sum(len(ids) for _, ids in job.prompts))
    offsets: dict[int, int] = {}

    def event(choices: list[dict]) -> str:  # plain dicts in OpenAI's field order: this is the hot path
        return _sse({"id": template.id, "choices": choices, "created": template.created, "model": model,
                     "object": "text_completion"})

    def choice(index: int, s: Sample) -> dict:
        lp = _logprobs(s, offsets.get(index, 0))
        offsets[index] = offsets.get(index, 0) + len(s.text)
        out = {"finish_reason": s.finish_reason, "index": index, "logprobs": lp.model_dump() if lp else None,
               "text": s.text, "stop_reason": s.stop_reason}
        if req.return_token_ids:
            out["token_ids"] = s.token_ids
        return out

    async def tagged(i: int, ids: list[int]) -> AsyncIterator[tuple[int, Any]]:
        """(i, delta) as tokens arrive, then (i, None); a failure ends it as (i, exception)."""
        try:
            async with aclosing(engine.generate(ids, job.sampling, stream=True, priority=priority + req.priority)) as chunks:
                async for chunk in chunks:
                    yield i, chunk
            yield i, None
        except Exception as exc:  # surfaced to the client as an error event
            yield i, exc

    async def pump(i: int, ids: list[int]) -> None:
        async for item in tagged(i, ids):
            await queue.put(item)

    async def merged() -> AsyncIterator[list[tuple[int, Any]]]:
        """Batches of ``tagged`` items in arrival order."""
        if len(job.prompts) == 1:  # the common case: no task or queue hop per token
            async with aclosing(tagged(0, job.prompts[0][1])) as items:
                async for item in items:
                    yield [item]
            return
        while True:  # several prompts: everything ready goes in one write (fewer, larger chunks)
            ready = [await queue.get()]
            while not queue.empty():
                ready.append(queue.get_nowait())
            yield ready

    generating = req.max_tokens > 0  # 0 (with echo): the prompt only, then finish_reason "length"
    several = len(job.prompts) > 1 and generating
    tasks = [asyncio.create_task(pump(i, ids)) for i, (_, ids) in enumerate(job.prompts)] if several else []
    batches = merged()
    try:
        if req.echo:
            lps = [None] * len(job.prompts) if req.logprobs is None else await asyncio.gather(
                *(_echo_logprobs(engine, text, ids, req.logprobs, priority) for text, ids in job.prompts))
            for i, ((text, _), lp) in enumerate(zip(job.prompts, lps)):
                for k in range(n):
                    offsets[i * n + k] = len(text)
                    yield event([{"finish_reason": None, "index": i * n + k, "logprobs": lp, "text": text}])
        if not generating:
            empty = None if req.logprobs is None else CompletionLogprobs().model_dump()
            yield event([{"finish_reason": "length", "index": j, "logprobs": empty, "text": ""}
                         for j in range(len(job.prompts) * n)])
        remaining, failed = len(job.prompts) if generating else 0, False
        while remaining and not failed:
            ready = await batches.__anext__()
            events = []
            for i, chunk in ready:
                if chunk is None:
                    remaining -= 1
                elif isinstance(chunk, BaseException):
                    events.append(_sse(error_event(chunk)))
                    failed = True
                    break
                else:
                    meter.first_token()
                    usage.completion_tokens += sum(len(s.token_ids) for s in chunk)
                    events.append(event([choice(i * n + s.index, s) for s in chunk]))
            if events:
                yield "".join(events)
        if not failed:
            usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
            if req.stream_options and req.stream_options.include_usage:
                yield _sse(template.model_copy(update={"usage": usage}).model_dump())
        meter.tokens(usage.prompt_tokens, usage.completion_tokens)
        yield _sse("[DONE]")
    finally:
        for t in tasks:
            t.cancel()
        await batches.aclose()  # one prompt: closing the engine stream aborts it inside vLLM


async def embed(engine: Engine, req: EmbeddingRequest, model: str, max_prompts: int, priority: int,
                meter: Meter) -> EmbeddingResponse:
    if req.dimensions not in (None, engine.hidden_size):
        raise APIError(400, f"dimensions must be {engine.hidden_size} for this model", "dimensions")
    prompts = _encode(engine, req.inputs(), 0, max_prompts, "input")
    vectors = await asyncio.gather(*(engine.embed(ids, normalize=req.normalize, priority=priority) for _, ids in prompts))
    data = []
    for i, vec in enumerate(vectors):
        value: Union[list[float], str] = vec
        if req.encoding_format == "base64":
            value = base64.b64encode(np.asarray(vec, dtype=np.float32).tobytes()).decode()
        data.append(Embedding(embedding=value, index=i))
    tokens = sum(len(ids) for _, ids in prompts)
    meter.tokens(tokens, 0)
    return EmbeddingResponse(data=data, model=model, usage=Usage(prompt_tokens=tokens, total_tokens=tokens))
