"""End to end: upcycled tiny transformers models reproduce the dense logits, byte-identical non-MLP tensors."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, MixtralForCausalLM

import surgery
from surgery.checkpoint import open_checkpoint

CASES = [(e, k) for e in (1, 3, 4, 8) for k in (1, 2) if k <= e]
MLP_NAMES = ("mlp.", "block_sparse_moe.")


def read_all(folder) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint folder as raw bytes (uint8), read with the reference library."""
    out = {}
    for file in sorted({t.file for t in open_checkpoint(folder).tensors.values()}):
        with safe_open(folder / file, "np") as f:
            for key in f.keys():
                out[key] = f.get_tensor(key)
    return out


def logits(model, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def dense_logits(dense_models):
    return {
        name: logits(AutoModelForCausalLM.from_pretrained(folder).eval())
        for name, (folder, _) in dense_models.items()
    }


@pytest.mark.parametrize("num_experts,top_k", CASES)
@pytest.mark.parametrize("model", ["mistral-sliding-window", "llama-tied", "llama-rope-scaling"])
def test_upcycled_logits_equal_dense(dense_models, dense_logits, tmp_path, model, num_experts, top_k):
    src, rules = dense_models[model]
    out = surgery.upcycle(src, tmp_path / "moe", rules, num_experts, top_k, progress=False, max_shard_size=40_000)
    assert len(list(out.glob("model-*.safetensors"))) >= 3

    moe = MixtralForCausalLM.from_pretrained(out).eval()
    assert moe.config.num_local_experts == num_experts and moe.config.num_experts_per_tok == top_k
    diff = (logits(moe) - dense_logits[model]).abs().max().item()
    assert diff <= 1e-5, diff


@pytest.mark.parametrize("model", ["mistral-sliding-window", "llama-tied"])
def test_non_mlp_tensors_byte_identical_and_experts_are_copies(dense_models, tmp_path, model):
    src, rules = dense_models[model]
    out = surgery.upcycle(src, tmp_path / "moe", rules, 4, 2, progress=False, max_shard_size=40_000)
    dense, moe = read_all(src), read_all(out)
    for name, value in dense.items():
        if not name.startswith("model.layers.") or ".mlp." not in name:
            assert moe[name].tobytes() == value.tobytes() and moe[name].dtype == value.dtype, name
    for layer in range(2):
        for dense_name, expert_name in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")):
            source = dense[f"model.layers.{layer}.mlp.{dense_name}.weight"]
            for e in range(4):
                copy = moe[f"model.layers.{layer}.block_sparse_moe.experts.{e}.{expert_name}.weight"]
                assert copy.tobytes() == source.tobytes()
    assert not any(".mlp." in name for name in moe)
    expected = len(dense) - 6 + 2 * (4 * 3 + 1)
    assert len(moe) == expected


def test_sliding_window_and_tied_embeddings_carried_over(dense_models, tmp_path):
    out = surgery.upcycle(dense_models["mistral-sliding-window"][0], tmp_path / "a", "mistral-to-mixtral", 2, 1,
                          progress=False)
    assert json.loads((out / "config.json").read_text())["sliding_window"] == 8
    out = surgery.upcycle(dense_models["llama-tied"][0], tmp_path / "b", "llama-to-mixtral", 2, 1, progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and "lm_head.weight" not in read_all(out)
    assert "attention_bias" not in config and "mlp_bias" not in config
    out = surgery.upcycle(dense_models["llama-rope-scaling"][0], tmp_path / "c", "llama-to-mixtral", 2, 1,
                          progress=False)
    assert json.loads((out / "config.json").read_text())["rope_parameters"]["rope_type"] == "llama3"


@pytest.mark.parametrize("init", ["normal", "zeros", "uniform"])
def test_router_has_requested_init(mistral, tmp_path, init):
    out = surgery.upcycle(mistral, tmp_path / "moe", "mistral-to-mixtral", 8, 2, progress=False,
                          router_init=init, router_std=0.05, seed=7)
    tensors = read_all(out)
    routers = [tensors[f"model.layers.{i}.block_sparse_moe.gate.weight"] for i in range(2)]
    hidden = routers[0].shape[1]
    assert routers[0].shape == (8, hidden) and routers[0].dtype == np.float32
    values = np.concatenate([r.ravel() for r in routers])
    if init == "zeros":
        assert not values.any()
    elif init == "normal":
        assert abs(values.std() - 0.05) < 0.01 and abs(values.mean()) < 0.01
    else:
        bound = 1 / math.sqrt(hidden)
        assert np.abs(values).max() <= bound and np.abs(values).max() > 0.9 * bound
        assert abs(values.std() - bound / math.sqrt(3)) < 0.02
    if init != "zeros":
        assert not np.array_equal(routers[0], routers[1]), "each layer draws its own router"


def test_output_dtype_option_casts_every_float(mistral, tmp_path):
    out = surgery.upcycle(mistral, tmp_path / "moe", "mistral-to-mixtral", 2, 1, progress=False, dtype="bf16")
    reference = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in read_all(mistral).items()}
    for t in open_checkpoint(out).tensors.values():
        assert t.dtype == "BF16"
    with safe_open(out / "model.safetensors", "pt") as f:
        assert torch.equal(f.get_tensor("model.embed_tokens.weight"), reference["model.embed_tokens.weight"])
        assert torch.equal(f.get_tensor("model.layers.1.block_sparse_moe.experts.1.w2.weight"),
                           reference["model.layers.1.mlp.down_proj.weight"])
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_same_inputs_give_byte_identical_output(mistral, tmp_path):
    outs = [
        surgery.upcycle(mistral, tmp_path / f"run{i}", "mistral-to-mixtral", 4, 2, progress=False, seed=3,
                        max_shard_size=shard)
        for i, shard in enumerate((30_000, 30_000))
    ]
    files = sorted(p.name for p in outs[0].iterdir())
    assert files == sorted(p.name for p in outs[1].iterdir())
    for name in files:
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name


def test_router_values_do_not_depend_on_shard_layout(mistral, tmp_path):
    a = read_all(surgery.upcycle(mistral, tmp_path / "a", "mistral-to-mixtral", 4, 2, progress=False, seed=3))
    b = read_all(surgery.upcycle(mistral, tmp_path / "b", "mistral-to-mixtral", 4, 2, progress=False, seed=3,
                                 max_shard_size=10_000))
    c = read_all(surgery.upcycle(mistral, tmp_path / "c", "mistral-to-mixtral", 4, 2, progress=False, seed=4))
    name = "model.layers.1.block_sparse_moe.gate.weight"
    assert np.array_equal(a[name], b[name]) and not np.array_equal(a[name], c[name])


def test_output_folder_has_side_files_and_model_card(mistral, tmp_path):
    src = shutil.copytree(mistral, tmp_path / "src")
    (src / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"}}')
    (src / "tokenizer_config.json").write_text('{"bos_token": "<s>"}')
    (src / "notes.txt").write_text("not part of the model")
    out = surgery.upcycle(src, tmp_path / "moe", "mistral-to-mixtral", 4, 2, progress=False, seed=5,
                          max_shard_size=30_000)
    for name in ("generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes(), name
    assert not (out / "notes.txt").exists()
    card = (out / "README.md").read_text()
    dense_params = sum(v.size for v in read_all(mistral).values())
    moe_params = sum(v.size for v in read_all(out).values())
    assert f"{dense_params:,}" in card and f"{moe_params:,}" in card
    assert "mistral-to-mixtral" in card and '"seed": 5' in card and str(src) in card
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_parameters"] == moe_params and len(set(index["weight_map"].values())) > 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "staging folder left behind"
