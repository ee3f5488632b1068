"""README stays true: CI runs its exact commands."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    quickstart = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    return [block.split("\n", 1)[1].strip() for block in quickstart.split("```bash")[1:]]


def test_ci_runs_both_quickstart_commands_verbatim():
    commands = readme_commands()
    ci = (ROOT / ".ci" / "run").read_text()
    assert len(commands) == 2
    install_and_demo, tests = (c.split("\n```")[0].strip() for c in commands)
    assert install_and_demo in ci and "surgery demo" in install_and_demo
    assert tests in ci.splitlines(), "the README's test command must stand alone on a line of .ci/run"


def test_custom_rule_file_example_works(mistral, tmp_path):
    import json

    import numpy as np
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, MixtralForCausalLM

    import surgery

    text = (ROOT / "README.md").read_text().split("## Rule files", 1)[1]
    (tmp_path / "my.yaml").write_text(text.split("```yaml\n", 1)[1].split("```", 1)[0])
    out = surgery.upcycle(mistral, tmp_path / "out", rules=surgery.load_rules(tmp_path / "my.yaml"),
                          num_experts=8, experts_per_token=2, progress=False)
    assert json.loads((out / "config.json").read_text())["router_aux_loss_coef"] == 0.08
    with safe_open(out / "model.safetensors", "np") as f:
        router = f.get_tensor("model.layers.0.block_sparse_moe.gate.weight")
    assert router.dtype == np.float16 and abs(float(router.std()) - 0.01) < 0.003
    ids = torch.arange(24).reshape(2, 12)
    with torch.no_grad():
        dense = AutoModelForCausalLM.from_pretrained(mistral).eval()(ids).logits
        moe = MixtralForCausalLM.from_pretrained(out, dtype=torch.float32).eval()(ids).logits
    assert (moe - dense).abs().max().item() <= 1e-5
