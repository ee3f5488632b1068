"""Recipes over several checkpoints: tensors read from named sources (`--source NAME=PATH`), means over sources,
sources checked against each other, and every source protected from the output."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import surgery
from surgery import dtypes

from .test_cli import assert_one_line_error, run
from .tiny_models import save_tiny

#: a BTX-style recipe: expert i is the MLP of source i, every other tensor the mean over the sources
BTX = """
name: btx
source: {model_type: [mistral]}
target: {model_type: mixtral, architectures: [MixtralForCausalLM]}
parameters:
  experts_per_token: {type: int, default: 2, min: 1, help: Experts routed per token.}
indices:
  expert: {count: len(sources), active: experts_per_token}
  s: {values: sources}
config:
  set: {num_local_experts: "{len(sources)}", num_experts_per_tok: "{experts_per_token}"}
tensors:
  - to: "model.layers.{layer}.block_sparse_moe.experts.{expert}.{'w1' if proj == 'gate_proj' else 'w3' if proj == 'up_proj' else 'w2'}.weight"
    for_each: model.layers.{layer}.mlp.{proj:*}.weight
    value: {tensor: "model.layers.{layer}.mlp.{proj}.weight", source: "{sources[expert]}"}
  - to: "{name}"
    for_each: "{name:*}"
    when: "'.mlp.' not in name"
    value: {mean: {tensor: "{name}", source: "{s}"}, over: s}
  - to: model.layers.{layer}.block_sparse_moe.gate.weight
    for_each: model.layers.{layer}.mlp.gate_proj.weight
    value: {init: normal, std: 0.02, shape: ["len(sources)", hidden_size]}
"""


@pytest.fixture(scope="module")
def finetunes(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sources")
    return {name: save_tiny("mistral", root / name, shards=2, seed=seed) for seed, name in enumerate(("base", "a", "b"))}


def rules(tmp_path: Path) -> Path:
    path = tmp_path / "btx.yaml"
    path.write_text(BTX)
    return path


def tensors(folder: Path) -> dict[str, np.ndarray]:
    out = {}
    for shard in Path(folder).glob("*.safetensors"):
        out.update(load_file(shard))
    return out


def test_experts_from_several_sources_and_the_mean_of_the_rest(finetunes, tmp_path):
    others = {"a": finetunes["a"], "b": finetunes["b"]}
    out = surgery.upcycle(finetunes["base"], tmp_path / "out", rules(tmp_path), sources=others, progress=False)
    got = tensors(out)
    source = {name: tensors(folder) for name, folder in finetunes.items()}
    for e, name in enumerate(("base", "a", "b")):
        for proj, w in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")):
            assert got[f"model.layers.1.block_sparse_moe.experts.{e}.{w}.weight"].tobytes() == \
                source[name][f"model.layers.1.mlp.{proj}.weight"].tobytes()
    for key in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.norm.weight"):
        mean = sum(source[n][key].astype(np.float64) for n in source) / 3
        assert got[key].tobytes() == bytes(dtypes.encode(mean, "F32")), key
    import transformers

    assert transformers.AutoModelForCausalLM.from_pretrained(out).config.num_local_experts == 3
    card = (out / "README.md").read_text()
    assert str(finetunes["a"]) in card and str(finetunes["b"]) in card


def test_the_command_line_names_sources(finetunes, tmp_path):
    args = ["-r", rules(tmp_path), "--source", f"a={finetunes['a']}", "--source", f"b={finetunes['b']}", "-q"]
    assert run("upcycle", finetunes["base"], tmp_path / "out", *args).exit_code == 0
    assert run("verify", finetunes["base"], tmp_path / "out", *args).exit_code == 0
    planned = run("plan", finetunes["base"], *args[:-1])
    assert f"source a: {finetunes['a']}" in planned.output


def test_sources_must_match_the_base(finetunes, tmp_path):
    wider = save_tiny("mistral", tmp_path / "wider", shards=2, intermediate_size=96)
    llama = save_tiny("llama", tmp_path / "llama", shards=2)
    for other, message in ((wider, "mlp.down_proj.weight is F32[32, 96], in the base F32[32, 64]"),
                           (llama, "is a 'llama' model, the base a 'mistral'")):
        assert_one_line_error(run("plan", finetunes["base"], "-r", rules(tmp_path), "--source", f"a={other}",
                                  "--source", f"b={finetunes['b']}"), message)


def test_a_source_that_is_not_named_is_an_error(finetunes, tmp_path):
    path = rules(tmp_path)
    path.write_text(BTX.replace('source: "{sources[expert]}"', 'source: "{sources[expert] if expert < 1 else \'c\'}"'))
    assert_one_line_error(run("plan", finetunes["base"], "-r", path, "--source", f"a={finetunes['a']}"),
                          "no source named 'c'", "the sources: base, a")


def test_every_source_is_protected_from_the_output(finetunes, tmp_path):
    args = ["-r", rules(tmp_path), "--source", f"a={finetunes['a']}", "--source", f"b={finetunes['b']}", "-q"]
    assert_one_line_error(run("upcycle", finetunes["base"], finetunes["b"], *args, "--overwrite"), "source",
                          str(finetunes["b"]))


def test_a_further_source_cannot_take_the_base_name(finetunes, tmp_path):
    assert_one_line_error(run("plan", finetunes["base"], "-r", rules(tmp_path), "--source", f"base={finetunes['a']}"),
                          "cannot be named 'base'")
