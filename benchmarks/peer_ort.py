"""ONNX Runtime peers for ``offline.py``: ``ort_float32`` and ``ort_int8``.

optimum's ``ORTModelForCausalLM`` (the runtime GPT-2's model card points to) on the same
checkpoint folder as every other system: exported to ONNX in float32 (one ``model.onnx`` with
the KV cache as inputs and outputs), and for ``ort_int8`` quantized from that export with
``ORTQuantizer`` and ``AutoQuantizationConfig.avx512_vnni(is_static=False)`` (dynamic int8: int8
weights, activations quantized per call). Both are made once per run folder (``ort-*`` in the work
dir, kept for later rounds) and counted in the first run's start-up (``export_s`` says how long).
Generation: ``generate`` on left-padded batches in input order (``--ort-batch-size``, 64), greedy
at ``--temperature 0`` (else plain temperature sampling as the HF peer does), EOS ignored
(``min_new_tokens = max_new_tokens = --max-tokens``), ONNX Runtime on every logical CPU.

optimum-onnx pins an older transformers than the project's, so it lives in a venv of its own and
this file runs there as a script: it imports neither vLLM nor the project. The driver resolves
the model folder and hands it over with the prompts file::

    python -m venv /work/venvs/ort
    /work/venvs/ort/bin/pip install "transformers<4.58" "optimum~=2.1.0" optimum-onnx onnxruntime \\
        pyarrow torch    # torch: a CPU wheel (e.g. torch==2.13.0+cpu where one is on hand)
    python benchmarks/offline.py --model gpt2-small-random --rows 256 --max-tokens 64 --temperature 0 \\
        --systems ours,ort_float32,ort_int8 --ort-python /work/venvs/ort/bin/python

The worker writes one JSON result as the other workers do (``status`` ok/error, ``rows_out``,
``completion_tokens``, ``prompt_tokens``, ``startup_s``/``ready_s``, ``generation_s``, ...).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Optional

SYSTEMS = ("ort_float32", "ort_int8")
LABELS = {"ort_float32": "ONNX Runtime float32 (optimum)", "ort_int8": "ONNX Runtime int8 dynamic (optimum)"}
SHORT = {"ort_float32": "ORT float32", "ort_int8": "ORT int8"}
FILES = {"ort_float32": "model.onnx", "ort_int8": "model_quantized.onnx"}


# ================================================================================================
# Driver side (project environment)
# ================================================================================================
def command(a: argparse.Namespace, system: str, prompts: Path, result: Path, work: Path) -> list[str]:
    """The worker's command line: this file under ``--ort-python``, the model folder resolved here."""
    from pipeline.models import resolve_model

    return [a.ort_python or sys.executable, str(Path(__file__).resolve()), "--system", system,
            "--model-dir", str(resolve_model(a.model)), "--prompts", str(prompts), "--result", str(result),
            "--work", str(work), "--max-tokens", str(a.max_tokens), "--temperature", str(a.temperature),
            "--top-p", str(a.top_p), "--top-k", str(a.top_k), "--batch-size", str(a.ort_batch_size)]


# ================================================================================================
# Worker side (the ORT venv)
# ================================================================================================
def _cached(work: Path, model_dir: Path, kind: str) -> Path:
    key = hashlib.sha1(str(model_dir.resolve()).encode()).hexdigest()[:8]
    return work / f"ort-{model_dir.name}-{key}-{kind}"


def _build(target: Path, make: Any) -> None:
    """Write into a temporary folder and rename it, so a run stopped midway leaves no half export."""
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    make(tmp)
    tmp.rename(target)


def export(model_dir: Path, work: Path, system: str) -> tuple[Path, float]:
    """The ONNX folder for ``system`` (float32 export, or int8 quantized from it) and the seconds spent
    making it here (0 when cached)."""
    t0 = time.monotonic()
    f32 = _cached(work, model_dir, "float32")
    if not (f32 / FILES["ort_float32"]).is_file():
        from optimum.onnxruntime import ORTModelForCausalLM

        _build(f32, lambda d: ORTModelForCausalLM.from_pretrained(str(model_dir), export=True).save_pretrained(str(d)))
    if system == "ort_float32":
        return f32, time.monotonic() - t0
    q8 = _cached(work, model_dir, "int8")
    if not (q8 / FILES["ort_int8"]).is_file():
        from optimum.onnxruntime import ORTQuantizer
        from optimum.onnxruntime.configuration import AutoQuantizationConfig

        config = AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=False)

        def quantize(d: Path) -> None:
            ORTQuantizer.from_pretrained(str(f32), file_name=FILES["ort_float32"]).quantize(
                save_dir=str(d), quantization_config=config)
            shutil.copy2(f32 / "generation_config.json", d / "generation_config.json")

        _build(q8, quantize)
    return q8, time.monotonic() - t0


