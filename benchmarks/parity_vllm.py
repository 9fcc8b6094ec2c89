"""Decoding-field parity with ``vllm serve``: the same /v1/completions bodies to vLLM's own OpenAI
server and to ours, both on the float32 ``demo`` checkpoint with the same engine arguments.

Each field alone, then common combinations; greedy or seeded, so answers are deterministic.
Prints one line per case: ``same``, or ``differs: why`` (status, text, token ids, finish
reason, logprobs). Refusals (400) compare by status only; vLLM-only fields that make no sense
for GPT-2 here are listed as expected refusals.

    PYTHONPATH=. python benchmarks/parity_vllm.py [--model demo] [--out benchmarks/results/parity.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

P = "The quick brown fox"
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6}, "ok": {"type": "boolean"}},
          "required": ["name", "ok"], "additionalProperties": False}
G = {"temperature": 0}
LONG = " ".join(["word"] * 1100) + " end"

# (case, body without model/prompt, prompt override)
CASES: list[tuple[str, dict[str, Any]]] = [
    ("greedy", {**G, "max_tokens": 16}),
    ("seed + temperature", {"seed": 3, "temperature": 0.8, "max_tokens": 16}),
    ("n + seed", {"seed": 3, "n": 3, "max_tokens": 12}),
    ("top_k", {"seed": 1, "top_k": 5, "max_tokens": 16}),
    ("top_p", {"seed": 1, "top_p": 0.5, "max_tokens": 16}),
    ("min_p", {"seed": 1, "min_p": 0.2, "max_tokens": 16}),
    ("repetition_penalty", {**G, "repetition_penalty": 1.5, "max_tokens": 24}),
    ("presence_penalty", {**G, "presence_penalty": 1.5, "max_tokens": 24}),
    ("frequency_penalty", {**G, "frequency_penalty": 1.5, "max_tokens": 24}),
    ("logit_bias", {**G, "logit_bias": {"464": 100}, "max_tokens": 4}),
    ("logit_bias eos -100", {**G, "logit_bias": {"50256": -100}, "max_tokens": 16}),
    ("bad_words", {**G, "bad_words": ["the", "of"], "max_tokens": 16}),
    ("allowed_token_ids", {"seed": 0, "allowed_token_ids": [11, 13, 464, 262], "max_tokens": 8}),
    ("stop", {**G, "stop": [" the"], "max_tokens": 32}),
    ("stop + include_stop_str_in_output", {**G, "stop": [" the"], "include_stop_str_in_output": True, "max_tokens": 32}),
    ("stop_token_ids", {**G, "stop_token_ids": [262], "max_tokens": 32}),
    ("ignore_eos + min_tokens", {**G, "ignore_eos": True, "min_tokens": 8, "max_tokens": 8}),
    ("skip_special_tokens false", {**G, "skip_special_tokens": False, "logit_bias": {"50256": 50}, "min_tokens": 2, "max_tokens": 4}),
    ("spaces_between_special_tokens false", {**G, "spaces_between_special_tokens": False, "max_tokens": 8}),
    ("logprobs", {**G, "logprobs": 3, "max_tokens": 6}),
    ("echo + logprobs", {**G, "echo": True, "logprobs": 2, "max_tokens": 4}),
    ("prompt_logprobs", {**G, "prompt_logprobs": 2, "max_tokens": 2}),
    ("return_token_ids", {**G, "return_token_ids": True, "max_tokens": 6}),
    ("priority 0", {**G, "priority": 0, "max_tokens": 6}),
    ("truncate_prompt_tokens", {**G, "truncate_prompt_tokens": 50, "max_tokens": 6, "prompt": LONG}),
    ("truncate_prompt_tokens right", {**G, "truncate_prompt_tokens": 50, "truncation_side": "right", "max_tokens": 6, "prompt": LONG}),
    ("structured_outputs.choice", {"seed": 0, "structured_outputs": {"choice": ["positive", "negative", "neutral"]}, "max_tokens": 8}),
    ("structured_outputs.regex", {"seed": 0, "structured_outputs": {"regex": "[0-9]{3}-[a-z]{2}"}, "max_tokens": 16}),
    ("structured_outputs.json", {"seed": 0, "structured_outputs": {"json": SCHEMA}, "max_tokens": 48}),
    ("structured_outputs.grammar", {"seed": 0, "structured_outputs": {"grammar": 'root ::= ("yes" | "no") "!"?'}, "max_tokens": 8}),
    ("structured_outputs.json_object", {**G, "structured_outputs": {"json_object": True}, "max_tokens": 12}),
    ("response_format json_schema", {"seed": 0, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}, "max_tokens": 48}),
    ("response_format json_object", {**G, "response_format": {"type": "json_object"}, "max_tokens": 12}),
    ("json cut by max_tokens", {**G, "structured_outputs": {"json": SCHEMA}, "max_tokens": 3}),
    ("use_beam_search n=2", {"use_beam_search": True, "n": 2, "max_tokens": 12, "temperature": 0}),
    ("use_beam_search n=4 length_penalty 0.5", {"use_beam_search": True, "n": 4, "length_penalty": 0.5, "max_tokens": 12, "temperature": 0}),
    # combinations
    ("choice + n + seed", {"seed": 5, "n": 3, "structured_outputs": {"choice": ["red", "green", "blue"]}, "max_tokens": 8}),
    ("regex + logprobs", {**G, "structured_outputs": {"regex": "[a-z]{4}"}, "logprobs": 2, "max_tokens": 8}),
    ("top_k + top_p + min_p + seed", {"seed": 9, "top_k": 20, "top_p": 0.9, "min_p": 0.05, "temperature": 0.7, "max_tokens": 16}),
    ("penalties + stop + logit_bias", {**G, "repetition_penalty": 1.2, "frequency_penalty": 0.5, "stop": ["."], "logit_bias": {"13": 5}, "max_tokens": 24}),
    ("bad_words + stop_token_ids", {**G, "bad_words": ["the"], "stop_token_ids": [11], "max_tokens": 24}),
    ("several prompts + n", {"seed": 2, "n": 2, "max_tokens": 6, "prompt": ["Hello", "In 1999 the"]}),
    # refusals (vLLM's 400s)
    ("400: beam search + stream", {"use_beam_search": True, "n": 2, "stream": True}),
    ("400: prompt_logprobs + stream", {"prompt_logprobs": 1, "stream": True}),
    ("400: bad regex", {"structured_outputs": {"regex": "(abc"}}),
    ("400: bad json schema", {"structured_outputs": {"json": {"type": "foo"}}}),
    ("400: bad grammar", {"structured_outputs": {"grammar": "root ::= nowhere"}}),
    ("400: two constraints", {"structured_outputs": {"regex": "a", "choice": ["a"]}}),
    ("400: empty choice", {"structured_outputs": {"choice": []}}),
    ("400: logit_bias out of vocab", {"logit_bias": {"60000": 1}}),
    ("400: stop_token_ids out of vocab", {"stop_token_ids": [60000]}),
    ("400: allowed_token_ids empty", {"allowed_token_ids": []}),
    ("400: truncate_prompt_tokens over context", {"truncate_prompt_tokens": 5000}),
    ("400: response_format json_schema without schema", {"response_format": {"type": "json_schema"}}),
    ("400: stream_options without stream", {"stream_options": {"include_usage": True}}),
]
# Fields of vLLM's request we refuse on purpose (meaningless for GPT-2 here), and HF's field vLLM lacks.
OURS_ONLY_400 = [
    ("prompt_embeds", {"prompt_embeds": "AAAA"}), ("kv_transfer_params", {"kv_transfer_params": {"x": 1}}),
    ("mm_payload", {"mm_payload": "none"}), ("thinking_token_budget", {"thinking_token_budget": 5}),
    ("vllm_xargs", {"vllm_xargs": {"a": 1}}), ("cache_salt", {"cache_salt": "salt"}),
]
OURS_ONLY = [("no_repeat_ngram_size", {**G, "no_repeat_ngram_size": 2, "max_tokens": 24}),
             ("best_of", {"seed": 1, "n": 1, "best_of": 3, "max_tokens": 8})]


def post(base: str, model: str, body: dict[str, Any]) -> tuple[int, Any]:
    import httpx

    full = {"model": model, "prompt": P, **body}
    r = httpx.post(base + "/v1/completions", json=full, timeout=600, trust_env=False)
    if full.get("stream") and r.status_code == 200:
        return 200, {"stream": r.text}
    try:
        return r.status_code, r.json()
    except ValueError:
        return r.status_code, {"raw": r.text[:200]}


def _close(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return (math.isinf(a) and a == b) or abs(a - b) <= 1e-3 + 1e-3 * abs(b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    return a == b


def compare(ours: tuple[int, Any], theirs: tuple[int, Any]) -> str:
    (s1, b1), (s2, b2) = ours, theirs
    if s1 != s2:
        why = (b1.get("error", {}) or {}).get("message", "") if s1 != 200 else (b2.get("error", {}) or {}).get("message", "")
        return f"differs: status ours {s1}, vLLM {s2} ({str(why)[:160]})"
    if s1 != 200:
        return "same (both 400)" if s1 == 400 else f"same (both {s1})"
    c1, c2 = b1.get("choices", []), b2.get("choices", [])
    if len(c1) != len(c2):
        return f"differs: {len(c1)} choices vs {len(c2)}"
    for i, (x, y) in enumerate(zip(c1, c2)):
        for key in ("text", "finish_reason", "stop_reason", "token_ids", "prompt_token_ids"):
            if x.get(key) != y.get(key):
                return f"differs: choice {i} {key}: ours {str(x.get(key))[:80]!r} vs vLLM {str(y.get(key))[:80]!r}"
        for key in ("logprobs", "prompt_logprobs"):
            if not _close(x.get(key), y.get(key)):
                return f"differs: choice {i} {key}: ours {str(x.get(key))[:120]} vs vLLM {str(y.get(key))[:120]}"
    u1, u2 = b1.get("usage") or {}, b2.get("usage") or {}
    for key in ("prompt_tokens", "completion_tokens"):
        if u1.get(key) != u2.get(key):
            return f"differs: usage.{key} ours {u1.get(key)} vs vLLM {u2.get(key)}"
    return "same"


def main() -> None:
    import online

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--vllm-port", type=int, default=8611)
    ap.add_argument("--our-port", type=int, default=8612)
    ap.add_argument("--vllm-url", help="use an already running vLLM server")
    ap.add_argument("--our-url", help="use an already running server of ours")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/parity_vllm.json"))
    a = ap.parse_args()
    work = Path("/tmp/parity_vllm")
    servers = []
    try:
        urls = {}
        for name, url, port in (("vllm", a.vllm_url, a.vllm_port), ("ours", a.our_url, a.our_port)):
            if url:
                urls[name] = url
                continue
            if name == "vllm":
                cmd, _ = online.vllm_command(a.model, port)
            else:
                cmd, notes = online.ours_command(a.model, port, 1)
            server = online.Server(name, cmd, f"http://127.0.0.1:{port}", work / f"{name}.log")
            online.start(server)
            servers.append(server)
            online.wait_ready(server, a.model, 900)
            urls[name] = server.base_url
        rows = []
        for case, body in CASES:
            ours, theirs = post(urls["ours"], a.model, body), post(urls["vllm"], a.model, body)
            rows.append({"case": case, "result": compare(ours, theirs), "ours_status": ours[0], "vllm_status": theirs[0]})
            print(f"{case:45s} {rows[-1]['result']}", flush=True)
        for case, body in OURS_ONLY_400:
            ours, theirs = post(urls["ours"], a.model, body), post(urls["vllm"], a.model, body)
            msg = (ours[1].get("error") or {}).get("message", "") if ours[0] != 200 else ""
            result = f"refused here on purpose ({ours[0]}: {msg[:90]}); vLLM {theirs[0]}"
            rows.append({"case": case, "result": result})
            print(f"{case:45s} {result}", flush=True)
        for case, body in OURS_ONLY:
            ours, theirs = post(urls["ours"], a.model, body), post(urls["vllm"], a.model, body)
            result = f"ours {ours[0]}; vLLM {theirs[0]} ({'ignores the unknown field' if theirs[0] == 200 else 'refuses it'})"
            rows.append({"case": case, "result": result})
            print(f"{case:45s} {result}", flush=True)
        same = sum(r["result"].startswith("same") for r in rows[:len(CASES)])
        print(f"\n{same}/{len(CASES)} cases same")
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "model": a.model, "cases": rows}, indent=1))
    finally:
        for server in servers:
            online.stop(server)


if __name__ == "__main__":
    main()
