"""The rule language around the ops: parameters, `when:`, `drop:`, nested configs, what `plan` reports, and rule
files as untrusted input (each abuse one clear error, fast, in bounded memory)."""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

import surgery
from surgery.errors import SurgeryError
from surgery.expressions import evaluate

from .test_cli import assert_one_line_error, run
from .tiny_models import save_tiny

ROOT = Path(__file__).resolve().parent.parent
MOE = ["-r", "mistral-to-mixtral", "-e", "4", "-k", "2"]
SIMPLE_MOE = ["-e", "4", "-k", "2"]


#: a small Mistral -> Mixtral rule file that the tests below edit (the built-in one has more parameters)
SIMPLE = """
name: simple
source: {model_type: [mistral]}
target: {model_type: mixtral, architectures: [MixtralForCausalLM]}
parameters:
  num_experts: {type: int, min: 1, max: 4096, help: Experts per MoE layer.}
  experts_per_token: {type: int, min: 1, max: num_experts, help: Experts routed per token.}
  router_init: {type: str, default: normal, choices: [normal, zeros, uniform], help: How routers start.}
  router_std: {type: float, default: 0.02, min: 0, max: 100, help: Std of the normal router init.}
indices:
  expert: {count: num_experts, active: experts_per_token}
exact:
  because: every expert is the dense MLP and Mixtral renormalises its top-k weights to sum to 1
config:
  set:
    num_local_experts: "{num_experts}"
    num_experts_per_tok: "{experts_per_token}"
tensors:
  - from: model.layers.{layer}.mlp.gate_proj.weight
    to:   model.layers.{layer}.block_sparse_moe.experts.{expert}.w1.weight
  - from: model.layers.{layer}.mlp.up_proj.weight
    to:   model.layers.{layer}.block_sparse_moe.experts.{expert}.w3.weight
  - from: model.layers.{layer}.mlp.down_proj.weight
    to:   model.layers.{layer}.block_sparse_moe.experts.{expert}.w2.weight
  - to: model.layers.{layer}.block_sparse_moe.gate.weight
    for_each: model.layers.{layer}.mlp.gate_proj.weight
    value: {init: "{router_init}", shape: [num_experts, hidden_size], std: router_std}
"""


def builtin() -> dict:
    return yaml.safe_load(SIMPLE)


