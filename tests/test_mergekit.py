"""`surgery mergekit-moe`: mergekit-moe's YAML on tiny fine-tunes made by transformers, checked byte by byte against
the sources, against mergekit's router definitions (recomputed here with the whole model, as mergekit does), and
against mergekit itself run in its own venv; routers from prompts in bounded memory; add experts to an MoE; the
rule-language features these recipes use (auxiliary sources, `floats`, `concat` over an index)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import venv
from pathlib import Path

import numpy as np
import pytest
import yaml

import surgery
from benchmarks.mergekit import save_word_tokenizer
from surgery import dtypes

from .test_cli import assert_one_line_error, run
from .tiny_models import save_tiny

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [
    {"positive_prompts": ["the cat sat on the mat", "a dog sat"], "negative_prompts": ["python code"]},
    {"positive_prompts": ["python function return number"]},
    {"positive_prompts": ["once upon a time a king", "the queen"]},
    {"positive_prompts": ["math plus minus number"], "negative_prompts": ["hello world", "the story"]},
]
MISTRAL_MLP = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
MERGEKIT = "mergekit==0.1.5"


def finetunes(root: Path, kind: str, count: int = 4, **overrides) -> list[Path]:
    """`count` tiny models of one architecture with different weights, each with the word-level tokenizer."""
    return [save_word_tokenizer(save_tiny(kind, root / f"{kind}-{i}", shards=2, seed=i, **overrides))
            for i in range(count)]


@pytest.fixture(scope="module")
def mistrals(tmp_path_factory) -> list[Path]:
    return finetunes(tmp_path_factory.mktemp("mistral"), "mistral")


def write_config(folder: Path, base: Path, experts: list[Path], mode: str = "random", **fields) -> Path:
    """A mergekit-moe YAML: expert i takes source experts[i] and PROMPTS[i % 4]."""
    config = {"base_model": str(base), "gate_mode": mode,
              "experts": [{"source_model": str(s), **PROMPTS[i % len(PROMPTS)]} for i, s in enumerate(experts)],
              **fields}
    path = folder / f"moe-{mode}-{len(list(folder.glob('moe-*.yml')))}.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def tensors(folder: Path) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint as numpy; bf16 as its raw 16-bit words (uint16)."""
    import torch
    from safetensors.torch import load_file

    out = {}
    for shard in sorted(Path(folder).glob("*.safetensors")):
        for name, value in load_file(shard).items():
            out[name] = value.view(torch.int16).numpy().view(np.uint16) if value.dtype == torch.bfloat16 else value.numpy()
    return out


def build(config: Path, out: Path, *options: str) -> Path:
    result = run("mergekit-moe", config, out, "-q", "--no-check", *options)
    assert result.exit_code == 0, result.output
    return out


# --------------------------------------------------------------------------------------- experts from several models


