"""Experts from several checkpoints for the families beyond Mixtral, Qwen2/3-MoE and FlexOlmo: the `experts-to-*`
rule files of Qwen3.5-MoE, Granite-MoE(-Shared), ERNIE-4.5-MoE, Hunyuan-MoE and Cohere2-MoE, on tiny fine-tunes made
by transformers. Each expert (and shared expert) is checked byte for byte against its source's MLP, every other tensor
against the base or the float64 mean over the sources, the result is loaded by transformers, `plan`'s exactness claim
is checked against the logits, and `surgery mergekit-moe` is checked to pick the family's rule file and to write
what the rule file writes directly; also routers' dtypes, Qwen3.5's multimodal layout, multi-token-prediction layers
and hidden-state routers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import transformers
import yaml

import surgery
from surgery import dtypes
from surgery.api import open_source
from surgery.compat.mergekit import load_config, select_rules
from surgery.consumer import check_consumer
from surgery.numeric import check_numeric
from surgery.routers import Prompts, router_rows, write_routers

from .test_cli import assert_one_line_error, run
from .test_exactness import COHERE2, ERNIE, GRANITE, HUNYUAN, QWEN3_5, available, loads, logits
from .test_mergekit import PROMPTS, finetunes, tensors, write_config

PROJ = ("gate_proj", "up_proj", "down_proj")
TRANSFORMERS = transformers.__version__
#: rule file -> (tiny dense model_type, its config overrides, the shared MLP's prefix in a layer (None: no shared
#: MLP), whether it takes `layout`)
FAMILIES = {
    "experts-to-qwen3-5-moe": ("qwen3_5_text", QWEN3_5, "mlp.shared_expert", True),
    "experts-to-granitemoe": ("granite", GRANITE, None, False),
    "experts-to-granitemoeshared": ("granite", GRANITE, "shared_mlp", False),
    "experts-to-ernie4-5-moe": ("ernie4_5", ERNIE, "mlp.shared_experts", True),
    "experts-to-hunyuan-v1-moe": ("hunyuan_v1_dense", HUNYUAN, "mlp.shared_mlp", True),
    "experts-to-cohere2-moe": ("cohere2", COHERE2, "mlp.shared_experts", True),
}
#: rule file -> shared_sources of the second setting (several sources side by side where the target allows it)
SHARED = {"experts-to-qwen3-5-moe": [1, 2], "experts-to-granitemoeshared": [1, 2], "experts-to-ernie4-5-moe": [2, 1],
          "experts-to-hunyuan-v1-moe": [2], "experts-to-cohere2-moe": [1]}
#: rule file -> the shared MLP's sources when shared_sources is not given: the base's MLP where the target always
#: has one (and Granite-MoE-Shared, made for one), none where it is optional
DEFAULT_SHARED = {"experts-to-qwen3-5-moe": [0], "experts-to-granitemoe": [], "experts-to-granitemoeshared": [0],
                  "experts-to-ernie4-5-moe": [], "experts-to-hunyuan-v1-moe": [0], "experts-to-cohere2-moe": []}
#: the two settings of the first test: one expert per source (the defaults), and experts repeating sources with
#: shared experts from named sources, fused experts where the target takes them, and the other tensors averaged
SETTINGS = {
    "default": lambda rules: {},
    "repeats-mean": lambda rules: dict(expert_sources=[2, 0, 2, 1], others="mean",
                                       **({"shared_sources": SHARED[rules]} if rules in SHARED else {}),
                                       **({"layout": "fused"} if FAMILIES[rules][3] else {})),
}


def ids(value: object) -> str:
    if isinstance(value, bool):
        return "exact" if value else "not-exact"
    return value if isinstance(value, str) else ",".join(f"{k}={v}" for k, v in value.items())


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A function rule file -> three tiny fine-tunes of its source model_type (seeds 0, 1, 2, with a word-level
    tokenizer), made once; skipped where the installed transformers lacks the model_type."""
    made: dict[str, list[Path]] = {}

    def make(rules: str) -> list[Path]:
        kind, overrides, _, _ = FAMILIES[rules]
        if not available(kind):
            pytest.skip(f"transformers {TRANSFORMERS} has no {kind}")
        if kind not in made:
            made[kind] = finetunes(tmp_path_factory.mktemp(kind), kind, 3, **overrides)
        return made[kind]

    return make


