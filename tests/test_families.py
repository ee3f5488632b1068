"""The dense -> MoE families beyond Mistral, Llama and Qwen2/3 (Qwen3.5 text and multimodal, Granite, ERNIE 4.5,
Hunyuan, Cohere2, OLMo 2 and 3), the per-expert and fused output layouts, `surgery convert` and `surgery check`.

Every model is a tiny one made by transformers; upcycled outputs are loaded by transformers and compared with the
dense model (fp32, logits to 1e-5 x max(1, max |logit|)) wherever `plan` says the recipe is exact.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import surgery
from surgery.consumer import check_consumer
from surgery.errors import SurgeryError

from .test_cli import assert_one_line_error, run
from .test_exactness import (CASES, COHERE2, ERNIE, GRANITE, HUNYUAN, OLMO2, OLMO3, QWEN3_5, available, loads,
                             logits)
from .tiny_models import TINY, save_tiny

ROOT = Path(__file__).resolve().parent.parent
TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5
ONE, FOUR = dict(num_experts=1, experts_per_token=1), dict(num_experts=4, experts_per_token=2)
#: OLMo 3 with full attention in every layer: the case FlexOlmo reproduces exactly
OLMO3_FULL = dict(OLMO3, layer_types=["full_attention"] * 4)

#: rule file -> (tiny source model_type, its config overrides, settings: 1 and 4 experts, a shared expert if any)
FAMILIES = {
    "qwen3-5-to-qwen3-5-moe": ("qwen3_5_text", QWEN3_5, [ONE, FOUR, dict(FOUR, shared_experts=2)]),
    "granite-to-granitemoe": ("granite", GRANITE, [ONE, FOUR]),
    "granite-to-granitemoeshared": ("granite", GRANITE, [ONE, FOUR, dict(FOUR, shared_experts=2)]),
    "ernie4-5-to-ernie4-5-moe": ("ernie4_5", ERNIE, [ONE, FOUR, dict(FOUR, shared_experts=1, moe_layers="1:")]),
    "hunyuan-v1-dense-to-hunyuan-v1-moe": ("hunyuan_v1_dense", HUNYUAN, [ONE, FOUR]),  # the shared MLP is always there
    "cohere2-to-cohere2-moe": ("cohere2", COHERE2, [ONE, FOUR, dict(FOUR, shared_experts=1, moe_layers="1:")]),
    "olmo2-to-flex-olmo": ("olmo2", OLMO2, [ONE, FOUR]),
    "olmo3-to-flex-olmo": ("olmo3", OLMO3_FULL, [ONE, FOUR]),
}
#: the rule files that take `layout`, with a setting whose experts are not plain copies (noise, drawn per expert)
LAYOUTS = {rules: dict(FOUR, expert_noise=0.05) for rules in FAMILIES if "granite" not in rules}


def ids(value: object) -> str:
    return value if isinstance(value, str) else ",".join(f"{k}={v}" for k, v in value.items())


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A function (model_type, overrides) -> a tiny dense checkpoint, made once, in three shards."""
    made: dict[str, Path] = {}

    def make(kind: str, overrides: dict) -> Path:
        key = f"{kind}-{json.dumps(overrides, sort_keys=True)}"
        if not available(kind):
            pytest.skip(f"transformers {transformers.__version__} has no {kind}")
        if key not in made:
            made[key] = save_tiny(kind, tmp_path_factory.mktemp(kind), shards=3, seed=7, **overrides)
        return made[key]

    return make


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(shard))
    return out


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same dtype, shape and bytes."""
    return a.dtype == b.dtype and a.shape == b.shape and a.view(-1).view(torch.uint8).equal(b.view(-1).view(torch.uint8))


def same_tensors(a: dict, b: dict) -> bool:
    """The same names, and for each the same dtype, shape and bytes."""
    return sorted(a) == sorted(b) and all(same_bytes(a[k], b[k]) for k in a)


def upcycle(src: Path, dst: Path, rules: str, **params) -> Path:
    plan = surgery.plan(src, rules, **params)
    if loads(plan):
        pytest.skip(loads(plan))
    return surgery.upcycle(src, dst, rules, progress=False, **params)


# ----------------------------------------------------------------------------------------------- every pair


@pytest.mark.parametrize("rules,params", [(r, p) for r, (_, _, settings) in FAMILIES.items() for p in settings], ids=ids)
def test_upcycle_computes_the_dense_model_and_copies_the_rest(sources, tmp_path, rules, params):
    kind, overrides, _ = FAMILIES[rules]
    src = sources(kind, overrides)
    out = upcycle(src, tmp_path / "moe", rules, **params)
    assert surgery.plan(src, rules, **params).exact[0]
    dense = logits(src)
    diff = (logits(out) - dense).abs().max().item()
    assert diff <= 1e-5 * max(1.0, dense.abs().max().item()), f"max |logit diff| {diff:.3g}"
    before, after = tensors(src), tensors(out)
    kept = [name for name in before if ".mlp." not in name]
    assert kept and all(same_bytes(before[n], after[n]) for n in kept)
    assert check_consumer(out).ok


def test_olmo3_sliding_window_layers_make_the_recipe_inexact(sources):
    plan = surgery.plan(sources("olmo3", OLMO3), "olmo3-to-flex-olmo", **FOUR)
    assert plan.exact[0] is False and "sliding-window" in plan.exact[1]
    assert "layer_types" not in plan.config and "sliding_window" not in plan.config


def test_ernie_sets_where_moe_layers_start_and_a_zero_correction_bias(sources, tmp_path):
    out = upcycle(sources("ernie4_5", ERNIE), tmp_path / "moe", "ernie4-5-to-ernie4-5-moe", **FOUR)
    config = json.loads((out / "config.json").read_text())
    assert (config["moe_layer_start_index"], config["moe_layer_end_index"], config["moe_layer_interval"]) == (0, 3, 1)
    bias = tensors(out)["model.layers.0.mlp.moe_statics.e_score_correction_bias"]
    assert bias.shape == (1, 4) and bias.dtype == torch.float32 and not bias.any()


def test_cohere2_sums_its_shared_experts(sources, tmp_path):
    out = upcycle(sources("cohere2", COHERE2), tmp_path / "moe", "cohere2-to-cohere2-moe", **FOUR, shared_experts=1)
    config = json.loads((out / "config.json").read_text())
    assert config["shared_expert_combination_strategy"] == "sum" and config["num_shared_experts"] == 1


@pytest.mark.parametrize("rules,args,message", [
    ("qwen3-5-to-qwen3-5-moe", ["--shared-experts", "0"], "Qwen3.5-MoE always has a shared expert"),
    ("qwen3-5-to-qwen3-5-moe", ["--moe-layers", "1:"], "Qwen3.5-MoE makes every layer an MoE layer"),
    ("hunyuan-v1-dense-to-hunyuan-v1-moe", ["--shared-experts", "0"], "shared_experts must be 1"),
    ("hunyuan-v1-dense-to-hunyuan-v1-moe", ["--shared-experts", "2"], "shared_experts must be 1"),
    ("granite-to-granitemoe", ["--layout", "fused"], "Hub layout is already fused"),
    ("granite-to-granitemoe", ["--shared-experts", "1"], "use granite-to-granitemoeshared"),
    ("ernie4-5-to-ernie4-5-moe", ["--moe-layers", "0:4:2"], "cannot express moe_layers=[0, 2]"),
    ("cohere2-to-cohere2-moe", ["--moe-layers", "0,2"], "give moe_layers as K:"),
    ("olmo2-to-flex-olmo", ["--moe-layers", "1:"], "FlexOlmo makes every layer an MoE layer"),
], ids=lambda v: v if isinstance(v, str) else " ".join(v) if isinstance(v, list) else None)
def test_settings_a_target_cannot_express_are_one_line(sources, tmp_path, rules, args, message):
    kind, overrides, _ = FAMILIES[rules]
    result = run("upcycle", sources(kind, overrides), tmp_path / "out", "-r", rules, "-e", "4", "-k", "2", *args, "-q")
    assert_one_line_error(result, message)
    assert not (tmp_path / "out").exists()


def test_a_granite_source_with_mlp_biases_is_refused(tmp_path):
    src = save_tiny("granite", tmp_path / "src", shards=1, mlp_bias=True)
    assert_one_line_error(run("plan", src, "-r", "granite-to-granitemoe", "-e", "4", "-k", "2"), "mlp_bias=True")


# ----------------------------------------------------------------------------------------------- Qwen3.5 multimodal

#: a vision tower small enough for a test, whose output width is the text model's
VISION = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=TINY["hidden_size"],
              num_position_embeddings=16, patch_size=4, temporal_patch_size=2)


def save_qwen3_5_multimodal(folder: Path) -> Path:
    """A tiny dense Qwen3.5 with its vision tower (model.language_model, model.visual), in three shards."""
    config = transformers.AutoConfig.for_model("qwen3_5", text_config={**TINY, **QWEN3_5}, vision_config=VISION)
    torch.manual_seed(11)
    model = transformers.AutoModelForImageTextToText.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(torch.rand_like(p) * 0.5)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(folder, max_shard_size=total // 4)
    return folder


def text_logits(folder: Path) -> tuple[str, torch.Tensor]:
    model = transformers.AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.randint(0, TINY["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return type(model).__name__, model(input_ids=ids).logits


@pytest.mark.skipif(not available("qwen3_5"), reason=f"transformers {transformers.__version__} has no qwen3_5")
def test_qwen3_5_multimodal_upcycles_its_language_model_and_keeps_the_vision_tower(tmp_path):
    src = save_qwen3_5_multimodal(tmp_path / "dense")
    _, dense = text_logits(src)
    per_expert = upcycle(src, tmp_path / "per-expert", "qwen3-5-to-qwen3-5-moe", **FOUR, shared_experts=2)
    fused = upcycle(src, tmp_path / "fused", "qwen3-5-to-qwen3-5-moe", **FOUR, shared_experts=2, layout="fused")
    config = json.loads((per_expert / "config.json").read_text())
    assert (config["model_type"], config["text_config"]["model_type"], config["vision_config"]["model_type"]) == \
        ("qwen3_5_moe", "qwen3_5_moe_text", "qwen3_5_moe_vision")
    assert config["text_config"]["num_experts"] == 4 and config["architectures"] == ["Qwen3_5MoeForConditionalGeneration"]
    before, after = tensors(src), tensors(per_expert)
    kept = [n for n in before if not re.search(r"\.mlp\.(gate|up|down)_proj\.weight$", n)]
    assert any(n.startswith("model.visual.") for n in kept) and all(same_bytes(before[n], after[n]) for n in kept)
    assert "model.language_model.layers.3.mlp.experts.3.down_proj.weight" in after
    for out in (per_expert, fused):
        assert check_consumer(out).ok
        name, moe = text_logits(out)
        assert name == "Qwen3_5MoeForConditionalGeneration"
        assert (moe - dense).abs().max().item() <= 1e-5 * max(1.0, dense.abs().max().item())


# ----------------------------------------------------------------------------------------------- layouts


@pytest.mark.skipif(not TRANSFORMERS_5, reason="transformers 4 loads no fused experts")
@pytest.mark.parametrize("rules", LAYOUTS)
def test_fused_and_per_expert_outputs_load_with_identical_logits(sources, tmp_path, rules):
    kind, overrides, _ = FAMILIES[rules]
    src, params = sources(kind, overrides), LAYOUTS[rules]
    per_expert = upcycle(src, tmp_path / "per-expert", rules, **params)
    fused = upcycle(src, tmp_path / "fused", rules, **params, layout="fused")
    names = tensors(fused)
    assert any(n.endswith("mlp.experts.gate_up_proj") for n in names) and not any(".experts.0." in n for n in names)
    assert torch.equal(logits(per_expert), logits(fused))


def test_fused_experts_are_byte_copies(sources):
    """Stacked and concatenated slices of the dense MLP stay zero-copy: no expert tensor is computed."""
    plan = surgery.plan(sources("olmo2", OLMO2), "olmo2-to-flex-olmo", **FOUR, layout="fused")
    experts = [p.tensor for p in plan.tensors if ".experts." in p.tensor.name]
    assert len(experts) == 2 * 2 and all(type(t.producer).__name__ == "Copy" for t in experts)
    shapes = {t.name.rsplit(".", 1)[1]: t.shape for t in experts}
    assert shapes == {"gate_up_proj": (4, 2 * 96, TINY["hidden_size"]), "down_proj": (4, TINY["hidden_size"], 96)}


#: (upcycle rule file, parameters) whose output `surgery convert` re-lays out, one per layout rule file's family
CONVERTED = [
    ("mistral-to-mixtral", "mistral", {}, FOUR),
    ("qwen2-to-qwen2-moe", "qwen2", dict(intermediate_size=96), FOUR),
    ("qwen3-to-qwen3-moe", "qwen3", dict(intermediate_size=96, num_hidden_layers=4), dict(FOUR, moe_layers="1:4:2")),
    *[(rules, FAMILIES[rules][0], FAMILIES[rules][1], FAMILIES[rules][2][-1]) for rules in LAYOUTS],
]


@pytest.mark.parametrize("rules,kind,overrides,params", CONVERTED, ids=[c[0] for c in CONVERTED])
def test_convert_round_trips_each_layout_byte_for_byte(sources, tmp_path, rules, kind, overrides, params):
    src = sources(kind, overrides)
    start = surgery.upcycle(src, tmp_path / "start", rules, progress=False, **params)
    fused, back = tmp_path / "fused", tmp_path / "back"
    for folder, layout, into in ((start, "fused", fused), (fused, "per-expert", back)):
        result = run("convert", folder, into, "--layout", layout, "--no-check", "-q")
        assert result.exit_code == 0, result.output
    assert any(n.endswith("experts.gate_up_proj") for n in tensors(fused))
    assert same_tensors(tensors(start), tensors(back))
    assert json.loads((back / "config.json").read_text()) == json.loads((start / "config.json").read_text())
    again = tmp_path / "again"
    assert run("convert", back, again, "--layout", "fused", "--no-check", "-q").exit_code == 0
    assert same_tensors(tensors(fused), tensors(again))
    if "layout" in surgery.load_rules(rules).parameters:  # converting equals upcycling into the fused layout
        direct = surgery.upcycle(src, tmp_path / "direct", rules, progress=False, layout="fused", **params)
        assert same_tensors(tensors(direct), tensors(fused))


@pytest.mark.skipif(not TRANSFORMERS_5, reason="transformers 4 loads no fused experts")
@pytest.mark.skipif(not available("qwen3_5"), reason=f"transformers {transformers.__version__} has no qwen3_5")
def test_convert_writes_the_per_expert_layout_vllm_reads_from_a_fused_qwen3_5_moe(tmp_path):
    src = save_qwen3_5_multimodal(tmp_path / "dense")
    fused = upcycle(src, tmp_path / "fused", "qwen3-5-to-qwen3-5-moe", **FOUR, layout="fused")
    result = run("convert", fused, tmp_path / "per-expert", "--layout", "per-expert", "-q")
    assert result.exit_code == 0 and "checked: " in result.output, result.output
    names = tensors(tmp_path / "per-expert")
    assert "model.language_model.layers.0.mlp.experts.3.gate_proj.weight" in names
    assert not any(n.endswith("gate_up_proj") for n in names)
    assert torch.equal(text_logits(fused)[1], text_logits(tmp_path / "per-expert")[1])


def test_convert_refuses_a_family_without_a_layout_rule_file(tmp_path):
    src = save_tiny("granitemoe", tmp_path / "granitemoe", shards=1, num_local_experts=4)
    assert_one_line_error(run("convert", src, tmp_path / "out", "--layout", "fused"), "no built-in layout rule file",
                          "'granitemoe'")


# ----------------------------------------------------------------------------------------------- surgery check


@pytest.mark.parametrize("rules", sorted(CASES))
def test_check_passes_on_every_builtin_recipe(sources, tmp_path, rules):
    kind, overrides, cases = CASES[rules]
    if not cases:
        pytest.skip("no single-source case (it reads a second source; its own tests run it)")
    out = upcycle(sources(kind, overrides), tmp_path / "out", rules, **cases[0][0])
    result = run("check", out)
    assert result.exit_code == 0 and result.output.startswith("ok: "), result.output


def damage(folder: Path, mis_shaped: str) -> None:
    """Rewrite `folder` as one shard with q_proj of layer 0 renamed, a norm missing and `mis_shaped` a row short."""
    content = tensors(folder)
    for shard in folder.glob("*.safetensors"):
        shard.unlink()
    (folder / "model.safetensors.index.json").unlink(missing_ok=True)
    content["model.layers.0.self_attn.q_prj.weight"] = content.pop("model.layers.0.self_attn.q_proj.weight")
    del content["model.layers.1.post_attention_layernorm.weight"]
    content[mis_shaped] = content[mis_shaped][:-1].clone()
    save_file(content, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("rules,kind,mis_shaped", [
    ("mistral-to-mixtral", "mistral", "model.norm.weight"),
    ("mistral-to-mixtral", "mistral", "model.layers.1.block_sparse_moe.experts.2.w3.weight"),  # merged when loaded
    ("qwen3-to-qwen3-moe", "qwen3", "model.layers.0.mlp.experts.1.down_proj.weight"),
])
def test_check_names_a_renamed_a_missing_and_a_mis_shaped_tensor(sources, tmp_path, rules, kind, mis_shaped):
    out = surgery.upcycle(sources(kind, {}), tmp_path / "out", rules, progress=False, **FOUR)
    damage(out, mis_shaped)
    result = run("check", out)
    assert result.exit_code == 1
    lines = result.output.splitlines()
    for kind_, name in (("unexpected", "model.layers.0.self_attn.q_prj.weight"),
                        ("missing", "model.layers.0.self_attn.q_proj.weight"),
                        ("missing", "model.layers.1.post_attention_layernorm.weight"), ("mis-shaped", mis_shaped)):
        assert any(line.startswith(kind_) and f" {name}: " in line for line in lines), result.output
    assert lines[-1].startswith("Error: ") and "would not load it" in lines[-1]
    document = json.loads(run("check", out, "--json").stdout)
    assert document["ok"] is False and len(document["problems"]) == 4


def test_upcycle_checks_its_output_and_names_what_no_loader_reads(sources, tmp_path):
    """A rule file that writes a name transformers does not read: the output is kept, the run fails naming it."""
    text = (ROOT / "rules" / "mistral-to-mixtral.yaml").read_text().replace(".experts.{expert}.w3.", ".experts.{expert}.w4.")
    (tmp_path / "typo.yaml").write_text(text)
    src = sources("mistral", {})
    result = run("upcycle", src, tmp_path / "out", "-r", tmp_path / "typo.yaml", "-e", "4", "-k", "2", "-q")
    assert_one_line_error(result, "would not load it", "experts.0.w4.weight", "surgery check")
    assert (tmp_path / "out" / "config.json").is_file()
    skipped = run("upcycle", src, tmp_path / "skipped", "-r", tmp_path / "typo.yaml", "-e", "4", "-k", "2", "-q",
                  "--no-check")
    assert skipped.exit_code == 0 and "checked" not in skipped.output
    good = run("upcycle", src, tmp_path / "good", "-r", "mistral-to-mixtral", "-e", "4", "-k", "2", "-q")
    assert good.exit_code == 0 and "checked: " in good.output and "MixtralForCausalLM" in good.output


def test_without_transformers_the_check_says_so(sources, tmp_path):
    src = sources("mistral", {})
    script = ("import sys; sys.modules['transformers'] = None; from surgery.cli import main; "
              "main(sys.argv[1:], prog_name='surgery')")

    def cli(*args: object) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", script, *map(str, args)], cwd=ROOT, capture_output=True, text=True)

    written = cli("upcycle", src, tmp_path / "out", "-r", "mistral-to-mixtral", "-e", "4", "-k", "2", "-q")
    assert written.returncode == 0 and "was not checked: checking needs torch and transformers" in written.stderr
    checked = cli("check", tmp_path / "out")
    assert checked.returncode == 1 and "checking needs torch and transformers" in checked.stderr


def test_a_transformers_whose_loader_changed_skips_the_check_with_a_warning(sources, tmp_path, monkeypatch):
    """The check uses transformers 5's private loading functions; a release that changes them must not make
    upcycle fail."""
    loading = pytest.importorskip("transformers.core_model_loading")

    def changed(*args, **kwargs):
        raise TypeError("convert_and_load_state_dict_in_model() got an unexpected keyword argument")

    monkeypatch.setattr(loading, "convert_and_load_state_dict_in_model", changed)
    result = run("upcycle", sources("mistral", {}), tmp_path / "out", "-r", "mistral-to-mixtral", "-e", "4", "-k", "2",
                 "-q")
    assert result.exit_code == 0, result.output
    assert "was not checked" in result.output and "loader is not the one this check knows" in result.output


# ----------------------------------------------------------------------------------------------- verify --numeric


@pytest.mark.parametrize("rules", FAMILIES)
def test_numeric_check_passes_layer_by_layer(sources, tmp_path, rules):
    from surgery.numeric import check_numeric

    kind, overrides, settings = FAMILIES[rules]
    # transformers 4 cannot build a one-layer ERNIE-4.5-MoE whose layer is dense (its fp32 list names the router):
    # the check says so in one line; GraniteMoeShared's shared MLP sits beside block_sparse_moe (both summed), or is
    # left out
    if rules.startswith("ernie") and not TRANSFORMERS_5:
        out = upcycle(sources(kind, overrides), tmp_path / "partial", rules, **settings[-1])
        with pytest.raises(SurgeryError, match=r"^\S+: transformers 4\.\S+ cannot build a one-layer "
                                               r"Ernie4_5_MoeForCausalLM to check layer 0 \([^\n]+\)$"):
            check_numeric(surgery.plan(sources(kind, overrides), rules, **settings[-1]), out)
    choices = [FOUR] if rules.startswith("ernie") and not TRANSFORMERS_5 else \
        [settings[-1], dict(FOUR, shared_experts=0)] if rules == "granite-to-granitemoeshared" else [settings[-1]]
    for i, params in enumerate(choices):
        out = upcycle(sources(kind, overrides), tmp_path / f"out{i}", rules, **params)
        results = check_numeric(surgery.plan(sources(kind, overrides), rules, **params), out)
        assert results and all(r.same for r in results), (params, results)
