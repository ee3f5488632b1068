"""surgery.compat.fusion_bench and `surgery fusion-bench`: the FusionBench page's code runs unchanged but for imports."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from click.testing import CliRunner
from omegaconf import DictConfig, OmegaConf
from safetensors import safe_open

import surgery
from surgery.cli import main
from surgery.compat.fusion_bench import (
    MixtralForCausalLMUpscalingAlgorithm,
    MixtralUpscalingAlgorithm,
    print_parameters,
)
from surgery.report import parameter_line
from tests.tiny_models import save_tiny

#: Verbatim excerpt of FusionBench's page "MoE-based Model Upscaling (Sparse Upcycling)"
#: (docs/algorithms/moe_based_upscaling.md), the page users arrive with.
SEED_PAGE = '''
Here’s an example demonstrating how to upscale a pre-trained Mistral model to a Mixtral model:

```python
import os

from omegaconf import DictConfig
from transformers import MistralForCausalLM

from fusion_bench.method.mixture_of_experts.mixtral_upcycling import (
    MixtralForCausalLMUpscalingAlgorithm,
)
from fusion_bench.utils import print_parameters

# Load a pre-trained Mistral model
pretrained_model = MistralForCausalLM.from_pretrained(
    os.path.expanduser("path_to_mistral_model")
)
print("Pretrained model:")
print_parameters(pretrained_model)
# Output:
# Pretrained model:
# trainable params: 7.24B || all params: 7.24B || trainable%: 100.0000

# Define the configuration for Mixtral
config = {
    "num_experts": 4,  # Number of expert channels
    "experts_per_token": 2,  # Experts to choose per token
}

# Initialize the upscaling algorithm
upscaling_for_causal_lm_algorithm = MixtralForCausalLMUpscalingAlgorithm(
    DictConfig(config)
)

# Run the upscaling process to get a Mixtral model
mixtral_for_causal_lm_model = upscaling_for_causal_lm_algorithm.run(pretrained_model)

print("Mixtral model:")
print_parameters(mixtral_for_causal_lm_model)
# Outputs:
# Mixtral model:
# trainable params: 24.15B || all params: 24.15B || trainable%: 100.0000

# Save the upscaled Mixtral model
mixtral_for_causal_lm_model.save_pretrained("path_to_save_mixtral_model")
```

```yaml title="config/method/mixtral_moe_upscaling.yaml"
# or "mixtral_for_causal_lm_moe_upscaling"
name: mixtral_moe_upscaling 
num_experts: 4
expert_per_token: 2

# path to save the upscaled model
save_checkpoint: null
```

```yaml title="config/modelpool/mixtral_moe_upsacling.yaml"
type: AutoModelForCausalLMPool
# each model should have a name and a path, and the model is loaded from the path
# this is equivalent to `AutoModelForCausalLM.from_pretrained(path)`
models:
  - name: _pretrained_
    path: path_to_your_pretrained_model
```

```bash
fusion_bench \\
    method=mixtral_moe_upscaling \\
    modelpool=mixtral_moe_upscaling \\
        modelpool.models.0.path=path_to_your_pretrained_model \\
    taskpool=dummy # this is a dummy taskpool that does nothing but print the parameter counts of the merged model
```
'''

UNITS = {"K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}
_NUMBER = r"(\d+\.\d\d[KMBT]|\d+)"
PARAMETER_LINE = re.compile(rf"trainable params: {_NUMBER} \|\| all params: {_NUMBER} \|\| trainable%: (\d+\.\d{{4}})")
CONFIGS = Path(surgery.__file__).parent / "compat" / "configs"


def code_block(info: str) -> str:
    """The body of the seed page's only code block whose info string is `info`."""
    blocks = re.findall(rf"^```{re.escape(info)}\n(.*?)^```$", SEED_PAGE, re.MULTILINE | re.DOTALL)
    assert len(blocks) == 1, info
    return blocks[0]