@pytest.fixture(scope="module")
def built(models, tmp_path_factory):
    """A function (rule file, setting) -> (plan, output folder, the three sources), upcycled once."""
    made: dict[tuple[str, str], tuple] = {}

    def build(rules: str, setting: str):
        if (rules, setting) not in made:
            sources = models(rules)
            params = SETTINGS[setting](rules)
            named = {"a": sources[1], "b": sources[2]}
            plan = surgery.plan(sources[0], rules, sources=named, **params)
            out = surgery.upcycle(sources[0], tmp_path_factory.mktemp("moe") / "out", rules, sources=named,
                                  progress=False, **params)
            made[rules, setting] = (plan, out, sources)
        return made[rules, setting]

    return build


def expert_mlp(got: dict, rules: str, layout: str, layer: int, expert: int) -> dict[str, np.ndarray]:
    """Expert `expert`'s gate, up and down projections, from whichever layout the output has."""
    if rules.startswith("experts-to-granitemoe"):  # the Hub's fused layout: input_linear [E, 2I, H], gate rows first
        moe = f"model.layers.{layer}.block_sparse_moe"
        gate_up, down = got[f"{moe}.input_linear.weight"][expert], got[f"{moe}.output_linear.weight"][expert]
    elif layout == "fused":
        experts = f"model.layers.{layer}.mlp.experts"
        gate_up, down = got[f"{experts}.gate_up_proj"][expert], got[f"{experts}.down_proj"][expert]
    else:
        return {p: got[f"model.layers.{layer}.mlp.experts.{expert}.{p}.weight"] for p in PROJ}
    half = gate_up.shape[0] // 2
    return {"gate_proj": gate_up[:half], "up_proj": gate_up[half:], "down_proj": down}


def shared_mlp(got: dict, rules: str, layer: int) -> dict[str, np.ndarray]:
    """The shared MLP's gate, up and down projections (Granite-MoE-Shared's input_linear: gate rows, then up rows)."""
    prefix = f"model.layers.{layer}.{FAMILIES[rules][2]}"
    if rules == "experts-to-granitemoeshared":
        gate_up, down = got[f"{prefix}.input_linear.weight"], got[f"{prefix}.output_linear.weight"]
        half = gate_up.shape[0] // 2
        return {"gate_proj": gate_up[:half], "up_proj": gate_up[half:], "down_proj": down}
    return {p: got[f"{prefix}.{p}.weight"] for p in PROJ}


def dense_mlp(source: dict, layer: int) -> dict[str, np.ndarray]:
    return {p: source[f"model.layers.{layer}.mlp.{p}.weight"] for p in PROJ}


def side_by_side(mlps: list[dict]) -> dict[str, np.ndarray]:
    """Several MLPs as one: their neurons concatenated (rows of gate and up, columns of down)."""
    return {p: np.concatenate([m[p] for m in mlps], axis=1 if p == "down_proj" else 0) for p in PROJ}


def expected_config(rules: str, experts: int, shared: int, layers: int) -> dict:
    """What the output config must say, per family (the facts of its single-source rule file)."""
    return {
        "experts-to-qwen3-5-moe": dict(model_type="qwen3_5_moe_text", num_experts=experts, moe_intermediate_size=96,
                                       shared_expert_intermediate_size=shared * 96),
        "experts-to-granitemoe": dict(model_type="granitemoe", num_local_experts=experts, intermediate_size=96,
                                      embedding_multiplier=3.0, residual_multiplier=0.5, logits_scaling=2.0),
        "experts-to-granitemoeshared": dict(model_type="granitemoeshared", num_local_experts=experts,
                                            intermediate_size=96, shared_intermediate_size=shared * 96,
                                            attention_multiplier=0.3),
        "experts-to-ernie4-5-moe": dict(model_type="ernie4_5_moe", moe_num_experts=experts, moe_intermediate_size=96,
                                        moe_num_shared_experts=shared, moe_layer_start_index=0,
                                        moe_layer_end_index=layers - 1, moe_layer_interval=1),
        "experts-to-hunyuan-v1-moe": dict(model_type="hunyuan_v1_moe", num_experts=experts, moe_topk=2,
                                          intermediate_size=96),
        "experts-to-cohere2-moe": dict(model_type="cohere2_moe", num_experts=experts, intermediate_size=96,
                                       num_shared_experts=shared, shared_expert_combination_strategy="sum",
                                       first_k_dense_replace=0),
    }[rules]


