"""Upcycling methods beyond identical copies: Drop-Upcycling's re-drawn neurons, noise, `verify --numeric`, and
one-line errors for every setting a target cannot express."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import surgery
from surgery.numeric import check_numeric

from .test_cli import assert_one_line_error, run
from .test_exactness import CASES, EXACT, available
from .tiny_models import save_tiny

ROOT = Path(__file__).resolve().parent.parent
MOE = ["-e", "4", "-k", "2", "-q"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """model_type -> a tiny source model (four layers, intermediate 96), as the exactness cases use."""
    made = {}
    for kind, overrides, _ in CASES.values():
        if kind not in made and available(kind):
            made[kind] = save_tiny(kind, tmp_path_factory.mktemp("src") / kind, shards=2, seed=3, **overrides)
    return made


def tensors(folder: Path) -> dict[str, np.ndarray]:
    out = {}
    for shard in folder.glob("*.safetensors"):
        out.update(load_file(shard))
    return out


# ----------------------------------------------------------------------------------------------- Drop-Upcycling


def changed(original: np.ndarray, upcycled: np.ndarray, axis: int) -> set[int]:
    """The rows (axis 0) or columns (axis 1) that differ."""
    return set(np.flatnonzero((original != upcycled).any(axis=1 - axis)).tolist())


def test_drop_upcycling_redraws_one_set_of_neurons_per_expert(models, tmp_path):
    src, ratio, experts = models["mistral"], 0.5, 4
    out = surgery.upcycle(src, tmp_path / "out", "mistral-to-mixtral", experts, 2, drop_ratio=ratio, progress=False)
    again = surgery.upcycle(src, tmp_path / "again", "mistral-to-mixtral", experts, 2, drop_ratio=ratio,
                            progress=False)
    dense, moe = tensors(src), tensors(out)
    assert all(moe[k].tobytes() == v.tobytes() for k, v in tensors(again).items())  # same seed, same bytes
    for layer in range(surgery.open_checkpoint(src).config["num_hidden_layers"]):
        gate, up, down = (dense[f"model.layers.{layer}.mlp.{n}_proj.weight"] for n in ("gate", "up", "down"))
        neurons = gate.shape[0]
        sets = []
        for e in range(experts):
            expert = f"model.layers.{layer}.block_sparse_moe.experts.{e}"
            w1, w3, w2 = moe[f"{expert}.w1.weight"], moe[f"{expert}.w3.weight"], moe[f"{expert}.w2.weight"]
            chosen = changed(gate, w1, 0)
            assert len(chosen) == math.floor(ratio * neurons)
            assert changed(up, w3, 0) == chosen and changed(down, w2, 1) == chosen  # one draw for all three
            kept = sorted(set(range(neurons)) - chosen)
            assert w1[kept].tobytes() == gate[kept].tobytes() and w2[:, kept].tobytes() == down[:, kept].tobytes()
            picked = sorted(chosen)
            for original, redrawn in ((gate[picked], w1[picked]), (down[:, picked], w2[:, picked])):
                n = original.size  # N(mean, std) of what they replace, within sampling error
                assert abs(redrawn.mean() - original.mean()) < 5 * original.std() / math.sqrt(n)
                assert abs(redrawn.std() / original.std() - 1) < 5 / math.sqrt(2 * n)
            sets.append(chosen)
        assert len({frozenset(s) for s in sets}) == experts, "every expert re-draws its own neurons"
    assert not any(".mlp." in name for name in moe)


def test_expert_noise_is_relative_and_per_expert(models, tmp_path):
    src = models["mistral"]
    out = surgery.upcycle(src, tmp_path / "out", "mistral-to-mixtral", 2, 1, expert_noise=0.1, progress=False)
    dense, moe = tensors(src), tensors(out)
    gate = dense["model.layers.0.mlp.gate_proj.weight"]
    noises = [moe[f"model.layers.0.block_sparse_moe.experts.{e}.w1.weight"] - gate for e in range(2)]
    for noise in noises:
        assert abs(noise.std() / (0.1 * gate.std()) - 1) < 0.15
    assert not np.array_equal(noises[0], noises[1])


# ----------------------------------------------------------------------------------------------- verify --numeric


EXACT_CASES = [(rules, params) for rules, (_, _, cases) in CASES.items() for params, outcome in cases
               if outcome == EXACT and "router_init" not in params][:12]


@pytest.mark.parametrize("rules,params", EXACT_CASES,
                         ids=lambda v: v if isinstance(v, str) else ",".join(f"{k}={x}" for k, x in v.items()))
def test_numeric_check_passes_on_exact_recipes(models, tmp_path, rules, params):
    src = models[CASES[rules][0]]
    out = surgery.upcycle(src, tmp_path / "out", rules, progress=False, **params)
    results = check_numeric(surgery.plan(src, rules, **params), out)
    layers = surgery.open_checkpoint(src).config["num_hidden_layers"]
    assert len(results) == layers and all(r.same for r in results), results


def test_numeric_check_finds_a_corrupted_expert(models, tmp_path):
    from safetensors.numpy import save_file

    src = models["qwen3"]
    out = surgery.upcycle(src, tmp_path / "out", "qwen3-to-qwen3-moe", 4, 2, granularity=2, progress=False)
    assert "4 of 4 layers compute the source's function" in run("verify", src, out, "-r", "qwen3-to-qwen3-moe",
                                                                 *MOE, "--granularity", "2", "--numeric").output
    shard = next(p for p in out.glob("*.safetensors") if "model.layers.2.mlp.experts.3.down_proj.weight" in load_file(p))
    content = load_file(shard)
    content["model.layers.2.mlp.experts.3.down_proj.weight"] = content["model.layers.2.mlp.experts.3.down_proj.weight"] * 1.5
    save_file(content, shard, metadata={"format": "pt"})
    assert_one_line_error(run("verify", src, out, "-r", "qwen3-to-qwen3-moe", *MOE, "--granularity", "2", "--numeric"),
                          "layer 2 differs from the source", "but the recipe is exact")


def test_numeric_check_reports_without_failing_a_recipe_that_is_not_exact(models, tmp_path):
    src = models["mistral"]
    out = surgery.upcycle(src, tmp_path / "out", "mistral-to-mixtral", 4, 2, drop_ratio=0.5, progress=False)
    result = run("verify", src, out, "-r", "mistral-to-mixtral", *MOE, "--drop-ratio", "0.5", "--numeric")
    assert result.exit_code == 0 and "function-preserving at init: no (Drop-Upcycling" in result.output
    assert "0 of 2 layers compute the source's function" in result.output


def test_numeric_check_without_torch_says_what_to_install(models, tmp_path):
    src = models["mistral"]
    out = surgery.upcycle(src, tmp_path / "out", "mistral-to-mixtral", 2, 1, progress=False)
    script = ("import sys; sys.modules['torch'] = None; from surgery.cli import main; "
              f"main(['verify', {str(src)!r}, {str(out)!r}, '-r', 'mistral-to-mixtral', '-e', '2', '-k', '1', "
              "'--numeric', '-q'])")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 1 and 'pip install "weight-surgery[verify]"' in result.stderr


# ----------------------------------------------------------------------------------------------- bad input


BAD = [
    ("mistral", "mistral-to-mixtral", ["-e", "4", "-k", "2", "--granularity", "3"], "multiple of granularity"),
    ("mistral", "mistral-to-mixtral", ["-e", "5", "-k", "2", "--granularity", "5"],
     "intermediate_size (96) must be a multiple of granularity (5)"),
    ("mistral", "mistral-to-mixtral", ["-e", "4", "-k", "2", "--shared-experts", "1"], "Mixtral has no shared expert"),
    ("qwen3", "qwen3-to-qwen3-moe", ["-e", "4", "-k", "2", "--shared-experts", "1"], "Qwen3-MoE has no shared expert"),
    ("mistral", "mistral-to-mixtral", ["-e", "4", "-k", "2", "--moe-layers", "1:"], "every layer an MoE layer"),
    ("qwen3", "qwen3-to-qwen3-moe", ["-e", "4", "-k", "2", "--moe-layers", "1:5"], "goes outside 0:4"),
    ("qwen3", "qwen3-to-qwen3-moe", ["-e", "4", "-k", "2", "--moe-layers", "4"], "4 is not from 0 to 3"),
    ("qwen3", "qwen3-to-qwen3-moe", ["-e", "4", "-k", "2", "--moe-layers", "3:1"], "is empty"),
    ("qwen2", "qwen2-to-qwen2-moe", ["-e", "4", "-k", "2", "--shared-experts", "0"], "shared_experts must be from 1"),
    ("qwen2", "qwen2-to-qwen2-moe", ["-e", "6", "-k", "3", "--shared-experts", "2", "--granularity", "3"],
     "must be a multiple of shared_experts + granularity (5)"),
    ("mistral", "mistral-to-mixtral", ["-e", "4", "-k", "2", "--drop-ratio", "1.5"], "drop_ratio must be from 0 to 1"),
    ("mistral", "mistral-to-mixtral", ["-e", "4", "-k", "2", "--drop-ratio", "-0.1"], "drop_ratio must be from 0 to 1"),
]


@pytest.mark.parametrize("kind,rules,args,message", BAD, ids=[" ".join(b[2][4:]) for b in BAD])
def test_settings_a_target_cannot_express_are_one_line(models, tmp_path, kind, rules, args, message):
    assert_one_line_error(run("upcycle", models[kind], tmp_path / "out", "-r", rules, *args, "-q"), message)
    assert not (tmp_path / "out").exists()
