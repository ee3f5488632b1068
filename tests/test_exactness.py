"""Every built-in rule file's exactness claim, checked against transformers: where `plan` says the output computes
the source model's function at init, the logits match the dense model's (fp32, to 1e-5 x max(1, max |logit|));
where it says not, they differ."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

import surgery
from surgery.rules import builtin_rule_names

from .tiny_models import save_tiny

#: a tiny model whose intermediate size splits into 2, 3, 4, 6 and 8 parts, with four layers
QWEN = dict(intermediate_size=96, num_hidden_layers=4)
#: tiny random MoE models (not upcycled: their experts differ)
MIXTRAL = dict(num_local_experts=4)
QWEN_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, intermediate_size=48)
EXACT, NOT_EXACT, NOT_CLAIMED = "exact", "differs", "not claimed"
#: tiny models of the other families (transformers 5 only: qwen3_5_text, cohere2_moe): every part exercised
QWEN3_5 = dict(intermediate_size=96, num_hidden_layers=4, head_dim=8, linear_key_head_dim=8, linear_value_head_dim=8,
               linear_num_key_heads=2, linear_num_value_heads=4)  # layers 0-2 linear attention, 3 full attention
GRANITE = dict(intermediate_size=96, embedding_multiplier=3.0, residual_multiplier=0.5, attention_multiplier=0.3,
               logits_scaling=2.0)
ERNIE = dict(intermediate_size=96, num_hidden_layers=4, head_dim=16)  # head_dim != hidden_size // heads
HUNYUAN = dict(intermediate_size=96, head_dim=8)
#: sliding layers that matter on 16 tokens, a full-attention layer 0 (no rotary there), a rope theta not the default
COHERE2 = dict(intermediate_size=96, num_hidden_layers=4, sliding_window=4, logit_scale=0.5,
               layer_types=["full_attention", "sliding_attention", "sliding_attention", "full_attention"],
               rope_parameters={"rope_type": "default", "rope_theta": 5000.0})
OLMO2 = dict(intermediate_size=96)
OLMO3 = dict(intermediate_size=96, num_hidden_layers=4, sliding_window=4)  # layers 0-2 slide over 4 tokens

#: rule file -> (tiny source model_type, its config overrides, [(parameters, expected outcome)])
CASES: dict[str, tuple[str, dict, list[tuple[dict, str]]]] = {
    "mistral-to-mixtral": ("mistral", dict(intermediate_size=96), [
        (dict(num_experts=1, experts_per_token=1), EXACT),
        (dict(num_experts=4, experts_per_token=2), EXACT),
        (dict(num_experts=3, experts_per_token=3, router_init="uniform"), EXACT),
        (dict(num_experts=8, experts_per_token=2, router_init="zeros"), EXACT),
        (dict(num_experts=4, experts_per_token=2, granularity=2), EXACT),
        (dict(num_experts=8, experts_per_token=4, granularity=4, router_init="orthogonal"), EXACT),
        (dict(num_experts=4, experts_per_token=1, granularity=2), NOT_EXACT),
        (dict(num_experts=4, experts_per_token=2, granularity=2, router_init="zeros"), NOT_CLAIMED),
        (dict(num_experts=4, experts_per_token=2, drop_ratio=0.5), NOT_EXACT),
        (dict(num_experts=4, experts_per_token=2, expert_noise=0.1), NOT_EXACT),
    ]),
    "llama-to-mixtral": ("llama", {}, [
        (dict(num_experts=4, experts_per_token=1), EXACT),
        (dict(num_experts=2, experts_per_token=2), EXACT),
        (dict(num_experts=4, experts_per_token=2, granularity=2), EXACT),
    ]),
    "qwen2-to-qwen2-moe": ("qwen2", QWEN, [
        (dict(num_experts=4, experts_per_token=2), EXACT),
        (dict(num_experts=4, experts_per_token=2, granularity=2), EXACT),
        (dict(num_experts=6, experts_per_token=3, shared_experts=3, granularity=3), EXACT),
        (dict(num_experts=4, experts_per_token=2, moe_layers="1:4:2"), EXACT),
        (dict(num_experts=4, experts_per_token=2, granularity=2, moe_layers="1:"), EXACT),
        (dict(num_experts=4, experts_per_token=2, norm_topk_prob=False), NOT_EXACT),
        (dict(num_experts=4, experts_per_token=1, granularity=2), NOT_EXACT),
    ]),
    # MoE -> dense, expert selection and depth surgery claim nothing: on random (not upcycled) MoE models and
    # on a deeper model, the logits must differ
    "mixtral-to-mistral": ("mixtral", MIXTRAL, [({}, NOT_EXACT), (dict(mode="expert", expert=1), NOT_EXACT)]),
    "mixtral-select-experts": ("mixtral", MIXTRAL, [(dict(keep=[2, 0]), NOT_EXACT)]),
    "qwen3-moe-to-qwen3": ("qwen3_moe", QWEN_MOE, [({}, NOT_EXACT)]),
    "qwen3-moe-select-experts": ("qwen3_moe", QWEN_MOE, [(dict(drop=[1]), NOT_EXACT)]),
    "qwen2-moe-to-qwen2": ("qwen2_moe", {**QWEN_MOE, "shared_expert_intermediate_size": 48}, [({}, NOT_EXACT)]),
    "qwen2-moe-select-experts": ("qwen2_moe", {**QWEN_MOE, "shared_expert_intermediate_size": 48},
                                 [(dict(keep=[3, 2, 1]), NOT_EXACT)]),
    "depth-upscale": ("llama", {}, [(dict(layers="0:2,1:2"), NOT_EXACT)]),
    "qwen3-to-qwen3-moe": ("qwen3", QWEN, [
        (dict(num_experts=4, experts_per_token=2), EXACT),
        (dict(num_experts=4, experts_per_token=2, granularity=2), EXACT),
        (dict(num_experts=8, experts_per_token=4, granularity=4), EXACT),
        (dict(num_experts=4, experts_per_token=2, moe_layers="1:4:2"), EXACT),
        (dict(num_experts=4, experts_per_token=2, norm_topk_prob=False), NOT_EXACT),
        (dict(num_experts=4, experts_per_token=2, drop_ratio=0.5, granularity=2), NOT_EXACT),
    ]),
    "qwen3-5-to-qwen3-5-moe": ("qwen3_5_text", QWEN3_5, [
        (dict(num_experts=1, experts_per_token=1), EXACT),
        (dict(num_experts=4, experts_per_token=2), EXACT),
        (dict(num_experts=4, experts_per_token=2, shared_experts=2, granularity=2, layout="fused"), EXACT),
        (dict(num_experts=4, experts_per_token=1, granularity=2), NOT_EXACT),
        (dict(num_experts=4, experts_per_token=2, expert_noise=0.1), NOT_EXACT),
    ]),
    "granite-to-granitemoe": ("granite", GRANITE, [
        (dict(num_experts=1, experts_per_token=1), EXACT),
        (dict(num_experts=4, experts_per_token=2), EXACT),
        (dict(num_experts=8, experts_per_token=4, granularity=4), EXACT),
        (dict(num_experts=4, experts_per_token=1, granularity=2), NOT_EXACT),
        (dict(num_experts=4, experts_per_token=2, drop_ratio=0.5), NOT_EXACT),
    ]),
    "granite-to-granitemoeshared": ("granite", GRANITE, [
        (dict(num_experts=1, experts_per_token=1), EXACT),
        (dict(num_experts=4, experts_per_token=2), EXACT),
        (dict(num_experts=4, experts_per_token=2, shared_experts=2, granularity=2), EXACT),
        (dict(num_experts=4, experts_per_token=2, shared_experts=0), EXACT),
        (dict(num_experts=4, experts_per_token=2, expert_noise=0.1), NOT_EXACT),
    ]),
    "ernie4-5-to-ernie4-5-moe": ("ernie4_5", ERNIE, [
        (dict(num_experts=1, experts_per_token=1), EXACT),
        (dict(num_experts=4, experts_per_token=2), EXACT),
        (dict(num_experts=4, experts_per_token=2, shared_experts=2, granularity=2), EXACT),
        (dict(num_experts=4, experts_per_token=2, moe_layers="1:"), EXACT),
        (dict(num_experts=4, experts_per_token=2, shared_experts=1, moe_layers="1:4:2", layout="fused"), EXACT),
        (dict(num_experts=4, experts_per_token=1, granularity=2), NOT_EXACT),
    ]),
    "hunyuan-v1-dense-to-hunyuan-v1-moe": ("hunyuan_v1_dense", HUNYUAN, [
        (dict(num_experts=1, experts_per_token=1), EXACT),
        (dict(num_experts=4, experts_per_token=2), EXACT),
        (dict(num_experts=4, experts_per_token=2, granularity=2, layout="fused"), EXACT),
        (dict(num_experts=4, experts_per_token=1, granularity=2), NOT_EXACT),
    ]),
    "cohere2-to-cohere2-moe": ("cohere2", COHERE2, [
        (dict(num_experts=1, experts_per_token=1), EXACT),
        (dict(num_experts=4, experts_per_token=2), EXACT),
        (dict(num_experts=4, experts_per_token=2, shared_experts=1, granularity=2), EXACT),
        (dict(num_experts=4, experts_per_token=2, moe_layers="1:"), EXACT),
        (dict(num_experts=4, experts_per_token=2, shared_experts=2, moe_layers="2:", layout="fused"), EXACT),
        (dict(num_experts=4, experts_per_token=1, granularity=2), NOT_EXACT),
    ]),
    "olmo2-to-flex-olmo": ("olmo2", OLMO2, [
        (dict(num_experts=1, experts_per_token=1), EXACT),
        (dict(num_experts=4, experts_per_token=2), EXACT),
        (dict(num_experts=4, experts_per_token=2, granularity=2, layout="fused"), EXACT),
        (dict(num_experts=4, experts_per_token=2, norm_topk_prob=False), NOT_EXACT),
    ]),
    # OLMo 3's sliding-window layers: never the same function (tests/test_families.py checks the exact case)
    "olmo3-to-flex-olmo": ("olmo3", OLMO3, [
        (dict(num_experts=1, experts_per_token=1), NOT_EXACT),
        (dict(num_experts=4, experts_per_token=2), NOT_EXACT),
    ]),
    # layout conversions of random MoE models (their per-expert experts re-laid out, or copied as they are)
    "mixtral-layout": ("mixtral", MIXTRAL, [(dict(layout="fused"), EXACT), (dict(layout="per-expert"), EXACT)]),
    "qwen2-moe-layout": ("qwen3_moe", QWEN_MOE, [(dict(layout="fused"), EXACT), (dict(layout="per-expert"), EXACT)]),
    # experts from several checkpoints, here from the base alone (tests/test_mergekit.py: several sources)
    "experts-to-mixtral": ("mistral", dict(intermediate_size=96), [
        (dict(experts_per_token=1), EXACT),
        (dict(expert_sources=[0, 0, 0], experts_per_token=2, gate_mode="uniform_random", layout="fused"), EXACT),
        (dict(expert_sources=[0, 0], experts_per_token=2, residual_scales=[1.0, 0.5]), NOT_EXACT),
        (dict(expert_sources=[0, 0], experts_per_token=2, noise_scales=[0.0, 0.1]), NOT_EXACT),
    ]),
    "experts-to-qwen3-moe": ("qwen3", QWEN, [
        (dict(expert_sources=[0, 0], experts_per_token=2), EXACT),
        (dict(expert_sources=[0, 0], experts_per_token=1, norm_topk_prob=False), NOT_EXACT),
    ]),
    "experts-to-qwen2-moe": ("qwen2", QWEN, [(dict(expert_sources=[0, 0], experts_per_token=2), NOT_EXACT)]),
    "experts-to-flex-olmo": ("olmo2", OLMO2, [
        (dict(expert_sources=[0, 0], experts_per_token=2), EXACT),
        (dict(expert_sources=[0, 0, 0], experts_per_token=2, norm_topk_prob=False), NOT_EXACT),
    ]),
    # experts from several checkpoints of the other families: tests/test_experts_families.py checks their claims
    "experts-to-qwen3-5-moe": ("qwen3_5_text", QWEN3_5, []),
    "experts-to-granitemoe": ("granite", GRANITE, []),
    "experts-to-granitemoeshared": ("granite", GRANITE, []),
    "experts-to-ernie4-5-moe": ("ernie4_5", ERNIE, []),
    "experts-to-hunyuan-v1-moe": ("hunyuan_v1_dense", HUNYUAN, []),
    "experts-to-cohere2-moe": ("cohere2", COHERE2, []),
    # these read a dense model as a second source: tests/test_mergekit.py checks them
    "mixtral-add-experts": ("mixtral", MIXTRAL, []),
    "qwen-moe-add-experts": ("qwen3_moe", QWEN_MOE, []),
}


def test_every_builtin_rule_file_has_exactness_cases():
    assert sorted(CASES) == builtin_rule_names()


def available(model_type: str) -> bool:
    """Whether the installed transformers knows `model_type` (qwen3_5_text and cohere2_moe need transformers 5)."""
    return model_type in transformers.CONFIG_MAPPING


def loads(plan) -> str | None:
    """Why the installed transformers cannot load the planned output, or None if it can."""
    if not available(plan.config["model_type"]):
        return f"transformers {transformers.__version__} has no {plan.config['model_type']}"
    if plan.params.get("layout") == "fused" and int(transformers.__version__.split(".")[0]) < 5:
        return f"transformers {transformers.__version__} loads no fused experts"
    return None


def logits(folder) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> dict[str, tuple]:
    """model_type -> (folder, logits) of its tiny model."""
    made = {}
    for kind, overrides, _ in CASES.values():
        if kind not in made and available(kind):
            folder = save_tiny(kind, tmp_path_factory.mktemp("dense") / kind, shards=2, seed=3, **overrides)
            made[kind] = (folder, logits(folder))
    return made


@pytest.mark.parametrize("rules,params,outcome", [(r, p, o) for r, (_, _, cases) in CASES.items() for p, o in cases],
                         ids=lambda v: v if isinstance(v, str) else ",".join(f"{k}={x}" for k, x in v.items()))
def test_claim_holds(dense, tmp_path, rules, params, outcome):
    if CASES[rules][0] not in dense:
        pytest.skip(f"transformers {transformers.__version__} has no {CASES[rules][0]}")
    src, dense_logits = dense[CASES[rules][0]]
    plan = surgery.plan(src, rules, **params)
    verdict, why = plan.exact
    assert verdict == (outcome == EXACT), f"{rules} {params}: plan says exact={verdict} ({why})"
    if outcome == NOT_CLAIMED:
        return  # not guaranteed either way (e.g. tied logits: top-k may or may not mix copies)
    if loads(plan):
        pytest.skip(loads(plan))
    out = surgery.upcycle(src, tmp_path / "moe", rules, progress=False, **params)
    diff = (logits(out) - dense_logits).abs().max().item()
    tolerance = 1e-5 * max(1.0, dense_logits.abs().max().item())
    assert (diff <= tolerance) == (outcome == EXACT), f"{rules} {params}: max |logit diff| {diff:.3g}"