def write(tmp_path: Path, doc: dict, name: str = "custom.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def tensors(folder: Path) -> dict:
    out = {}
    for shard in folder.glob("*.safetensors"):
        out.update(load_file(shard))
    return out


# ----------------------------------------------------------------------------------------------- parameters


def test_parameters_from_the_command_line_and_python(mistral, tmp_path):
    by_shortcut = run("plan", mistral, *MOE, "--router-std", "0.5")
    by_param = run("plan", mistral, "-r", "mistral-to-mixtral", "-p", "num_experts=4", "-p", "experts_per_token=2",
                   "-p", "router_std=0.5")
    assert by_shortcut.exit_code == 0 and by_shortcut.output == by_param.output
    assert "router_std=0.5" in by_param.output
    plan = surgery.plan(mistral, "mistral-to-mixtral", num_experts=4, experts_per_token=2, router_std=0.5)
    assert {k: plan.params[k] for k in ("num_experts", "experts_per_token", "router_init", "router_std")} == \
        {"num_experts": 4, "experts_per_token": 2, "router_init": "normal", "router_std": 0.5}
    assert plan.params["granularity"] == 1 and plan.params["drop_ratio"] == 0  # the defaults of the others


@pytest.mark.parametrize("args,message", [
    (["-p", "num_experts=4"], "parameter experts_per_token is required"),
    ([*MOE[2:], "-p", "colour=2"], "no parameter 'colour' (its parameters: num_experts"),
    ([*MOE[2:], "-p", "router_init=xavier"], "router_init: expected one of normal, zeros, uniform"),
    ([*MOE[2:], "-p", "router_std=-1"], "router_std must be from 0 to 100, got -1.0"),
    ([*MOE[2:], "-p", "router_std=inf"], "router_std: expected a finite number"),
    (["-k", "2", "-p", "num_experts=four"], "num_experts: invalid literal"),
    ([*MOE[2:], "-p", "novalue"], "'novalue' is not NAME=VALUE"),
    ([*MOE[2:], "-p", "num_experts=8"], "num_experts is given twice"),
])
def test_bad_parameters_are_one_line_before_anything_is_read(mistral, monkeypatch, args, message):
    import os

    monkeypatch.setattr(os, "pread", lambda *a: pytest.fail("read tensor data"))
    result = run("plan", mistral, "-r", "mistral-to-mixtral", *args)
    if "not NAME=VALUE" in message or "given twice" in message:  # command-line misuse: click's usage error
        assert result.exit_code == 2 and message in result.output
    else:
        assert_one_line_error(result, message)


def test_a_shortcut_for_a_parameter_the_rule_file_lacks(mistral, tmp_path):
    doc = builtin()
    del doc["parameters"]["router_std"]
    doc["tensors"][3]["value"]["std"] = 0.02
    assert_one_line_error(run("plan", mistral, "-r", write(tmp_path, doc), *MOE[2:], "--router-std", "0.1"),
                          "no parameter 'router_std'")


def test_rules_shows_each_builtin_as_valid_yaml_with_its_parameters(tmp_path):
    for name in surgery.rules.builtin_rule_names():
        shown = run("rules", name)
        assert shown.exit_code == 0
        doc = yaml.safe_load(shown.output)
        assert all(spec.get("help") for spec in doc["parameters"].values()), name
        copy = tmp_path / f"{name}.yaml"
        copy.write_text(shown.output)  # users copy it, edit it and pass it back
        assert surgery.load_rules(copy).parameters == surgery.load_rules(name).parameters


@pytest.mark.parametrize("spec,message", [
    ({"type": "int"}, "every parameter needs a help text"),
    ({"type": "complex", "help": "x"}, "expected one of int, float"),
    ({"type": "int", "help": "x", "default": [1]}, "expected an integer"),
    ({"type": "int", "help": "x", "default": "1 +"}, "cannot parse expression"),
    ({"type": "float", "help": "x", "choices": ["a"]}, "a list of strings, for a str parameter"),
    ({"type": "int", "help": "x", "step": 2}, "unknown field 'step'"),
])
def test_bad_parameter_declarations(spec, message):
    doc = {**builtin(), "parameters": {"n": spec}}
    with pytest.raises(SurgeryError, match=message):
        surgery.rules.parse_rules(doc, "my.yaml")


def test_a_default_may_be_an_expression_over_the_config(mistral, tmp_path):
    doc = builtin()
    doc["parameters"]["num_experts"]["default"] = "hidden_size // 8"
    assert surgery.plan(mistral, write(tmp_path, doc), experts_per_token=1).params["num_experts"] == 4


def test_a_parameter_may_not_shadow_a_write_option():
    doc = {**builtin(), "parameters": {"seed": {"type": "int", "help": "x"}}}
    with pytest.raises(SurgeryError, match="other than seed"):
        surgery.rules.parse_rules(doc, "my.yaml")


# ----------------------------------------------------------------------------------------------- when, drop


def test_when_picks_layers_and_untaken_tensors_are_copied(mistral, tmp_path):
    """MoE on layer 1 only: layer 0 keeps its dense MLP (copied unchanged), and gets no router."""
    doc = builtin()
    for rule in doc["tensors"]:
        rule["when"] = "layer == 1"
    out = surgery.upcycle(mistral, tmp_path / "out", write(tmp_path, doc), 2, 1, progress=False)
    got, dense = tensors(out), tensors(mistral)
    assert "model.layers.0.mlp.up_proj.weight" in got and "model.layers.0.block_sparse_moe.gate.weight" not in got
    assert "model.layers.1.mlp.up_proj.weight" not in got and "model.layers.1.block_sparse_moe.gate.weight" in got
    assert got["model.layers.0.mlp.up_proj.weight"].equal(dense["model.layers.0.mlp.up_proj.weight"])


def test_relayer_repicks_per_layer_lists_and_renumbers_index_lists(tmp_path):
    """depth-upscale's relayer with `index_lists`, on a partial Qwen2-MoE: mlp_only_layers follows its layer."""
    dense = save_tiny("qwen2", tmp_path / "qwen2", shards=2, intermediate_size=96, num_hidden_layers=4)
    moe = surgery.upcycle(dense, tmp_path / "moe", "qwen2-to-qwen2-moe", 4, 2, moe_layers="1:", progress=False)
    doc = yaml.safe_load((ROOT / "rules" / "depth-upscale.yaml").read_text())
    doc["source"]["model_type"] = ["qwen2_moe"]
    doc["config"]["relayer"]["index_lists"] = ["mlp_only_layers"]
    source = json.loads((moe / "config.json").read_text())
    assert source["mlp_only_layers"] == [0]
    config = surgery.plan(moe, write(tmp_path, doc), layers="1:4,0:2").config
    assert config["mlp_only_layers"] == [3] and config["num_hidden_layers"] == 5
    assert config["layer_types"] == [source["layer_types"][i] for i in (1, 2, 3, 0, 1)]


def test_drop_removes_tensors(mistral, tmp_path):
    doc = {**builtin(), "drop": ["model.layers.{layer}.post_attention_layernorm.weight", "lm_head.{rest:*}"]}
    plan = surgery.plan(mistral, write(tmp_path, doc), 2, 1)
    names = {p.tensor.name for p in plan.tensors}
    assert not any("post_attention_layernorm" in n for n in names) and "lm_head.weight" not in names
    assert "model.layers.0.input_layernorm.weight" in names


def test_a_rule_that_matches_nothing_unless_optional(mistral, tmp_path):
    doc = builtin()
    doc["tensors"].append({"from": "model.layers.{layer}.mlp.gate_proj.bias", "to": "x.{layer}"})
    with pytest.raises(SurgeryError, match=r"tensors\[4\] \(model.layers.{layer}.mlp.gate_proj.bias\) matches no"):
        surgery.plan(mistral, write(tmp_path, doc), 2, 1)
    doc["tensors"][-1]["optional"] = True
    assert surgery.plan(mistral, write(tmp_path, doc), 2, 1).stats["tensors[4]"].outputs == 0


# ----------------------------------------------------------------------------------------------- nested configs


def test_dotted_names_in_expressions_and_config_edits(mistral, tmp_path):
    """Multimodal checkpoints keep the language model's fields under text_config."""
    src = shutil.copytree(mistral, tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    config["text_config"] = {"hidden_size": config["hidden_size"], "mlp_bias": False}
    (src / "config.json").write_text(json.dumps(config))
    doc = builtin()
    doc["tensors"][3]["value"]["shape"] = ["num_experts", "text_config.hidden_size"]
    doc["config"]["set"]["text_config.num_local_experts"] = "{num_experts}"
    doc["config"]["delete"] = ["text_config.mlp_bias"]
    doc["config"]["rename"] = {"text_config.hidden_size": "text_config.d_model"}
    plan = surgery.plan(src, write(tmp_path, doc), 3, 1)
    assert plan.config["text_config"] == {"d_model": config["hidden_size"], "num_local_experts": 3}
    assert plan.config["num_local_experts"] == 3


# ----------------------------------------------------------------------------------------------- plan report


def test_plan_reports_each_rule_and_the_exactness_claim(mistral, tmp_path):
    result = run("plan", mistral, *MOE)
    lines = result.output.splitlines()
    assert any(line.startswith("exact:      function-preserving at init: yes (the experts of a copy") for line in lines)
    assert any("tensors[0]: model.layers.{layer}.mlp.gate_proj.weight -> " in line and "2 matched, 8 written" in line
               and "copied, 0 B computed" in line for line in lines)
    assert any(line.startswith("  tensors[3]") and "0 B copied" in line for line in lines)
    doc = builtin()
    doc["exact"]["unless"] = [{"when": "router_init == 'zeros'", "why": "a test says so"}]
    custom = write(tmp_path, doc)
    assert "function-preserving at init: no (a test says so)" in run("plan", mistral, *MOE[2:], "-r", custom,
                                                                     "--router-init", "zeros").output
    del doc["exact"]
    assert "not stated by the rule file" in run("plan", mistral, *MOE[2:], "-r", write(tmp_path, doc)).output


# ----------------------------------------------------------------------------------------------- untrusted rule files


def abuse(tmp_path: Path, change) -> Path:
    doc = builtin()
    change(doc)
    return write(tmp_path, doc)


ABUSES = [
    ("string repetition", lambda d: d["config"]["set"].update(x="{'ab' * 100000000}"), "arithmetic applies to numbers"),
    ("% formatting", lambda d: d["config"]["set"].update(x="{'%s' % 'a'}"), "arithmetic applies to numbers"),
    ("deep nesting", lambda d: d["config"]["set"].update(x="{" + "(" * 5000 + "1" + ")" * 5000 + "}"),
     "longer than 2000 characters"),
    ("many nodes", lambda d: d["config"]["set"].update(x="{" + "+".join(["1"] * 600) + "}"), "more than 256 parts"),
    ("nested parentheses", lambda d: d["config"]["set"].update(x="{" + "-" * 900 + "1}"), "more than 256 parts"),
    ("huge integers", lambda d: d["config"]["set"].update(x="{4294967296 * 4294967296 * 2}"), "larger than 2**64"),
    ("power", lambda d: d["config"]["set"].update(x="{2 ** 100000}"), "only numbers, names"),
    ("a call", lambda d: d["config"]["set"].update(x="{open('x')}"), "() can be called, with plain arguments"),
    ("attributes of numbers", lambda d: d["config"]["set"].update(x="{num_experts.real}"), "no field 'real'"),
    ("huge lists", lambda d: d["config"]["set"].update(x="{sorted(range(10 ** 9))}"), "only numbers"),
    ("huge ranges", lambda d: d["config"]["set"].update(x="{sorted(range(1000000000))}"), "longer than 1,000,000"),
    ("huge shapes", lambda d: d["tensors"][3]["value"].update(shape=[4294967296, 4294967296, 2]),
     "more elements than a safetensors file can hold"),
    ("negative std", lambda d: d["tensors"][3]["value"].update(std=-1), "std must be a finite number from 0"),
    ("unknown op", lambda d: d["tensors"][0].update(value={"explode": "a"}, to="x") or d["tensors"][0].pop("from"),
     "one op of slice, take"),
    ("bad dtype", lambda d: d["tensors"][3]["value"].update(dtype="int4"), "unsupported dtype"),
    ("slice past the end", lambda d: d["tensors"][0].update(
        value={"slice": d["tensors"][0].pop("from"), "dim": 0, "start": 0, "stop": 10**6}), "does not fit a dim"),
]


@pytest.mark.parametrize("change,message", [a[1:] for a in ABUSES], ids=[a[0] for a in ABUSES])
def test_rule_file_abuse_is_one_clear_error_fast_in_bounded_memory(mistral, tmp_path, change, message):
    rules = abuse(tmp_path, change)

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

    result = subprocess.run([sys.executable, "-m", "surgery", "plan", mistral, "-r", rules, *MOE[2:]], cwd=ROOT,
                            capture_output=True, text=True, preexec_fn=limit, timeout=20)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith(f"Error: {rules}: ") and message in lines[0], lines[0]


def test_expressions():
    names = {"num_experts": 8, "hidden_size": 4096, "layers": [1, 3, 5], "text_config": {"hidden_size": 64}}
    assert evaluate("hidden_size // num_experts + 1", names, "w") == 513
    assert evaluate("text_config.hidden_size * 2", names, "w") == 128
    assert evaluate("3 in layers and 2 not in layers", names, "w") is True
    assert evaluate("layers[1] if len(layers) > 2 else 0", names, "w") == 3
    assert evaluate("max(layers) + min(2, 4) + sqrt(16)", names, "w") == 11.0
    assert evaluate("7 in range(0, 10, 2)", names, "w") is False
    for bad in ("__import__('os')", "[1]*10", "'a' + 'b'", "unknown_name", "layers[10]", "text_config.nope",
                "lambda: 1", "[x for x in layers]"):
        with pytest.raises(SurgeryError):
            evaluate(bad, names, "w")


def test_the_reference_mentions_every_field_and_op():
    """docs/rules.md documents the whole schema: a field or op the code accepts must appear there."""
    from surgery.params import TYPES
    from surgery.rules import _INIT_FIELDS, OPS

    text = (ROOT / "docs" / "rules.md").read_text()
    fields = {"name", "description", "parameters", "source.model_type", "source.forbid", "target.model_type",
              "target.architectures", "indices", "exact", "config.delete", "config.rename", "config.set", "drop",
              "tensors", "from", "to", "value", "for_each", "when", "dtype", "optional", "new", "shape", "init",
              "because", "unless", "why", "count", "active", "help", "default", "min", "max", "choices", "tensor",
              "within", "require", "that", "else", "refuses", "numeric_check",
              *TYPES, *OPS, *_INIT_FIELDS}
    fields |= {f for _, required, optional in OPS.values() for f in (*required, *optional)}
    missing = sorted(f for f in fields if f"`{f}`" not in text and f"{f}:" not in text)
    assert not missing, f"docs/rules.md does not mention {missing}"


@pytest.mark.parametrize("text,expected", [
    ("0:3,1:4", [0, 1, 2, 1, 2, 3]), ("1:", [1, 2, 3]), ("0:4:2", [0, 2]), ("3,0", [3, 0]), (":2", [0, 1]),
    ([2, 1], [2, 1]),
])
def test_ranges_parameters(text, expected):
    from surgery.params import parse_declaration, resolve

    declared = {"layers": parse_declaration("layers", {"type": "ranges", "within": "num_hidden_layers",
                                                       "help": "h", "default": "0:"}, None, "x.yaml")}
    assert resolve(declared, {"layers": text}, {"num_hidden_layers": 4}, "x.yaml") == {"layers": expected}
    assert resolve(declared, {}, {"num_hidden_layers": 3}, "x.yaml") == {"layers": [0, 1, 2]}