def read_prompts(path: str) -> list[str]:
    import pyarrow.parquet as pq

    return [str(p) for p in pq.read_table(path, columns=["prompt"]).column("prompt").to_pylist()]


def run(a: argparse.Namespace) -> dict[str, Any]:
    t_start = time.monotonic()
    try:
        import onnxruntime
        import optimum.version
        import torch
        import transformers
        from optimum.onnxruntime import ORTModelForCausalLM
        from transformers import AutoTokenizer
    except ImportError as exc:
        raise ImportError(f"{exc}: run the ORT peers with --ort-python pointing at a venv with optimum-onnx "
                          "and onnxruntime (see benchmarks/peer_ort.py)") from exc
    t_imported = time.monotonic()
    model_dir = Path(a.model_dir)
    folder, export_s = export(model_dir, Path(a.work), a.system)
    prompts = read_prompts(a.prompts)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    tok.padding_side = "left"
    tok.pad_token = tok.eos_token
    threads = os.cpu_count() or 1
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    model = ORTModelForCausalLM.from_pretrained(str(folder), file_name=FILES[a.system], session_options=options,
                                                provider="CPUExecutionProvider")
    torch.manual_seed(0)
    t_ready = time.monotonic()
    gen: dict[str, Any] = dict(max_new_tokens=a.max_tokens, min_new_tokens=a.max_tokens,  # min = max: like ignore_eos
                               pad_token_id=tok.eos_token_id)
    if a.temperature > 0:
        gen.update(do_sample=True, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p)
    else:
        gen.update(do_sample=False)
    completion = prompt_tokens = 0
    for i in range(0, len(prompts), a.batch_size):
        enc = tok(prompts[i:i + a.batch_size], return_tensors="pt", padding=True)
        out = model.generate(**enc, **gen)
        completion += (out.shape[1] - enc["input_ids"].shape[1]) * out.shape[0]
        prompt_tokens += int(enc["attention_mask"].sum())
    t_done = time.monotonic()
    onnx_file = folder / FILES[a.system]
    return {
        "rows_out": len(prompts), "completion_tokens": int(completion), "prompt_tokens": prompt_tokens,
        "import_s": t_imported - t_start, "export_s": export_s, "startup_s": t_ready - t_start,
        "ready_s": t_ready - t_start, "generation_s": t_done - t_ready, "batch_size": a.batch_size,
        "ort_threads": threads, "onnx_file": onnx_file.name, "onnx_mib": round(onnx_file.stat().st_size / 2**20, 1),
        "quantization": "dynamic int8, avx512_vnni config, per-tensor" if a.system == "ort_int8" else None,
        "onnxruntime": onnxruntime.__version__, "optimum": optimum.version.__version__,
        "transformers": transformers.__version__, "torch": torch.__version__,
    }


def parse(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="One ONNX Runtime peer run (started by offline.py).")
    p.add_argument("--system", choices=SYSTEMS, required=True)
    p.add_argument("--model-dir", required=True, help="The resolved checkpoint folder (config, weights, tokenizer).")
    p.add_argument("--prompts", required=True, help="Parquet file with a 'prompt' column.")
    p.add_argument("--result", required=True, help="Where the JSON result goes.")
    p.add_argument("--work", required=True, help="Run folder: the ONNX exports are cached here.")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    return p.parse_args(argv)


def main() -> None:
    a = parse()
    result: dict[str, Any]
    try:
        result = {"status": "ok", **run(a)}
    except BaseException as exc:  # recorded, never raised: the driver reports it
        result = {"status": "error", "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-4000:]}
    Path(a.result).write_text(json.dumps(result, default=str))
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
