"""Every built-in rule file's exactness claim, checked against transformers: where `plan` says the output computes
the source model's function at init, the logits match the dense model's (fp32); where it says not, they differ."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import surgery
from surgery.rules import builtin_rule_names

from .tiny_models import save_tiny

#: rule file -> (tiny source model kind, parameter sets to try)
CASES: dict[str, tuple[str, list[dict]]] = {
    "mistral-to-mixtral": ("mistral", [
        dict(num_experts=1, experts_per_token=1), dict(num_experts=4, experts_per_token=2),
        dict(num_experts=3, experts_per_token=3, router_init="uniform"), dict(num_experts=8, experts_per_token=2,
                                                                                router_init="zeros"),
    ]),
    "llama-to-mixtral": ("llama", [dict(num_experts=4, experts_per_token=1), dict(num_experts=2, experts_per_token=2)]),
}


def test_every_builtin_rule_file_has_exactness_cases():
    assert sorted(CASES) == builtin_rule_names()


def logits(folder) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("rules,params", [(r, p) for r, (_, sets) in CASES.items() for p in sets],
                         ids=lambda v: v if isinstance(v, str) else ",".join(f"{k}={x}" for k, x in v.items()))
def test_claim_holds(tmp_path_factory, rules, params):
    kind, _ = CASES[rules]
    src = save_tiny(kind, tmp_path_factory.mktemp("dense") / kind, shards=2, seed=3)
    plan = surgery.plan(src, rules, **params)
    verdict, _ = plan.exact
    assert verdict is not None, f"{rules} makes no exactness claim"
    out = surgery.upcycle(src, tmp_path_factory.mktemp("out") / "moe", rules, progress=False, **params)
    dense, moe = logits(src), logits(out)
    close = (moe - dense).abs().max().item() <= 1e-5 * max(1.0, dense.abs().max().item())
    assert close == verdict, f"{rules} {params}: plan says exact={verdict}, logits close={close}"