def assert_parameter_line(line: str, model: torch.nn.Module) -> None:
    """`line` is in the seed's format and its numbers are the model's parameter counts (to 2 decimals)."""
    match = PARAMETER_LINE.fullmatch(line)
    assert match, line
    total = sum(p.numel() for p in model.parameters())
    for printed in match.group(1, 2):
        assert printed[-1] in "KMBT" if total >= 1000 else printed.isdigit()
        unit = UNITS.get(printed[-1], 1)
        assert 1 <= total / unit < 1000 or unit == 1
        assert abs(float(printed.rstrip("KMBT")) * unit - total) <= 0.005 * unit, (printed, total)
    assert match.group(3) == "100.0000"


def invoke(*args: object):
    return CliRunner().invoke(main, ["fusion-bench", *map(str, args)])


def assert_one_line_error(result, fragment: str) -> None:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1, result.output
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_tiny("mistral", tmp_path_factory.mktemp("dense") / "mistral", shards=3, sliding_window=8)


@pytest.fixture(scope="module")
def dense(tiny):
    return transformers.MistralForCausalLM.from_pretrained(tiny).eval()


IDS = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))


def assert_same_logits(moe: torch.nn.Module, dense: torch.nn.Module) -> None:
    assert next(moe.parameters()).dtype == torch.float32
    with torch.no_grad():
        diff = (moe(IDS).logits - dense(IDS).logits).abs().max().item()
    assert diff <= 1e-5, diff


def assert_mixtral_folder(folder: Path, dense: torch.nn.Module, rules: str = "mistral-to-mixtral") -> torch.nn.Module:
    """`folder` holds surgery's standard output (with model card) and loads as a Mixtral equal to `dense`."""
    assert (folder / "config.json").is_file() and rules in (folder / "README.md").read_text()
    moe = transformers.MixtralForCausalLM.from_pretrained(folder).eval()
    assert_same_logits(moe, dense)
    return moe


# The Python example


def test_seed_python_example_runs_verbatim(tiny, monkeypatch, tmp_path, capsys):
    code = code_block("python")
    replacements = {
        "from fusion_bench.method.mixture_of_experts.mixtral_upcycling import": "from surgery.compat.fusion_bench import",
        "from fusion_bench.utils import": "from surgery.compat.fusion_bench import",
        'os.path.expanduser("path_to_mistral_model")': f"os.path.expanduser({str(tiny)!r})",
    }
    for old, new in replacements.items():
        assert code.count(old) == 1, old
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "fusion_bench_example.py", "exec"), namespace)

    dense, moe = namespace["pretrained_model"], namespace["mixtral_for_causal_lm_model"]
    assert isinstance(moe, transformers.MixtralForCausalLM)
    assert_same_logits(moe.eval(), dense.eval())
    printed = re.fullmatch(r"Pretrained model:\n(.*)\nMixtral model:\n(.*)\n", capsys.readouterr().out)
    assert printed, "stdout is not the example's four lines"
    assert_parameter_line(printed.group(1), dense)
    assert_parameter_line(printed.group(2), moe)
    saved = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "path_to_save_mixtral_model")
    assert_same_logits(saved.eval(), dense)


def test_print_parameters_counts_a_path_from_headers(tiny, dense, monkeypatch, capsys):
    def no_loading(*args, **kwargs):
        raise AssertionError("print_parameters(path) must not load the model")

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", no_loading)
    print_parameters(tiny)
    print_parameters(str(tiny))
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0] == lines[1]
    assert_parameter_line(lines[0], dense)


def test_print_parameters_counts_only_trainable_as_trainable(tiny, capsys):
    model = transformers.MistralForCausalLM.from_pretrained(tiny)
    model.model.embed_tokens.weight.requires_grad_(False)  # 128 * 32 = 4096 of the parameters
    total = sum(p.numel() for p in model.parameters())
    print_parameters(model)
    match = PARAMETER_LINE.fullmatch(capsys.readouterr().out.strip())
    assert match and match.group(3) == f"{100 * (total - 4096) / total:.4f}"