@pytest.mark.parametrize("count", [4, 8])
def test_four_finetunes_become_4_and_8_experts(mistrals, tmp_path, count):
    experts = [mistrals[i % 4] for i in range(count)]
    out = build(write_config(tmp_path, mistrals[0], experts, experts_per_token=2), tmp_path / "out")
    got, base = tensors(out), tensors(mistrals[0])
    sources = [tensors(folder) for folder in mistrals]
    for e in range(count):
        for layer in (0, 1):
            for proj, w in MISTRAL_MLP.items():
                assert got[f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight"].tobytes() == \
                    sources[e % 4][f"model.layers.{layer}.mlp.{proj}.weight"].tobytes(), (e, layer, proj)
    for name, value in base.items():
        if ".mlp." not in name:
            assert got[name].tobytes() == value.tobytes(), name
    assert not any(".mlp." in name for name in got)
    assert got["model.layers.1.block_sparse_moe.gate.weight"].shape == (count, 32)
    config, source_config = (json.loads((f / "config.json").read_text()) for f in (out, mistrals[0]))
    assert (config["model_type"], config["num_local_experts"], config["num_experts_per_tok"]) == ("mixtral", count, 2)
    assert config["sliding_window"] == source_config["sliding_window"] == 4096  # kept: mergekit drops it
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (mistrals[0] / name).read_bytes()
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_local_experts == count
    assert torch.isfinite(model(torch.tensor([[1, 5, 7, 9]])).logits).all()


def test_the_rest_from_the_base_or_the_mean_over_the_sources(mistrals, tmp_path):
    """others=mean (BTX): every tensor but the MLPs is the float64 mean over the sources, rounded once."""
    names = {"a": mistrals[1], "b": mistrals[2]}
    out = surgery.upcycle(mistrals[0], tmp_path / "out", "experts-to-mixtral", sources=names, others="mean",
                          progress=False)
    got, sources = tensors(out), [tensors(mistrals[i]) for i in range(3)]
    for name in ("model.embed_tokens.weight", "model.layers.1.self_attn.o_proj.weight", "model.norm.weight"):
        mean = sum(s[name].astype(np.float64) for s in sources) / 3
        assert got[name].tobytes() == bytes(dtypes.encode(mean, "F32")), name
    for e in range(3):  # default expert_sources: one expert per source, in order
        assert got[f"model.layers.0.block_sparse_moe.experts.{e}.w2.weight"].tobytes() == \
            sources[e]["model.layers.0.mlp.down_proj.weight"].tobytes()


def test_noise_scale_and_residual_scale(mistrals, tmp_path):
    config = write_config(tmp_path, mistrals[0], mistrals, experts_per_token=2)
    doc = yaml.safe_load(config.read_text())
    doc["experts"][1]["residual_scale"] = 0.5
    doc["experts"][2]["noise_scale"] = 0.01
    config.write_text(yaml.safe_dump(doc))
    first, again, other = (build(config, tmp_path / name, "--seed", seed)
                           for name, seed in (("first", "0"), ("again", "0"), ("other", "1")))
    got, sources = tensors(first), [tensors(folder) for folder in mistrals]
    down = "model.layers.0.mlp.down_proj.weight"
    assert np.array_equal(got["model.layers.0.block_sparse_moe.experts.1.w2.weight"], sources[1][down] * 0.5)
    noise = got["model.layers.0.block_sparse_moe.experts.2.w1.weight"] - sources[2]["model.layers.0.mlp.gate_proj.weight"]
    assert 0.008 < noise.std() < 0.012
    assert got["model.layers.0.block_sparse_moe.experts.0.w1.weight"].tobytes() == \
        sources[0]["model.layers.0.mlp.gate_proj.weight"].tobytes()
    assert tensors(again).keys() == got.keys() and all(tensors(again)[k].tobytes() == v.tobytes() for k, v in got.items())
    assert tensors(other)["model.layers.0.block_sparse_moe.experts.2.w1.weight"].tobytes() != \
        got["model.layers.0.block_sparse_moe.experts.2.w1.weight"].tobytes()


# --------------------------------------------------------------------------------------------- routers from prompts


def reference_routers(base: Path, experts: list[dict], mode: str, router_input: str = "residual") -> np.ndarray:
    """mergekit's gate vectors (mergekit/moe/router.py get_gate_params, mergekit/scripts/moe.py build), recomputed
    here with the whole model loaded in bf16: [layers, experts, hidden]."""
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    tokenizer.padding_side = "left"
    tokenizer.pad_token_id = tokenizer.bos_token_id
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).eval()
    embed = torch.from_numpy(tensors(base)["model.embed_tokens.weight"]).float()  # as stored, not as loaded

    def state(prompts: list[str]) -> torch.Tensor:
        batch = tokenizer([tokenizer.bos_token + p for p in prompts], return_tensors="pt", padding=True,
                          add_special_tokens=False)
        if mode == "cheap_embed":
            h = torch.nn.functional.one_hot(batch["input_ids"], embed.shape[0]).float() @ embed
            summed = (h * batch["attention_mask"].unsqueeze(-1)).sum(dim=1).sum(dim=0, keepdim=True)
            return (summed / summed.norm(dim=-1, keepdim=True)).repeat(model.config.num_hidden_layers, 1)
        seen = []
        hooks = [layer.mlp.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
                 for layer in model.model.layers] if router_input == "mlp" else []
        with torch.no_grad():
            output = model(**batch, output_hidden_states=True)
        for hook in hooks:
            hook.remove()
        states = torch.stack(seen if hooks else output.hidden_states[:-1]).float()
        token = states.mean(dim=2) if mode == "hidden_avg" else states[:, :, -1, :]
        return token.mean(dim=1)

    rows = []
    for expert in experts:
        row = state(expert["positive_prompts"])
        if expert.get("negative_prompts"):
            row = row - state(expert["negative_prompts"])
        rows.append(row / row.norm(dim=-1, keepdim=True))
    return torch.stack(rows, dim=1).numpy()


