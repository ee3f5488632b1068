"""Rule files: schema validation with field paths, config edits, fan-out, new tensors, custom files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from transformers import AutoModelForCausalLM, MixtralForCausalLM

import surgery
from surgery.errors import SurgeryError
from surgery.expressions import evaluate, render
from surgery.rules import find_rules, load_rules, parse_rules
from tests.test_upcycle import logits, read_all
from tests.tiny_models import save_tiny


def builtin(name: str) -> dict:
    return yaml.safe_load(find_rules(name).read_text())


def write_rules(tmp_path, doc: dict, name: str = "custom.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc))
    return path


def test_builtin_rules_load_and_describe_mixtral():
    rules = load_rules("mistral-to-mixtral")
    assert rules.source_model_types == ("mistral",) and rules.target["model_type"] == "mixtral"
    assert len(rules.sha256) == 64 and load_rules(find_rules("mistral-to-mixtral")).sha256 == rules.sha256


def test_custom_rule_file_from_path_is_applied(mistral, tmp_path):
    doc = builtin("mistral-to-mixtral")
    doc["config"]["set"]["router_aux_loss_coef"] = "{num_experts / 100}"
    doc["config"]["rename"] = {"initializer_range": "dense_initializer_range"}
    doc["config"]["delete"] = ["sliding_window"]
    path = write_rules(tmp_path, doc)
    out = surgery.upcycle(mistral, tmp_path / "out", load_rules(path), 5, 2, progress=False)
    written = json.loads((out / "config.json").read_text())
    assert "sliding_window" not in written and "initializer_range" not in written
    assert written["dense_initializer_range"] == json.loads((mistral / "config.json").read_text())["initializer_range"]
    config = MixtralForCausalLM.from_pretrained(out).config
    assert config.router_aux_loss_coef == pytest.approx(0.05) and config.num_local_experts == 5


def test_swapping_gate_and_up_breaks_equivalence(mistral, tmp_path):
    """The logits check is sharp: a rule file that mixes up w1 and w3 is caught."""
    doc = builtin("mistral-to-mixtral")
    doc["tensors"][0]["to"], doc["tensors"][1]["to"] = doc["tensors"][1]["to"], doc["tensors"][0]["to"]
    out = surgery.upcycle(mistral, tmp_path / "out", write_rules(tmp_path, doc), 2, 1, progress=False)
    dense = AutoModelForCausalLM.from_pretrained(mistral).eval()
    diff = (logits(MixtralForCausalLM.from_pretrained(out).eval()) - logits(dense)).abs().max().item()
    assert diff > 1e-3


def test_new_tensor_with_expression_shape_and_explicit_init(mistral, tmp_path):
    doc = builtin("mistral-to-mixtral")
    doc["tensors"].append({
        "new": "extra.layers.{layer}.scale.{expert}", "for_each": "model.layers.{layer}.mlp.up_proj.weight",
        "shape": ["hidden_size // 4", 3], "init": {"uniform": "0.5"}, "dtype": "fp16",
    })
    plan = surgery.plan(mistral, write_rules(tmp_path, doc), 2, 1)
    extra = {p.tensor.name: p.tensor for p in plan.tensors if p.tensor.name.startswith("extra.")}
    assert sorted(extra) == [f"extra.layers.{layer}.scale.{e}" for layer in range(2) for e in range(2)]
    assert {(t.shape, t.dtype) for t in extra.values()} == {((8, 3), "F16")}
    out = surgery.upcycle(mistral, tmp_path / "out", write_rules(tmp_path, doc), 2, 1, progress=False)
    values = read_all(out)["extra.layers.1.scale.0"]
    assert values.dtype == np.float16 and 0 < np.abs(values).max() <= 0.5


def test_expert_tensors_count_as_active_by_top_k_share(mistral):
    plan = surgery.plan(mistral, "mistral-to-mixtral", 8, 2)
    expert = sum(p.tensor.numel for p in plan.tensors if ".experts." in p.tensor.name)
    assert plan.active_parameters == plan.num_parameters - expert + expert * 2 // 8


def test_llama_with_biases_is_refused(tmp_path):
    for field in ("attention_bias", "mlp_bias"):
        src = save_tiny("llama", tmp_path / field, shards=1, **{field: True})
        with pytest.raises(SurgeryError, match=f"{field}=True.*mixtral cannot represent"):
            surgery.plan(src, "llama-to-mixtral", 2, 1)


def test_rule_matching_nothing_is_an_error(mistral, tmp_path):
    doc = builtin("mistral-to-mixtral")
    doc["tensors"].append({"from": "model.layers.{layer}.mlp.gate.bias", "to": "x.{layer}"})
    with pytest.raises(SurgeryError, match=r"tensors\[4\].*matches no tensor"):
        surgery.plan(mistral, write_rules(tmp_path, doc), 2, 1)


def test_two_rules_writing_one_name_is_an_error(mistral, tmp_path):
    doc = builtin("mistral-to-mixtral")
    doc["tensors"][1]["to"] = doc["tensors"][0]["to"]
    with pytest.raises(SurgeryError, match="produced twice"):
        surgery.plan(mistral, write_rules(tmp_path, doc), 2, 1)


def test_source_without_config_is_refused(tmp_path, mistral):
    import shutil

    src = shutil.copytree(mistral, tmp_path / "noconfig")
    (src / "config.json").unlink()
    with pytest.raises(SurgeryError, match="no config.json"):
        surgery.plan(src, "mistral-to-mixtral", 2, 1)


BAD_DOCS = [
    ({"tensors": "nope"}, "tensors: expected a list"),
    ({"source": {"model_type": ["mistral"], "extra": 1}}, "source: unknown field 'extra'"),
    ({"target": {}}, "target: missing required field 'model_type'"),
    ({"tensors": [{"from": "a.{layer}", "to": "b.{layer}.{expert}"}], "indices": {}},
     "tensors[0].to: placeholder {expert}"),
    ({"tensors": [{"new": "r.{layer}", "for_each": "a.{layer}", "shape": [1], "init": "ones"}]},
     "tensors[0].init: expected zeros or a mapping"),
    ({"tensors": [{"new": "r.{layer}", "for_each": "a.{layer}", "shape": [1]}]},
     "tensors[0]: missing required field 'init'"),
    ({"indices": {"expert": {"count": "num_experts", "weight": 1}}}, "indices.expert: unknown field 'weight'"),
    ({"config": {"set": [1]}}, "config.set: expected a mapping"),
    ({"name": 3}, "name: expected a string"),
    ({"source": {"model_type": ["mistral"], "auxiliary": {"routers": {"help": "rows", "dtype": "int8"}}}},
     "source.auxiliary.routers.dtype:"),
]


@pytest.mark.parametrize("change,message", BAD_DOCS)
def test_malformed_rule_documents_name_the_field(change, message):
    doc = {**builtin("mistral-to-mixtral"), **change}
    with pytest.raises(SurgeryError) as info:
        parse_rules(doc, "my.yaml")
    assert str(info.value).startswith("my.yaml: ") and message in str(info.value)


def test_invalid_yaml_is_one_clear_error(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: [unclosed\n")
    with pytest.raises(SurgeryError, match="broken.yaml: not valid YAML"):
        load_rules(path)


def test_expressions_are_arithmetic_only():
    names = {"num_experts": 8, "hidden_size": 4096}
    assert evaluate("hidden_size // num_experts + 1", names, "w") == 513
    assert render({"a": "{num_experts}", "b": "x{num_experts * 2}y", "c": [1, "{hidden_size}"]}, names, "w") == \
        {"a": 8, "b": "x16y", "c": [1, 4096]}
    for bad in ("__import__('os')", "num_experts.real", "[1]*10", "2 ** 1000000", "unknown_name"):
        with pytest.raises(SurgeryError):
            evaluate(bad, names, "w")