def test_bf16_stays_bf16_attention_copied_router_initialised(tiny):
    dense = transformers.MistralForCausalLM.from_pretrained(tiny, dtype=torch.bfloat16)
    moe = MixtralForCausalLMUpscalingAlgorithm({"num_experts": 4, "experts_per_token": 2}).run(dense)

    assert {p.dtype for p in moe.parameters()} == {torch.bfloat16}
    moe_params = dict(moe.named_parameters())
    copied = {name: p for name, p in dense.named_parameters() if ".mlp." not in name}
    assert any("self_attn" in name for name in copied)
    for name, p in copied.items():
        assert torch.equal(moe_params[name], p), name
        assert p.abs().sum() > 0, name
    routers = [p for name, p in moe_params.items() if name.endswith("gate.weight") and p.shape == (4, 32)]
    assert len(routers) == 2
    values = torch.cat([r.float().flatten() for r in routers])
    assert (values != 0).all() and 0.015 < values.std().item() < 0.025


# Inputs, configs and outputs of the Python API


class Pool:
    """A stand-in for a FusionBench model pool."""

    def __init__(self, model):
        self.model = model

    def load_model(self, name: str):
        assert name == "_pretrained_"
        return self.model


@pytest.mark.parametrize("form", ["model", "path", "dict", "pool_config", "pool_object"])
def test_run_accepts_model_path_and_model_pools(tiny, dense, form):
    pool_yaml = yaml.safe_load(code_block('yaml title="config/modelpool/mixtral_moe_upsacling.yaml"'))
    pool_yaml["models"][0]["path"] = str(tiny)
    given = {
        "model": dense,
        "path": tiny,
        "dict": {"_pretrained_": dense},
        "pool_config": OmegaConf.create(pool_yaml),
        "pool_object": Pool(dense),
    }[form]
    moe = MixtralForCausalLMUpscalingAlgorithm(DictConfig({"num_experts": 3, "expert_per_token": 1})).run(given)
    assert isinstance(moe, transformers.MixtralForCausalLM) and moe.config.num_local_experts == 3
    assert_same_logits(moe.eval(), dense)


def all_tensors(folder: Path) -> dict[str, bytes]:
    out = {}
    for shard in folder.glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            out.update({k: f.get_tensor(k).contiguous().view(-1).view(torch.uint8).numpy().tobytes() for k in f.keys()})
    return out


def test_save_checkpoint_is_exactly_surgery_upcycle_output(tiny, dense, tmp_path):
    reference = surgery.upcycle(tiny, tmp_path / "reference", "mistral-to-mixtral", 4, 2, progress=False)
    for given, folder in ((tiny, "from_path"), (dense, "from_model")):
        config = {"num_experts": 4, "experts_per_token": 2, "save_checkpoint": str(tmp_path / folder)}
        MixtralForCausalLMUpscalingAlgorithm(config).run(given)
        out = tmp_path / folder
        names = sorted(p.name for p in out.iterdir())
        assert names == sorted(p.name for p in reference.iterdir())
        if folder == "from_path":  # the same source files: the same shard bytes
            for name in names:
                if name.endswith(".safetensors"):
                    assert (out / name).read_bytes() == (reference / name).read_bytes(), (folder, name)
        else:  # the model saved again has another file layout, which the shard layout follows (block sharing)
            assert all_tensors(out) == all_tensors(reference)
        assert "MixtralForCausalLMUpscalingAlgorithm" in (out / "README.md").read_text()
        assert_mixtral_folder(out, dense)


def test_bare_model_becomes_bare_mixtral(tiny, dense, tmp_path):
    bare = dense.model
    out = tmp_path / "bare"
    moe = MixtralUpscalingAlgorithm({"num_experts": 4, "experts_per_token": 2, "save_checkpoint": str(out)}).run(bare)
    assert isinstance(moe, transformers.MixtralModel)
    with torch.no_grad():
        diff = (moe(IDS).last_hidden_state - bare(IDS).last_hidden_state).abs().max().item()
    assert diff <= 1e-5
    assert json.loads((out / "config.json").read_text())["architectures"] == ["MixtralModel"]
    with safe_open(out / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert "embed_tokens.weight" in names and "layers.0.block_sparse_moe.experts.3.w2.weight" in names
    assert not any(name.startswith("model.") or name.startswith("lm_head") for name in names)
    reloaded = transformers.MixtralModel.from_pretrained(out)
    with torch.no_grad():
        assert torch.equal(reloaded(IDS).last_hidden_state, moe(IDS).last_hidden_state)


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        ({"experts_per_token": 2}, "missing num_experts"),
        ({"num_experts": 4}, "missing experts_per_token"),
        ({"num_experts": 4, "experts_per_token": 2, "expert_per_token": 1}, "disagree"),
        ({"num_experts": 4, "experts_per_token": 2, "num_expert": 4}, "config.num_expert: unknown key"),
        ({"num_experts": 2, "experts_per_token": 3}, "experts_per_token must be from 1 to num_experts"),
        ({"num_experts": 4, "experts_per_token": 2, "name": "simple_average"}, "'simple_average' is not supported"),
    ],
)
def test_bad_configs(config, fragment):
    with pytest.raises(surgery.SurgeryError, match=re.escape(fragment)):
        MixtralForCausalLMUpscalingAlgorithm(DictConfig(config))