# ------------------------------------------------------------------------------------ experts from their sources


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("rules", FAMILIES)
def test_each_expert_is_its_sources_mlp_and_the_rest_the_base_or_the_mean(built, rules, setting):
    _, out, sources = built(rules, setting)
    got, source = tensors(out), [tensors(s) for s in sources]
    base, params = source[0], SETTINGS[setting](rules)
    chosen = params.get("expert_sources", [0, 1, 2])  # by default one expert per source, in order
    shared = params.get("shared_sources", DEFAULT_SHARED[rules])
    layers = json.loads((sources[0] / "config.json").read_text())["num_hidden_layers"]
    layout = params.get("layout", "per-expert")
    for layer in range(layers):
        for e, s in enumerate(chosen):
            mlp, want = expert_mlp(got, rules, layout, layer, e), dense_mlp(source[s], layer)
            for p in PROJ:
                assert mlp[p].tobytes() == want[p].tobytes(), (layer, e, p)
        if FAMILIES[rules][2] and shared:
            mlp, want = shared_mlp(got, rules, layer), side_by_side([dense_mlp(source[s], layer) for s in shared])
            for p in PROJ:
                assert mlp[p].tobytes() == want[p].tobytes(), (layer, "shared", p)
        elif FAMILIES[rules][2]:
            assert not any(name.startswith(f"model.layers.{layer}.{FAMILIES[rules][2]}.") for name in got)
    others = [name for name in base if ".mlp." not in name]
    assert others and not any(f"model.layers.{layer}.mlp.{p}.weight" in got for layer in range(layers) for p in PROJ)
    for name in others:
        if params.get("others", "base") == "base":
            assert got[name].tobytes() == base[name].tobytes(), name
        else:  # the float64 mean over the three sources, rounded once
            mean = sum(s[name].astype(np.float64) for s in source) / 3
            assert got[name].tobytes() == bytes(dtypes.encode(mean, "F32")), name
    config = json.loads((out / "config.json").read_text())
    expected = expected_config(rules, len(chosen), len(shared), layers)
    assert {k: config.get(k) for k in expected} == expected


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("rules", FAMILIES)
def test_transformers_loads_the_result(built, rules, setting):
    plan, out, _ = built(rules, setting)
    if loads(plan):
        pytest.skip(loads(plan))
    report = check_consumer(out)
    assert report.ok, report


@pytest.mark.parametrize("gate_mode", ["zeros", "hidden"])
def test_routers_and_their_dtypes(models, tmp_path, gate_mode):
    """ERNIE's router and correction bias and Hunyuan's router stay fp32 in a bf16 output, drawn or read from bf16
    rows of source `routers`; the others take the output's dtype."""
    for rules, router in (("experts-to-ernie4-5-moe", "mlp.gate.weight"),
                          ("experts-to-hunyuan-v1-moe", "mlp.gate.wg.weight"),
                          ("experts-to-cohere2-moe", "mlp.gate.weight"),
                          ("experts-to-granitemoe", "block_sparse_moe.router.layer.weight")):
        sources = models(rules)
        named = {"a": sources[1]}
        if gate_mode == "hidden":  # two experts' rows per layer, as `surgery mergekit-moe` writes them
            (tmp_path / rules).mkdir()
            write_routers(tmp_path / rules, np.ones((4, 2, 32), dtype=np.float32), "BF16")
            named["routers"] = tmp_path / rules
        plan = surgery.plan(sources[0], rules, sources=named, dtype="BF16", gate_mode=gate_mode)
        stored = {t.tensor.name: t.tensor.dtype for t in plan.tensors}
        fp32 = rules in ("experts-to-ernie4-5-moe", "experts-to-hunyuan-v1-moe")
        assert stored[f"model.layers.1.{router}"] == ("F32" if fp32 else "BF16"), rules
        assert stored["model.embed_tokens.weight"] == "BF16"
        if rules == "experts-to-ernie4-5-moe":
            assert stored["model.layers.1.mlp.moe_statics.e_score_correction_bias"] == "F32"