def bf16(values: np.ndarray) -> np.ndarray:
    return dtypes.decode(bytes(dtypes.encode(values, "BF16")), "BF16").reshape(values.shape)


@pytest.mark.parametrize("mode,router_input", [("hidden", "residual"), ("hidden_avg", "residual"),
                                               ("hidden_last", "residual"), ("cheap_embed", "residual"),
                                               ("hidden", "mlp")])
def test_routers_follow_mergekits_definitions(mistrals, tmp_path, mode, router_input):
    config = write_config(tmp_path, mistrals[0], mistrals, mode, dtype="bfloat16")
    out = build(config, tmp_path / "out", "--router-input", router_input)
    got = tensors(out)
    expected = reference_routers(mistrals[0], PROMPTS, mode, router_input)
    for layer in (0, 1):
        router = dtypes.decode(got[f"model.layers.{layer}.block_sparse_moe.gate.weight"].tobytes(), "BF16")
        # hidden states are computed in bf16, as mergekit does; the reductions here and there round differently
        tolerance = 0 if mode == "cheap_embed" else 2**-8
        assert np.abs(router.reshape(4, 32) - bf16(expected[layer])).max() <= tolerance, (mode, layer)
    card = (out / "README.md").read_text()
    assert f'"gate_mode": "{mode}"' in card and f'"router_input": "{router_input}"' in card
    assert f"computed from the config's prompts ({mode}, {router_input} input" in card
    assert "surgery-routers-" not in card  # not the temporary folder's path
    assert not list(tmp_path.glob(".out.surgery-routers-*")), "the routers checkpoint is removed afterwards"