def test_newer_fusion_bench_keyword_form():
    algorithm = MixtralForCausalLMUpscalingAlgorithm(num_experts=8, experts_per_token=2, save_checkpoint=None)
    assert algorithm.params == {"num_experts": 8, "experts_per_token": 2}


def test_bad_run_inputs(tiny, dense, tmp_path):
    algorithm = MixtralForCausalLMUpscalingAlgorithm({"num_experts": 4, "experts_per_token": 2})
    with pytest.raises(surgery.SurgeryError, match="bare MistralModel: use MixtralUpscalingAlgorithm"):
        algorithm.run(dense.model)
    with pytest.raises(surgery.SurgeryError, match="no _pretrained_ entry"):
        algorithm.run({"base": dense})
    with pytest.raises(surgery.SurgeryError, match="no such file or folder"):
        algorithm.run(tmp_path / "missing")
    with pytest.raises(surgery.SurgeryError, match="expected a transformers model"):
        algorithm.run(42)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    saving = MixtralForCausalLMUpscalingAlgorithm({"num_experts": 4, "experts_per_token": 2,
                                                   "save_checkpoint": str(tmp_path / "full")})
    with pytest.raises(surgery.SurgeryError, match="is not an empty folder"):
        saving.run(dense)


# The command line


def seed_yaml_files(folder: Path) -> tuple[Path, Path]:
    method = folder / "mixtral_moe_upscaling.yaml"
    method.write_text(code_block('yaml title="config/method/mixtral_moe_upscaling.yaml"'))
    pool = folder / "mixtral_moe_upsacling.yaml"
    pool.write_text(code_block('yaml title="config/modelpool/mixtral_moe_upsacling.yaml"'))
    return method, pool


def test_seed_yaml_files_drive_the_cli(tiny, dense, tmp_path):
    method, pool = seed_yaml_files(tmp_path)
    out = tmp_path / "out"
    result = invoke(f"method={method}", f"modelpool={pool}", f"modelpool.models.0.path={tiny}",
                    f"method.save_checkpoint={out}", "taskpool=dummy")
    assert result.exit_code == 0, result.output
    moe = assert_mixtral_folder(out, dense)
    assert moe.config.num_local_experts == 4 and moe.config.num_experts_per_tok == 2
    assert_parameter_line(result.stdout.splitlines()[-1], moe)


def test_builtin_configs_are_the_seed_yaml_files():
    assert (CONFIGS / "method" / "mixtral_moe_upscaling.yaml").read_text() == code_block(
        'yaml title="config/method/mixtral_moe_upscaling.yaml"')
    assert (CONFIGS / "modelpool" / "mixtral_moe_upscaling.yaml").read_text() == code_block(
        'yaml title="config/modelpool/mixtral_moe_upsacling.yaml"')


def seed_command(path: Path) -> list[str]:
    """The seed's bash command, program name dropped, with `path` for the placeholder."""
    words = shlex.split(code_block("bash").replace("\\\n", " "), comments=True)
    assert words[0] == "fusion_bench" and "modelpool.models.0.path=path_to_your_pretrained_model" in words
    return [w.replace("path_to_your_pretrained_model", str(path)) for w in words[1:]]


def test_seed_command_with_builtin_names(tiny, dense, tmp_path):
    out = tmp_path / "out"
    result = invoke(*seed_command(tiny), f"method.save_checkpoint={out}")
    assert result.exit_code == 0, result.output
    assert_parameter_line(result.stdout.splitlines()[-1], assert_mixtral_folder(out, dense))