@pytest.mark.skipif(not available("qwen3_5"), reason=f"transformers {TRANSFORMERS} has no qwen3_5")
def test_qwen3_5_multimodal_experts_and_the_mean_of_the_vision_tower(tmp_path):
    """A multimodal Qwen3.5 (model.language_model, text_config) and a fine-tune of it: the language model's experts
    and shared expert from the named sources, everything else, the vision tower's MLPs too, the mean of both."""
    from safetensors.torch import load_file, save_file

    from .test_families import save_qwen3_5_multimodal

    base = save_qwen3_5_multimodal(tmp_path / "base")
    tuned = tmp_path / "tuned"
    tuned.mkdir()
    for path in base.iterdir():  # every tensor moved: another checkpoint of the same names, shapes and dtypes
        if path.suffix == ".safetensors":
            save_file({k: v + 0.01 * (1 + v.abs()) for k, v in load_file(path).items()}, tuned / path.name,
                      metadata={"format": "pt"})
        else:
            (tuned / path.name).write_bytes(path.read_bytes())
    out = surgery.upcycle(base, tmp_path / "moe", "experts-to-qwen3-5-moe", sources={"tuned": tuned},
                          expert_sources=[1, 0, 1], shared_sources=[1, 0], others="mean", progress=False)
    got, source = tensors(out), [tensors(base), tensors(tuned)]
    layer = "model.language_model.layers.3.mlp"
    for e, s in enumerate([1, 0, 1]):
        want = source[s][f"{layer}.down_proj.weight"]
        assert got[f"{layer}.experts.{e}.down_proj.weight"].tobytes() == want.tobytes(), e
    assert got[f"{layer}.shared_expert.gate_proj.weight"].tobytes() == np.concatenate(
        [source[1][f"{layer}.gate_proj.weight"], source[0][f"{layer}.gate_proj.weight"]]).tobytes()
    vision = [n for n in source[0] if n.startswith("model.visual.")]
    assert any(".mlp." in n for n in vision)
    for name in [*vision, "model.language_model.embed_tokens.weight",
                 "model.language_model.layers.3.self_attn.q_proj.weight"]:
        mean = (source[0][name].astype(np.float64) + source[1][name]) / 2
        assert got[name].tobytes() == bytes(dtypes.encode(mean, "F32")), name
    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"], config["vision_config"]["model_type"]) == ("qwen3_5_moe", "qwen3_5_moe_vision")
    text = config["text_config"]
    assert (text["model_type"], text["num_experts"], text["shared_expert_intermediate_size"]) == \
        ("qwen3_5_moe_text", 3, 2 * 96)
    assert check_consumer(out).ok


# -------------------------------------------------------------------------------- the function, from one source


