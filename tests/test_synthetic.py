"""The synthetic checkpoints of benchmarks/: real shapes and parameter counts, holes, readable by transformers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import surgery
from benchmarks.synthetic import tensor_shapes, write_synthetic

HIDDEN, INTERMEDIATE, LAYERS = 4096, 14336, 32


def test_full_mistral_7b_counts_and_upcycle_plan(tmp_path):
    path = write_synthetic(tmp_path / "mistral", layers=32, holes=True)

    assert surgery.open_checkpoint(path).num_parameters == 7_241_732_096
    plan = surgery.plan(path, "mistral-to-mixtral", 4, 2)
    assert plan.num_parameters == 24_153_690_112
    # top-2 of 4 experts: dense params + one more copy of every MLP (3 matrices) + the 4-expert routers
    assert plan.active_parameters == 7_241_732_096 + LAYERS * 3 * HIDDEN * INTERMEDIATE + LAYERS * 4 * HIDDEN

    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert index["metadata"] == {"total_size": 2 * 7_241_732_096, "total_parameters": 7_241_732_096}
    shards = sorted(path.glob("*.safetensors"))
    assert [p.name for p in shards] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    apparent = sum(p.stat().st_size for p in shards)
    assert apparent > 2 * 7_241_732_096
    assert sum(p.stat().st_blocks * 512 for p in shards) < 1 << 20  # holes: < 1 MiB really on disk


def test_config_and_side_files(tmp_path):
    path = write_synthetic(tmp_path / "llama", layers=2, arch="llama-3-8b", holes=True)
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert (config["vocab_size"], config["rope_theta"], config["num_hidden_layers"]) == (128256, 500000.0, 2)
    assert config["dtype"] == "bfloat16" and config["tie_word_embeddings"] is False
    assert json.loads((path / "tokenizer_config.json").read_text())["bos_token"] == "<|begin_of_text|>"
    # Llama-3-8B with its 32 layers has 8,030,261,248 parameters
    full = tensor_shapes({**config, "num_hidden_layers": 32})
    assert sum(math.prod(shape) for _, shape in full) == 8_030_261_248


def test_random_data_is_bf16_in_range_and_shards_split(tmp_path):
    small = dict(hidden_size=256, intermediate_size=1024, vocab_size=1000, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=64)
    path = write_synthetic(tmp_path / "small", layers=3, shard_size=1 << 20, seed=1, overrides=small)
    source = surgery.open_checkpoint(path)  # validates every header against the file size
    assert len({t.file for t in source.tensors.values()}) > 2
    assert all(p.stat().st_blocks * 512 >= p.stat().st_size - 4096 for p in path.glob("*.safetensors"))
    info = source.tensors["model.layers.0.input_layernorm.weight"]
    with open(path / info.file, "rb") as f:
        f.seek(info.offset)
        words = np.frombuffer(f.read(info.nbytes), dtype="<u2")
    values = (words.astype(np.uint32) << 16).view(np.float32)
    assert np.all(np.isfinite(values)) and np.all((2**-7 <= abs(values)) & (abs(values) < 2**-5))
    assert 0.4 < np.mean(values > 0) < 0.6


def test_names_and_shapes_match_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    for arch in ("mistral-7b", "llama-3-8b"):
        path = write_synthetic(tmp_path / arch, layers=2, arch=arch, holes=True)
        config = transformers.AutoConfig.from_pretrained(path)
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(config)
        expected = {name: tuple(p.shape) for name, p in model.state_dict().items()}
        found = {name: t.shape for name, t in surgery.open_checkpoint(path).tensors.items()}
        assert found == expected