def test_a_killed_runs_routers_folder_is_removed_by_the_next_run(mistrals, tmp_path):
    """SIGKILL while the routers are computed leaves `.OUT.surgery-routers` beside OUT; the next run into OUT
    removes it (it holds the routers lock, so no live run is using it) and leaves nothing of its own behind."""
    config = write_config(tmp_path, mistrals[0], mistrals, "hidden")
    out, routers = tmp_path / "out", tmp_path / ".out.surgery-routers"
    child = subprocess.Popen([sys.executable, "-m", "surgery", "mergekit-moe", str(config), str(out), "-q",
                              "--no-check"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not routers.exists() and child.poll() is None:
            time.sleep(0.005)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL and routers.is_dir() and not out.exists()
    (routers / "model.safetensors").write_bytes(b"left by the killed run")
    build(config, out)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out")) == []
    assert (out / "config.json").exists()


def test_random_gate_modes_are_seeded_and_scaled_like_mergekits(mistrals, tmp_path):
    rows = {}
    for mode in ("random", "uniform_random"):
        out = build(write_config(tmp_path, mistrals[0], mistrals, mode), tmp_path / mode)
        again = build(write_config(tmp_path, mistrals[0], mistrals, mode), tmp_path / f"{mode}-again")
        rows[mode] = np.stack([tensors(out)[f"model.layers.{i}.block_sparse_moe.gate.weight"] for i in (0, 1)])
        assert rows[mode].tobytes() == np.stack(
            [tensors(again)[f"model.layers.{i}.block_sparse_moe.gate.weight"] for i in (0, 1)]).tobytes()
    assert 0.85 < rows["random"].std() < 1.15  # torch.randn
    bound = 1 / np.sqrt(32)  # U(-1/sqrt(hidden), 1/sqrt(hidden)), nn.Linear's init
    assert np.abs(rows["uniform_random"]).max() <= bound and 0.8 < rows["uniform_random"].std() * np.sqrt(3) / bound < 1.2


def test_without_torch_the_hidden_modes_say_what_to_install(mistrals):
    script = (
        "import sys\n"
        "sys.modules['torch'] = None  # as if it were not installed\n"
        "from surgery.api import open_source\n"
        "from surgery.errors import SurgeryError\n"
        "from surgery.routers import Prompts, router_rows\n"
        "try:\n"
        f"    router_rows(open_source({str(mistrals[0])!r}), [Prompts(('the cat',))], 'hidden')\n"
        "except SurgeryError as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    assert 'pip install "weight-surgery[verify]"' in result.stdout, result.stdout + result.stderr


def test_hidden_routers_run_in_about_one_layers_memory(tmp_path):
    """The routers of a 4-layer Mistral-7B-shaped model (2.27 GB) from prompts, in a subprocess: its peak RSS grows by
    less than two layers' bytes over the imports of torch and transformers."""
    from benchmarks.synthetic import make_config, tensor_shapes, write_synthetic

    base = save_word_tokenizer(write_synthetic(tmp_path / "base", layers=4))
    layer_bytes = sum(np.prod(shape) * 2 for name, shape in tensor_shapes(make_config("mistral-7b", 1))
                      if name.startswith("model.layers.0."))
    script = (
        "import torch, transformers\n"
        "from surgery.api import open_source\n"
        "from surgery.routers import Prompts, router_rows\n"
        "def peak(): return int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) * 1024\n"
        "before = peak()\n"
        f"rows = router_rows(open_source({str(base)!r}), [Prompts(('the cat sat', 'a dog')), "
        "Prompts(('python code',), ('the mat',))], 'hidden')\n"
        "print(rows.shape, before, peak())\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    shape, before, after = result.stdout.rsplit(" ", 2)
    assert shape == "(4, 2, 4096)"
    grown = int(after) - int(before)
    assert grown < 2 * layer_bytes, f"the routers' pass took {grown / 2**20:.0f} MiB, one layer is {layer_bytes / 2**20:.0f} MiB"


# ------------------------------------------------------------------------------------------------ Qwen2-MoE and more


def test_qwen2_moe_with_two_shared_experts(tmp_path):
    qwens = finetunes(tmp_path, "qwen2", 3)
    config = write_config(tmp_path, qwens[0], qwens[:2], "cheap_embed", experts_per_token=1,
                          shared_experts=[{"source_model": str(qwens[1]), **PROMPTS[2], "residual_scale": 0.5},
                                          {"source_model": str(qwens[2]), **PROMPTS[3]}])
    out = build(config, tmp_path / "out")
    got, sources = tensors(out), [tensors(q) for q in qwens]
    mlp = "model.layers.1.mlp"
    assert got[f"{mlp}.shared_expert.gate_proj.weight"].tobytes() == np.concatenate(
        [sources[1][f"{mlp}.gate_proj.weight"], sources[2][f"{mlp}.gate_proj.weight"]]).tobytes()
    assert np.array_equal(got[f"{mlp}.shared_expert.down_proj.weight"], np.concatenate(
        [sources[1][f"{mlp}.down_proj.weight"] * 0.5, sources[2][f"{mlp}.down_proj.weight"]], axis=1))
    assert got[f"{mlp}.experts.1.up_proj.weight"].tobytes() == sources[1][f"{mlp}.up_proj.weight"].tobytes()
    rows = reference_routers(qwens[0], [*PROMPTS[:2], PROMPTS[2], PROMPTS[3]], "cheap_embed")[1]
    assert np.allclose(got[f"{mlp}.gate.weight"], rows[:2], atol=1e-6)
    shared = rows[2] + rows[3]
    assert np.allclose(got[f"{mlp}.shared_expert_gate.weight"], shared / np.linalg.norm(shared), atol=1e-6)
    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"], config["num_experts"], config["shared_expert_intermediate_size"]) == \
        ("qwen2_moe", 2, 2 * 64)
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert torch.isfinite(model(torch.tensor([[1, 5, 7]])).logits).all()


def test_qwen3_moe_fused_layout(tmp_path):
    qwens = finetunes(tmp_path, "qwen3", 2)
    out = build(write_config(tmp_path, qwens[0], [qwens[1], qwens[0]], "hidden"), tmp_path / "out", "--layout", "fused")
    got, sources = tensors(out), [tensors(q) for q in qwens]
    mlp = "model.layers.0.mlp"
    assert got[f"{mlp}.experts.gate_up_proj"].tobytes() == np.stack(
        [np.concatenate([sources[i][f"{mlp}.gate_proj.weight"], sources[i][f"{mlp}.up_proj.weight"]]) for i in (1, 0)]
    ).tobytes()
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen3_moe"


def test_olmo_finetunes_become_a_flex_olmo(tmp_path):
    """FlexOlmo's own recipe (experts trained apart, merged), from mergekit's YAML: no mergekit target matches."""
    olmos = finetunes(tmp_path, "olmo2", 3)
    out = build(write_config(tmp_path, olmos[0], olmos, "hidden_avg", experts_per_token=2), tmp_path / "out")
    got, sources = tensors(out), [tensors(o) for o in olmos]
    for e in range(3):
        assert got[f"model.layers.1.mlp.experts.{e}.down_proj.weight"].tobytes() == \
            sources[e]["model.layers.1.mlp.down_proj.weight"].tobytes()
    expected = reference_routers(olmos[0], PROMPTS[:3], "hidden_avg")
    router = got["model.layers.1.mlp.gate.weight"]
    assert np.abs(router - expected[1]).max() <= 2**-7  # bf16 layers, an fp32 router
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "FlexOlmoForCausalLM" and model.config.num_experts == 3
    assert torch.isfinite(model(torch.tensor([[1, 5, 7]])).logits).all()


# ---------------------------------------------------------------------------------------- add experts to an MoE


def test_add_an_expert_to_a_mixtral(mistrals, tmp_path):
    moe = build(write_config(tmp_path, mistrals[0], mistrals[:3], "random"), tmp_path / "moe")
    save = {name: value.copy() for name, value in tensors(moe).items()}
    added = build(write_config(tmp_path, moe, [mistrals[3]], "cheap_embed", experts_per_token=3), tmp_path / "added")
    got, dense = tensors(added), tensors(mistrals[3])
    for name, value in save.items():
        if not name.endswith("gate.weight"):
            assert got[name].tobytes() == value.tobytes(), name
    for proj, w in MISTRAL_MLP.items():
        assert got[f"model.layers.1.block_sparse_moe.experts.3.{w}.weight"].tobytes() == \
            dense[f"model.layers.1.mlp.{proj}.weight"].tobytes()
    router = got["model.layers.1.block_sparse_moe.gate.weight"]
    assert router[:3].tobytes() == save["model.layers.1.block_sparse_moe.gate.weight"].tobytes()
    assert np.allclose(router[3], reference_routers(moe, PROMPTS[:1], "cheap_embed")[1, 0], atol=1e-6)
    config = json.loads((added / "config.json").read_text())
    assert (config["num_local_experts"], config["num_experts_per_tok"]) == (4, 3)


def test_add_experts_to_a_qwen3_moe_with_smaller_experts(tmp_path):
    """The dense MLP (64 neurons) becomes two experts of 32 per copy, down_proj times 2, router rows tied."""
    dense = finetunes(tmp_path, "qwen3", 2)
    moe = surgery.upcycle(dense[0], tmp_path / "moe", "qwen3-to-qwen3-moe", 4, 2, granularity=2, progress=False)
    out = surgery.upcycle(moe, tmp_path / "out", "qwen-moe-add-experts", sources={"dense": dense[1]}, add=2,
                          progress=False)
    got, mlp = tensors(out), tensors(dense[1])
    prefix = "model.layers.1.mlp"
    assert got[f"{prefix}.experts.7.up_proj.weight"].tobytes() == mlp[f"{prefix}.up_proj.weight"][32:].tobytes()
    assert np.array_equal(got[f"{prefix}.experts.6.down_proj.weight"], mlp[f"{prefix}.down_proj.weight"][:, :32] * 2)
    router = got[f"{prefix}.gate.weight"]
    assert router.shape == (8, 32) and router[4].tobytes() == router[5].tobytes() != router[6].tobytes()
    assert json.loads((out / "config.json").read_text())["num_experts"] == 8
    verdict, why = surgery.plan(moe, "qwen-moe-add-experts", sources={"dense": dense[1]}).exact
    assert not verdict and "new router rows" in why


# -------------------------------------------------------------------------------------------------------- bad input


def bad_configs(mistrals: list[Path], tmp_path: Path) -> list[tuple[Path, tuple[str, ...]]]:
    wider = save_word_tokenizer(save_tiny("mistral", tmp_path / "wider", shards=2, intermediate_size=96))
    smaller_vocab = save_word_tokenizer(save_tiny("mistral", tmp_path / "vocab", shards=2, vocab_size=120))
    cases = [
        (write_config(tmp_path, mistrals[0], [mistrals[1], wider]),
         ("mlp.down_proj.weight is F32[32, 96], in the base F32[32, 64]",)),
        (write_config(tmp_path, mistrals[0], [mistrals[1], smaller_vocab]), ("embed_tokens.weight is F32[120, 32]",)),
        (write_config(tmp_path, mistrals[0], mistrals[:2], "hidden", gate_modes="hidden"), ("unknown field 'gate_modes'",)),
        (write_config(tmp_path, mistrals[0], mistrals[:2], "hidden_avg", architecture="deepseek"),
         ("DeepSeek MoE needs remote code",)),
        (write_config(tmp_path, mistrals[0], [mistrals[1], mistrals[1]]), ("--i-understand-this-is-not-useful",)),
        (write_config(tmp_path, mistrals[0], [mistrals[1], Path(f"{mistrals[2]}+my/lora")]), ("LoRA adapter",)),
        (write_config(tmp_path, mistrals[0], mistrals[:2], shared_experts=[{"source_model": str(mistrals[2])}]),
         ("none holds shared experts",)),
    ]
    empty = write_config(tmp_path, mistrals[0], mistrals[:2], "hidden")
    doc = yaml.safe_load(empty.read_text())
    doc["experts"][1]["positive_prompts"] = []
    doc["experts"][0]["noise_scales"] = 0.1
    empty.write_text(yaml.safe_dump(doc))
    cases.append((empty, ("unknown field 'noise_scales'", "noise_scale")))
    del doc["experts"][0]["noise_scales"]
    (tmp_path / "empty.yml").write_text(yaml.safe_dump(doc))
    cases.append((tmp_path / "empty.yml", ("experts[1] has no positive_prompts", "gate_mode hidden")))
    return cases


def test_bad_input_is_one_error_line_and_nothing_written(mistrals, tmp_path):
    for config, fragments in bad_configs(mistrals, tmp_path):
        assert_one_line_error(run("mergekit-moe", config, tmp_path / "out", "-q"), *fragments)
        assert not (tmp_path / "out").exists(), config
        assert not list(tmp_path.glob(".out.*")), config


def test_a_missing_auxiliary_source_says_how_to_give_it(mistrals, tmp_path):
    assert_one_line_error(run("plan", mistrals[0], "-r", "experts-to-mixtral", "-p", "gate_mode=hidden", "-k", "1"),
                          "needs source routers: give it with --source routers=PATH")
    qwen = finetunes(tmp_path, "qwen2", 1)[0]
    moe = surgery.upcycle(mistrals[0], tmp_path / "moe", "mistral-to-mixtral", 2, 1, progress=False)
    assert_one_line_error(run("plan", moe, "-r", "mixtral-add-experts", "--source", f"dense={qwen}"),
                          "source dense", "is a 'qwen2' model", "from mistral, llama models")
    wider = save_tiny("mistral", tmp_path / "wider", intermediate_size=96)  # `configs.dense` in a require
    assert_one_line_error(run("plan", moe, "-r", "mixtral-add-experts", "--source", f"dense={wider}"),
                          "source dense (hidden 32, intermediate 96) does not fit experts of hidden 32, intermediate 64")


def test_floats_parameters(mistrals):
    for text, fragment in (("0.1,abc", "noise_scales"), ("0.1,nan", "a comma-separated list of finite numbers"),
                           ("0.1,-1", "noise_scales must be from 0")):
        assert_one_line_error(run("plan", mistrals[0], "-r", "experts-to-mixtral", "-p", f"noise_scales={text}"),
                              fragment)
    planned = surgery.plan(mistrals[0], "experts-to-mixtral", noise_scales="0.5", experts_per_token=1)
    assert planned.params["noise_scales"] == [0.5]


# --------------------------------------------------------------------------------------------- mergekit itself


@pytest.fixture(scope="session")
def mergekit_moe(tmp_path_factory) -> str:
    """mergekit-moe from a venv that sees this interpreter's packages (torch, transformers) and adds mergekit:
    $SURGERY_MERGEKIT_PYTHON's, or one made here; skipped with the reason when mergekit cannot be installed."""
    python = os.environ.get("SURGERY_MERGEKIT_PYTHON")
    if not python:
        folder = tmp_path_factory.mktemp("mergekit-venv")
        venv.create(folder, system_site_packages=True, with_pip=True)
        python = str(folder / "bin" / "python")
        try:
            done = subprocess.run([python, "-m", "pip", "install", "--quiet", MERGEKIT], capture_output=True,
                                  text=True, timeout=900)
        except subprocess.TimeoutExpired:
            pytest.skip(f"comparison with mergekit: `pip install {MERGEKIT}` timed out")
        if done.returncode:
            reason = (done.stderr.strip().splitlines() or ["no output"])[-1]
            pytest.skip(f"comparison with mergekit: `pip install {MERGEKIT}` failed: {reason}")
    script = Path(python).parent / "mergekit-moe"
    if not script.is_file():
        pytest.skip(f"comparison with mergekit: no mergekit-moe beside {python}")
    import transformers

    theirs = subprocess.run([python, "-c", "import transformers; print(transformers.__version__)"],
                            capture_output=True, text=True).stdout.strip()
    if theirs.split(".")[0] != transformers.__version__.split(".")[0]:
        # e.g. transformers 5 loads a tokenizer saved as PreTrainedTokenizerFast as the class of the config's
        # model_type (Qwen2Tokenizer), transformers 4 as it was saved: the same prompts become other tokens
        pytest.skip(f"comparison with mergekit: its venv has transformers {theirs or '?'}, this run "
                    f"{transformers.__version__}, which may tokenize the same prompts differently")
    return str(script)


def run_mergekit(script: str, config: Path, out: Path) -> dict[str, np.ndarray]:
    done = subprocess.run([script, str(config), str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return tensors(out)


def fused(got: dict[str, np.ndarray], experts: int) -> dict[str, np.ndarray]:
    """Mixtral's per-expert layout as mergekit 0.1.5 writes it: fused experts, router under mlp."""
    out = {name: value for name, value in got.items() if "block_sparse_moe" not in name}
    for layer in {int(name.split(".")[2]) for name in got if "block_sparse_moe" in name}:
        moe = f"model.layers.{layer}.block_sparse_moe"
        out[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = np.stack(
            [np.concatenate([got[f"{moe}.experts.{e}.w1.weight"], got[f"{moe}.experts.{e}.w3.weight"]])
             for e in range(experts)])
        out[f"model.layers.{layer}.mlp.experts.down_proj"] = np.stack(
            [got[f"{moe}.experts.{e}.w2.weight"] for e in range(experts)])
        out[f"model.layers.{layer}.mlp.gate.weight"] = got[f"{moe}.gate.weight"]
    return out


def compare(ours: dict[str, np.ndarray], theirs: dict[str, np.ndarray], mode: str) -> None:
    """Same names and shapes; every tensor identical but the routers, which agree as the gate mode allows."""
    assert sorted(ours) == sorted(theirs)
    for name, value in theirs.items():
        assert (ours[name].shape, ours[name].dtype) == (value.shape, value.dtype), name
        if not name.endswith(("mlp.gate.weight", "shared_expert_gate.weight")):
            assert ours[name].tobytes() == value.tobytes(), name
            continue
        a, b = (dtypes.decode(t.tobytes(), "BF16") for t in (ours[name], value))
        if mode in ("random", "uniform_random"):
            assert 0.8 < a.std() / b.std() < 1.25, name
        else:
            assert np.abs(a - b).max() <= (0 if mode == "cheap_embed" else 2**-8), name


@pytest.mark.parametrize("mode", ["hidden", "hidden_avg", "hidden_last", "cheap_embed", "random", "uniform_random"])
def test_the_same_model_as_mergekit(mergekit_moe, mistrals, tmp_path, mode):
    config = write_config(tmp_path, mistrals[0], mistrals, mode, dtype="bfloat16", experts_per_token=2)
    doc = yaml.safe_load(config.read_text())
    doc["experts"][2]["residual_scale"] = 0.25
    config.write_text(yaml.safe_dump(doc))
    theirs = run_mergekit(mergekit_moe, config, tmp_path / "mergekit")
    ours = fused(tensors(build(config, tmp_path / "surgery")), 4)
    compare(ours, theirs, mode)
    a, b = (json.loads((tmp_path / f / "config.json").read_text()) for f in ("surgery", "mergekit"))
    for key in ("model_type", "num_local_experts", "num_experts_per_tok", "hidden_size", "dtype"):
        assert a[key] == b[key], key


@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])
def test_the_same_qwen_moe_as_mergekit(mergekit_moe, tmp_path, kind):
    qwens = finetunes(tmp_path, kind, 3)
    # mergekit 0.1.5 reads a shared expert only from a model it loaded for another role (mergekit/moe/common.py
    # initialize_io opens the base and the experts): the base here
    shared = {"shared_experts": [{"source_model": str(qwens[0]), **PROMPTS[3]}]} if kind == "qwen2" else {}
    config = write_config(tmp_path, qwens[0], qwens[1:], "hidden", dtype="bfloat16", **shared)
    theirs = run_mergekit(mergekit_moe, config, tmp_path / "mergekit")
    options = ("--layout", "fused") if kind == "qwen3" else ("--layout", "per-expert")
    compare(tensors(build(config, tmp_path / "surgery", *options)), theirs, "hidden")