#: rule file -> [(parameters with every expert from the base, whether plan calls it exact)]
EXACT = {
    "experts-to-qwen3-5-moe": [(dict(expert_sources=[0, 0, 0]), False)],  # the gated shared expert adds an MLP
    "experts-to-granitemoe": [(dict(expert_sources=[0, 0, 0]), True),
                              (dict(expert_sources=[0, 0], experts_per_token=1), True)],
    "experts-to-granitemoeshared": [(dict(expert_sources=[0, 0, 0], shared_sources=[]), True),
                                    (dict(expert_sources=[0, 0, 0]), False)],
    "experts-to-ernie4-5-moe": [(dict(expert_sources=[0, 0, 0]), True),
                                (dict(expert_sources=[0, 0], layout="fused"), True),
                                (dict(expert_sources=[0, 0, 0], shared_sources=[0]), False)],
    "experts-to-hunyuan-v1-moe": [(dict(expert_sources=[0, 0, 0]), False)],  # the shared MLP is always added
    "experts-to-cohere2-moe": [(dict(expert_sources=[0, 0, 0]), True),
                               (dict(expert_sources=[0, 0, 0], layout="fused"), True),
                               (dict(expert_sources=[0, 0, 0], shared_sources=[0]), False)],
}


@pytest.mark.parametrize("rules,params,exact", [(r, p, x) for r, cases in EXACT.items() for p, x in cases], ids=ids)
def test_every_expert_from_the_base_is_the_dense_function_where_plan_says_so(models, tmp_path, rules, params, exact):
    base = models(rules)[0]
    plan = surgery.plan(base, rules, **params)
    assert plan.exact[0] == exact, plan.exact
    if loads(plan):
        pytest.skip(loads(plan))
    out = surgery.upcycle(base, tmp_path / "moe", rules, progress=False, **params)
    dense = logits(base)
    diff = (logits(out) - dense).abs().max().item()
    tolerance = 1e-5 * max(1.0, dense.abs().max().item())
    assert (diff <= tolerance) == exact, f"max |logit diff| {diff:.3g}, exact: {plan.exact}"
    assert all(layer.same == exact for layer in check_numeric(plan, out))  # the numeric_check names the right modules


# ---------------------------------------------------------------------------------------- surgery mergekit-moe


#: rule file -> (the experts' sources, the shared experts' sources, extra fields of the YAML's first expert)
MERGEKIT = {
    "experts-to-qwen3-5-moe": ([0, 1, 2], [1], {}),
    "experts-to-granitemoe": ([1, 2, 0], [], {"noise_scale": 0.01}),
    "experts-to-granitemoeshared": ([0, 1], [2, 1], {}),
    "experts-to-ernie4-5-moe": ([2, 0, 1], [], {}),
    "experts-to-hunyuan-v1-moe": ([1, 2], [0], {"residual_scale": 0.5}),
    "experts-to-cohere2-moe": ([0, 2, 1], [1, 2], {"residual_scale": 0.25}),
}


def same_output(a: Path, b: Path) -> None:
    """The same tensors (names, dtypes, shapes, bytes) and the same config."""
    x, y = tensors(a), tensors(b)
    assert sorted(x) == sorted(y)
    for name in x:
        assert (x[name].dtype, x[name].shape) == (y[name].dtype, y[name].shape), name
        assert x[name].tobytes() == y[name].tobytes(), name
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())


@pytest.mark.parametrize("rules", MERGEKIT)
def test_mergekit_moe_picks_the_family_and_writes_what_the_rule_file_does(models, tmp_path, rules):
    sources = models(rules)
    experts, shared, extra = MERGEKIT[rules]
    fields = {"experts_per_token": 2}
    if shared:
        fields["shared_experts"] = [{"source_model": str(sources[s])} for s in shared]
    config = write_config(tmp_path, sources[0], [sources[s] for s in experts], "random", **fields)
    doc = yaml.safe_load(config.read_text())
    doc["experts"][0].update(extra)
    config.write_text(yaml.safe_dump(doc))
    assert select_rules(load_config(config), FAMILIES[rules][0]).name == rules
    result = run("mergekit-moe", config, tmp_path / "mergekit", "-q", "--no-check")
    assert result.exit_code == 0, result.output
    # the same with the rule file: sources in the order mergekit-moe numbers them (base first, then new models)
    order = list(dict.fromkeys([0, *experts, *shared]))
    args = ["-p", f"expert_sources={','.join(str(order.index(s)) for s in experts)}", "-p", "gate_mode=random",
            "-k", "2"]
    if shared:
        args += ["-p", f"shared_sources={','.join(str(order.index(s)) for s in shared)}"]
    for key, value in extra.items():  # the first expert's; the others keep mergekit's defaults
        scales = [value] + [0.0 if key == "noise_scale" else 1.0] * (len(experts) - 1)
        args += ["-p", f"{key}s={','.join(map(str, scales))}"]
    named = [arg for i, s in enumerate(order[1:]) for arg in ("--source", f"m{i}={sources[s]}")]
    result = run("upcycle", sources[0], tmp_path / "upcycle", "-r", rules, *named, *args, "-q", "--no-check")
    assert result.exit_code == 0, result.output
    same_output(tmp_path / "mergekit", tmp_path / "upcycle")


