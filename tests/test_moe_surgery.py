"""Surgery on MoE and depth: MoE -> dense round trips, one expert kept, experts selected, depth up-scaling, and the
FusionBench depth-upscaling front end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file

import surgery
from surgery.producers import Copy

from .test_cli import assert_one_line_error, run
from .test_exactness import logits
from .tiny_models import save_tiny

QWEN = dict(intermediate_size=96, num_hidden_layers=4)


def tensors(folder: Path) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint as numpy (bf16 as its int16 bit patterns), read with the reference library."""
    out = {}
    for shard in Path(folder).glob("*.safetensors"):
        for name, t in load_file(shard).items():
            out[name] = (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()
    return out


def same_bytes(a: dict, b: dict) -> bool:
    return sorted(a) == sorted(b) and all(a[k].tobytes() == b[k].tobytes() and a[k].dtype == b[k].dtype for k in a)


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dense")
    return {
        "mistral": save_tiny("mistral", root / "mistral", shards=3, dtype="bfloat16"),
        "qwen3": save_tiny("qwen3", root / "qwen3", shards=2, **QWEN),
        "qwen2": save_tiny("qwen2", root / "qwen2", shards=2, **QWEN),
        "llama": save_tiny("llama", root / "llama", shards=2, num_hidden_layers=4),
    }


# ----------------------------------------------------------------------------------------------- MoE -> dense


@pytest.mark.parametrize("kind,up,down,params", [
    ("mistral", "mistral-to-mixtral", "mixtral-to-mistral", {}),
    ("qwen3", "qwen3-to-qwen3-moe", "qwen3-moe-to-qwen3", {}),
    ("qwen3", "qwen3-to-qwen3-moe", "qwen3-moe-to-qwen3", {"moe_layers": "1:4:2"}),
    ("qwen2", "qwen2-to-qwen2-moe", "qwen2-moe-to-qwen2", {}),
])
def test_upcycle_then_mean_gives_back_the_source(dense, tmp_path, kind, up, down, params):
    """Identical experts averaged in float64 and rounded once are the original bytes, in bf16 too."""
    src = dense[kind]
    moe = surgery.upcycle(src, tmp_path / "moe", up, 4, 2, progress=False, max_shard_size=30_000, **params)
    back = surgery.upcycle(moe, tmp_path / "back", down, progress=False)
    assert same_bytes(tensors(src), tensors(back))
    assert json.loads((back / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    assert "tags: [moe, upcycled, surgery]" in (moe / "README.md").read_text()
    assert "tags: [surgery]" in (back / "README.md").read_text()  # the result is dense again


def test_fused_and_per_expert_sources_give_the_same_dense_model(tmp_path):
    """transformers 5 can save Mixtral's experts fused ([E, 2I, H] gate rows first); both layouts are read."""
    config = transformers.MixtralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=64, num_local_experts=4)
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(config)
    model.save_pretrained(tmp_path / "fused", save_original_format=False)  # transformers 4 ignores the flag
    if "model.layers.0.mlp.experts.gate_up_proj" not in tensors(tmp_path / "fused"):
        assert int(transformers.__version__.split(".")[0]) < 5, "transformers 5 saves the fused layout"
        pytest.skip("this transformers cannot save the fused layout")
    model.save_pretrained(tmp_path / "per-expert")
    for mode in ({"mode": "mean"}, {"mode": "expert", "expert": 3}):
        a = surgery.upcycle(tmp_path / "fused", tmp_path / f"a-{mode['mode']}", "mixtral-to-mistral", progress=False, **mode)
        b = surgery.upcycle(tmp_path / "per-expert", tmp_path / f"b-{mode['mode']}", "mixtral-to-mistral", progress=False,
                            **mode)
        assert same_bytes(tensors(a), tensors(b))


def test_one_expert_kept_is_a_byte_copy_that_loads(dense, tmp_path):
    moe_src = save_tiny("mixtral", tmp_path / "mixtral", shards=2, num_local_experts=4)
    plan = surgery.plan(moe_src, "mixtral-to-mistral", mode="expert", expert=2)
    assert all(isinstance(p.tensor.producer, Copy) for p in plan.tensors)
    out = surgery.upcycle(moe_src, tmp_path / "out", "mixtral-to-mistral", mode="expert", expert=2, progress=False)
    got, moe = tensors(out), tensors(moe_src)
    for name, w in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")):
        assert got[f"model.layers.1.mlp.{name}.weight"].tobytes() == \
            moe[f"model.layers.1.block_sparse_moe.experts.2.{w}.weight"].tobytes()
    assert isinstance(transformers.AutoModelForCausalLM.from_pretrained(out), transformers.MistralForCausalLM)


# ----------------------------------------------------------------------------------------------- select experts


def test_kept_experts_and_router_rows_in_the_listed_order(tmp_path):
    moe_src = save_tiny("mixtral", tmp_path / "mixtral", shards=2, num_local_experts=4)
    out = surgery.upcycle(moe_src, tmp_path / "out", "mixtral-select-experts", keep=[3, 0, 2], progress=False)
    got, moe = tensors(out), tensors(moe_src)
    for new, old in enumerate([3, 0, 2]):
        assert got[f"model.layers.0.block_sparse_moe.experts.{new}.w2.weight"].tobytes() == \
            moe[f"model.layers.0.block_sparse_moe.experts.{old}.w2.weight"].tobytes()
    router = moe["model.layers.1.block_sparse_moe.gate.weight"]
    assert got["model.layers.1.block_sparse_moe.gate.weight"].tobytes() == router[[3, 0, 2]].tobytes()
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_local_experts == 3 and model.config.num_experts_per_tok == 2


def test_identical_experts_less_one_still_compute_the_dense_model(dense, tmp_path):
    src = save_tiny("mistral", tmp_path / "dense", shards=2)
    moe = surgery.upcycle(src, tmp_path / "moe", "mistral-to-mixtral", 4, 2, progress=False)
    out = surgery.upcycle(moe, tmp_path / "out", "mixtral-select-experts", drop=[1], progress=False)
    assert (logits(out) - logits(src)).abs().max().item() <= 1e-5


def test_qwen2_moe_selection_keeps_the_shared_expert(dense, tmp_path):
    moe = surgery.upcycle(dense["qwen2"], tmp_path / "moe", "qwen2-to-qwen2-moe", 4, 2, progress=False)
    out = surgery.upcycle(moe, tmp_path / "out", "qwen2-moe-select-experts", keep=[1, 2], progress=False)
    got, before = tensors(out), tensors(moe)
    assert got["model.layers.0.mlp.shared_expert.down_proj.weight"].tobytes() == \
        before["model.layers.0.mlp.shared_expert.down_proj.weight"].tobytes()
    assert (logits(out) - logits(dense["qwen2"])).abs().max().item() <= 1e-5  # identical copies: still exact


# ----------------------------------------------------------------------------------------------- depth


def test_depth_upscaling(dense, tmp_path):
    src = dense["llama"]
    out = surgery.upcycle(src, tmp_path / "out", "depth-upscale", layers="0:3,1:4", progress=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 6 and len(model.model.layers) == 6
    got, source = tensors(out), tensors(src)
    per_layer = sorted(k.split(".", 3)[3] for k in source if k.startswith("model.layers.0."))
    for new, old in enumerate([0, 1, 2, 1, 2, 3]):
        for rest in per_layer:
            assert got[f"model.layers.{new}.{rest}"].tobytes() == source[f"model.layers.{old}.{rest}"].tobytes()
    assert sum(k.startswith("model.layers.") for k in got) == 6 * len(per_layer)


def test_repeated_layers_can_be_scaled(dense, tmp_path):
    src = dense["llama"]
    out = surgery.upcycle(src, tmp_path / "out", "depth-upscale", layers="0:2,1:2", scale_repeated=0.5, progress=False)
    got, source = tensors(out), tensors(src)
    o_proj = "self_attn.o_proj.weight"
    assert got[f"model.layers.1.{o_proj}"].tobytes() == source[f"model.layers.1.{o_proj}"].tobytes()  # first use
    assert np.array_equal(got[f"model.layers.2.{o_proj}"], source[f"model.layers.1.{o_proj}"] * 0.5)  # the repeat
    assert got["model.layers.2.self_attn.q_proj.weight"].tobytes() == source["model.layers.1.self_attn.q_proj.weight"].tobytes()


def test_per_layer_config_lists_follow_the_layers(dense, tmp_path):
    """Qwen2's layer_types are re-indexed with the layers; a partial Qwen2-MoE lists its dense layers."""
    src = dense["qwen2"]
    config = json.loads((src / "config.json").read_text())
    plan = surgery.plan(src, "depth-upscale", layers="3,0:2")
    assert plan.config["num_hidden_layers"] == 3
    assert plan.config["layer_types"] == [config["layer_types"][i] for i in (3, 0, 1)]
    moe = surgery.upcycle(src, tmp_path / "moe", "qwen2-to-qwen2-moe", 4, 2, moe_layers="1:", progress=False)
    assert json.loads((moe / "config.json").read_text())["mlp_only_layers"] == [0]


def test_the_fusion_bench_depth_upscaling_config_gives_the_same_bytes(dense, tmp_path):
    src = dense["llama"]
    direct = surgery.upcycle(src, tmp_path / "direct", "depth-upscale", layers="0:3,1:4", progress=False)
    result = run("fusion-bench", "method=depth_upscaling", "modelpool=depth_upscaling",
                 f"modelpool.models.0.path={src}", 'method.layer_indices=["range(0, 3)", 1, "range(2,4)"]',
                 f"method.model_save_path={tmp_path / 'fb'}", "taskpool=dummy")
    assert result.exit_code == 0, result.output
    assert same_bytes(tensors(direct), tensors(tmp_path / "fb"))
    again = run("fusion-bench", "method=depth_upscaling", "modelpool=depth_upscaling", f"modelpool.models.0.path={src}",
                "method.layer_indices=[0]", f"method.model_save_path={tmp_path / 'fb'}")
    assert_one_line_error(again, "method.model_save_path", "is not an empty folder")


# ----------------------------------------------------------------------------------------------- bad input


def test_depth_upscaling_refuses_sliding_layers_counted_from_max_window_layers(dense, tmp_path):
    """Without layer_types, transformers derives the sliding layers from max_window_layers and the depth: they would
    not follow the layers moved."""
    src = tmp_path / "qwen2"
    shutil.copytree(dense["qwen2"], src)
    config = json.loads((src / "config.json").read_text())
    config.pop("layer_types", None)
    (src / "config.json").write_text(json.dumps({**config, "use_sliding_window": True, "max_window_layers": 2}))
    assert_one_line_error(run("apply", src, tmp_path / "out", "-r", "depth-upscale", "-p", "layers=0:4,2:4", "-q"),
                          "max_window_layers (2)", "lists no layer_types")
    with_types = {**config, "use_sliding_window": True, "max_window_layers": 2,
                  "layer_types": ["full_attention"] * 2 + ["sliding_attention"] * 2}
    (src / "config.json").write_text(json.dumps(with_types))
    planned = surgery.plan(src, "depth-upscale", layers="0:4,2:4").config["layer_types"]
    assert planned == ["full_attention"] * 2 + ["sliding_attention"] * 4


@pytest.mark.parametrize("rules,args,message", [
    ("mixtral-to-mistral", ["-p", "mode=expert", "-p", "expert=4"], "expert must be from 0 to num_local_experts - 1 (3)"),
    ("mixtral-select-experts", ["-p", "drop=0,1,2,3"], "dropping every expert leaves none"),
    ("mixtral-select-experts", ["-p", "keep=1,1"], "listed twice"),
    ("mixtral-select-experts", ["-p", "keep=2"], "fewer than experts_per_token (2)"),
    ("mixtral-select-experts", ["-p", "keep=7"], "keep must be from 0 to num_local_experts - 1 (3)"),
])
def test_bad_moe_surgery_is_one_line(tmp_path, rules, args, message):
    moe_src = save_tiny("mixtral", tmp_path / "mixtral", shards=2, num_local_experts=4)
    assert_one_line_error(run("apply", moe_src, tmp_path / "out", "-r", rules, *args, "-q"), message)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("layers,message", [
    ("0:5", "goes outside 0:4"), ("3:0:-1", "step -1"), ("2:2", "is empty"), ("4", "4 is not from 0 to 3"), ("a:b", "not an index or a range"),
])
def test_bad_layer_ranges_are_one_line(dense, tmp_path, layers, message):
    assert_one_line_error(run("apply", dense["llama"], tmp_path / "out", "-r", "depth-upscale", "-p", f"layers={layers}",
                              "-q"), message)
    assert not (tmp_path / "out").exists()