def test_seed_command_as_printed_plans_without_writing(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke(*seed_command(tiny))
    assert result.exit_code == 0, result.output
    assert "nothing written" in result.stderr
    planned = surgery.plan(tiny, "mistral-to-mixtral", 4, 2).num_parameters
    assert result.stdout.splitlines() == [parameter_line(planned, planned)]
    assert list(tmp_path.iterdir()) == []


def test_target_form_dict_pool_and_llama(tmp_path):
    llama = save_tiny("llama", tmp_path / "llama", shards=2)
    method = tmp_path / "method.yaml"
    method.write_text("_target_: fusion_bench.method.MixtralForCausalLMUpscalingAlgorithm\n"
                      "num_experts: 2\nexperts_per_token: 1\nsave_checkpoint: null\n")
    pool = tmp_path / "pool.yaml"
    pool.write_text("_target_: fusion_bench.modelpool.CausalLMPool\nmodels:\n  _pretrained_: somewhere\n")
    out = tmp_path / "out"
    result = invoke(f"method={method}", f"modelpool={pool}", f"modelpool.models._pretrained_={llama}",
                    f"method.save_checkpoint={out}")
    assert result.exit_code == 0, result.output
    moe = assert_mixtral_folder(out, transformers.LlamaForCausalLM.from_pretrained(llama).eval(), "llama-to-mixtral")
    assert moe.config.num_local_experts == 2 and moe.config.num_experts_per_tok == 1


@pytest.mark.parametrize(
    ("arguments", "fragment"),
    [
        (["method.foo=1"], "method.foo: unknown key"),
        (["modelpool.tokenizer=x"], "modelpool.tokenizer: unknown key"),
        (["modelpool.models.0.name=base"], "no model named _pretrained_ (found: base)"),
        (["modelpool.models.1.path=x"], "modelpool.models.1: not an index"),
        (["modelpool.models.0.path=MISSING"], "no such file or folder; give the dense checkpoint with modelpool.models.0.path="),
        (["method.name=simple_average"], "'simple_average' is not supported"),
        (["method.expert_per_token=8"], "experts_per_token must be from 1 to num_experts"),
        (["taskpool=clip_vit_classification"], "only dummy"),
        (["fabric.devices=1"], "expected method=..., modelpool=..."),
        (["method=no_such_method"], "no such file, nor a built-in method"),
        (["NONEMPTY"], "is not an empty folder"),
    ],
)
def test_cli_errors(tiny, tmp_path, arguments, fragment):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    nonempty = f"method.save_checkpoint={tmp_path / 'full'}"
    arguments = [nonempty if a == "NONEMPTY" else a.replace("MISSING", str(tmp_path / "missing")) for a in arguments]
    out = tmp_path / "out"
    result = invoke(*seed_command(tiny), f"method.save_checkpoint={out}", *arguments)
    assert_one_line_error(result, fragment)
    assert not out.exists()


def test_cli_refuses_unknown_keys_in_yaml_and_other_architectures(tiny, tmp_path):
    method, pool = seed_yaml_files(tmp_path)
    pool.write_text(pool.read_text() + "tokenizer: path_to_tokenizer\n")
    assert_one_line_error(invoke(f"method={method}", f"modelpool={pool}"), "modelpool.tokenizer: unknown key")
    gpt2 = shutil.copytree(tiny, tmp_path / "gpt2")
    config = json.loads((gpt2 / "config.json").read_text())
    (gpt2 / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    result = invoke(*seed_command(gpt2), f"method.save_checkpoint={tmp_path / 'out'}")
    assert_one_line_error(result, "model_type 'gpt2' has no built-in rule file to mixtral (accepted: llama, mistral)")
    assert_one_line_error(invoke("modelpool=mixtral_moe_upscaling"), "missing method=")


def test_compat_modules_import_neither_torch_nor_transformers():
    code = ("import sys, surgery.cli, surgery.compat.fusion_bench; "
            "print(sorted(m for m in ('torch', 'transformers', 'omegaconf') if m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"