def test_mergekit_moe_with_cheap_embed_routers(models, tmp_path):
    """ERNIE-4.5-MoE from prompts (cheap_embed, bf16, a shared expert): the routers mergekit-moe computes, written in
    fp32 as the rule file declares (ERNIE's router is fp32) and stored unrounded; the same bytes as the rule file
    given those routers."""
    rules = "experts-to-ernie4-5-moe"
    sources = models(rules)
    config = write_config(tmp_path, sources[0], sources, "cheap_embed", dtype="bfloat16", experts_per_token=2,
                          shared_experts=[{"source_model": str(sources[1]), **PROMPTS[3]}])
    result = run("mergekit-moe", config, tmp_path / "mergekit", "-q", "--no-check")
    assert result.exit_code == 0, result.output
    prompts = [Prompts(tuple(p["positive_prompts"]), tuple(p.get("negative_prompts", ()))) for p in PROMPTS]
    rows = router_rows(open_source(sources[0]), prompts[:3], "cheap_embed")
    (tmp_path / "routers").mkdir()
    write_routers(tmp_path / "routers", rows, "F32")
    result = run("upcycle", sources[0], tmp_path / "upcycle", "-r", rules, "--source", f"a={sources[1]}",
                 "--source", f"b={sources[2]}", "--source", f"routers={tmp_path / 'routers'}",
                 "-p", "expert_sources=0,1,2", "-p", "shared_sources=1", "-p", "gate_mode=cheap_embed", "-k", "2",
                 "--dtype", "bf16", "-q", "--no-check")
    assert result.exit_code == 0, result.output
    same_output(tmp_path / "mergekit", tmp_path / "upcycle")
    got = tensors(tmp_path / "mergekit")
    router = got["model.layers.1.mlp.gate.weight"]
    assert router.dtype == np.float32 and router.shape == (3, 32)
    assert np.array_equal(router, rows[1])  # fp32, not rounded to bf16 on the way
    assert (router.view(np.uint32) & 0xFFFF).any()
    assert got["model.layers.1.mlp.shared_experts.up_proj.weight"].dtype == np.uint16  # bf16, as the YAML says


def test_mergekit_moe_hidden_routers_of_a_qwen3_5(models, tmp_path):
    """mergekit-moe's default gate mode on Qwen3.5, whose one-layer models of linear-attention layers run without a
    cache: the routers and the shared expert's gate follow mergekit's definitions (the whole model, here)."""
    from .test_mergekit import bf16, reference_routers

    sources = models("experts-to-qwen3-5-moe")
    config = write_config(tmp_path, sources[0], sources, "hidden", dtype="bfloat16",
                          shared_experts=[{"source_model": str(sources[1]), **PROMPTS[3]}])
    result = run("mergekit-moe", config, tmp_path / "out", "-q", "--no-check")
    assert result.exit_code == 0, result.output
    got = tensors(tmp_path / "out")
    expected = reference_routers(sources[0], PROMPTS, "hidden")  # [layers, 4, hidden]: three experts, one shared
    for layer in range(expected.shape[0]):
        router = dtypes.decode(got[f"model.layers.{layer}.mlp.gate.weight"].tobytes(), "BF16").reshape(3, 32)
        assert np.abs(router - bf16(expected[layer, :3])).max() <= 2**-8, layer
        gate = dtypes.decode(got[f"model.layers.{layer}.mlp.shared_expert_gate.weight"].tobytes(), "BF16")
        assert np.abs(gate - bf16(expected[layer, 3])).max() <= 2**-8, layer  # one shared expert: its row


def test_qwen3_5_multi_token_prediction_layers_take_the_last_layers_router_rows(models, tmp_path):
    """mtp.layers.N (which transformers does not load) get experts like the decoder layers, and router rows from
    prompts of the last decoder layer, not of decoder layer N."""
    import shutil

    from safetensors.numpy import save_file

    base = shutil.copytree(models("experts-to-qwen3-5-moe")[0], tmp_path / "base")
    dense = tensors(base)
    mtp = {f"mtp.layers.0.mlp.{p}.weight": dense[f"model.layers.3.mlp.{p}.weight"] * 2 for p in PROJ}
    save_file(mtp, base / "mtp.safetensors", metadata={"format": "pt"})
    index = json.loads((base / "model.safetensors.index.json").read_text())
    index["weight_map"].update(dict.fromkeys(mtp, "mtp.safetensors"))
    (base / "model.safetensors.index.json").write_text(json.dumps(index))
    rows = np.arange(4 * 2 * 32, dtype=np.float32).reshape(4, 2, 32) / 256
    (tmp_path / "routers").mkdir()
    write_routers(tmp_path / "routers", rows, "F32", shared=rows[:, :1])
    out = surgery.upcycle(base, tmp_path / "moe", "experts-to-qwen3-5-moe", sources={"routers": tmp_path / "routers"},
                          expert_sources=[0, 0], gate_mode="hidden", progress=False)
    got, prefix = tensors(out), "mtp.layers.0.mlp"
    assert got[f"{prefix}.experts.1.down_proj.weight"].tobytes() == mtp[f"{prefix}.down_proj.weight"].tobytes()
    assert got[f"{prefix}.shared_expert.up_proj.weight"].tobytes() == mtp[f"{prefix}.up_proj.weight"].tobytes()
    assert got["mtp.layers.0.mlp.gate.weight"].tobytes() == rows[3].tobytes()
    assert got["mtp.layers.0.mlp.shared_expert_gate.weight"].tobytes() == rows[3, :1].tobytes()
    assert got["model.layers.0.mlp.gate.weight"].tobytes() == rows[0].tobytes()


@pytest.mark.parametrize("shared,expected", [(False, "experts-to-granitemoe"), (True, "experts-to-granitemoeshared")])
def test_granite_takes_the_shared_target_only_with_shared_experts(models, tmp_path, shared, expected):
    sources = models("experts-to-granitemoe")
    fields = {"shared_experts": [{"source_model": str(sources[2])}]} if shared else {}
    config = write_config(tmp_path, sources[0], sources[:2], "random", **fields)
    result = run("mergekit-moe", config, tmp_path / "out", "-q", "--no-check")
    assert result.exit_code == 0, result.output
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["model_type"] == expected.removeprefix("experts-to-")
    assert f"experts-to-{written['model_type']}" in (tmp_path / "out" / "README.md").read_text()


@pytest.mark.parametrize("rules,fields,message", [
    ("experts-to-qwen3-5-moe", {}, "qwen3_5_moe_text always has a shared expert: give shared_experts"),
    ("experts-to-hunyuan-v1-moe", {}, "hunyuan_v1_moe always has a shared expert: give shared_experts"),
    ("experts-to-hunyuan-v1-moe", {"shared_experts": [1, 2]}, "shared_sources must name exactly one source, got 2"),
])
def test_what_a_family_cannot_hold_is_one_error_line(models, tmp_path, rules, fields, message):
    sources = models(rules)
    if "shared_experts" in fields:
        fields = {"shared_experts": [{"source_model": str(sources[s])} for s in fields["shared_experts"]]}
    config = write_config(tmp_path, sources[0], sources[:2], "random", **fields)
    assert_one_line_error(run("mergekit-moe", config, tmp_path / "out", "-q"), message)
    assert not (tmp_path / "out").exists()
