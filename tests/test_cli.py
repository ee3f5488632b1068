"""The CLI: every bad input gives one clear error line, a non-zero exit, and leaves DST absent or untouched."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from surgery.cli import main, parse_size

RECIPE = ["--rules", "mistral-to-mixtral", "--num-experts", "4", "--experts-per-token", "2", "--quiet"]


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception


@pytest.fixture
def src(mistral, tmp_path):
    """A private copy of the tiny Mistral that tests may damage."""
    return shutil.copytree(mistral, tmp_path / "src")


def test_upcycle_then_inspect_and_verify(src, tmp_path):
    result = run("upcycle", src, tmp_path / "out", *RECIPE)
    assert result.exit_code == 0, result.output
    inspected = run("inspect", tmp_path / "out")
    assert inspected.exit_code == 0
    assert inspected.output.startswith("trainable params: ") and "|| trainable%: 100.0000" in inspected.output
    verified = run("verify", src, tmp_path / "out", *RECIPE)
    assert verified.exit_code == 0 and "verified" in verified.output


def test_verify_detects_a_changed_byte(src, tmp_path):
    assert run("upcycle", src, tmp_path / "out", *RECIPE).exit_code == 0
    shard = sorted((tmp_path / "out").glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01
    shard.write_bytes(bytes(data))
    assert_one_line_error(run("verify", src, tmp_path / "out", *RECIPE), "does not hold the planned bytes")


BAD_OPTIONS = [
    (["--rules", "no-such-rules"], "unknown rule file"),
    (["--rules", "llama-to-mixtral"], "accepts llama"),
    (["--experts-per-token", "5"], "experts_per_token must be from 1 to num_experts (4), got 5"),
    (["--num-experts", "0"], "num_experts must be from 1 to 4096, got 0"),
    (["--dtype", "int4"], "unsupported dtype"),
]


@pytest.mark.parametrize("override,message", BAD_OPTIONS)
def test_bad_options(src, tmp_path, override, message):
    option, value = override
    args = list(RECIPE[:-1])
    if option in args:
        args[args.index(option) + 1] = value
    else:
        args += [option, value]
    args.append("--quiet")
    assert_one_line_error(run("upcycle", src, tmp_path / "out", *args), message)
    assert not (tmp_path / "out").exists()
    assert_one_line_error(run("plan", src, *args[:-1]), message)


def test_non_empty_destination_needs_overwrite(src, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "config.json").write_text("{}")
    (dst / "keep.txt").write_text("old output")
    assert_one_line_error(run("upcycle", src, dst, *RECIPE), "not empty", "--overwrite")
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "keep.txt"]
    assert run("upcycle", src, dst, *RECIPE, "--overwrite").exit_code == 0
    assert (dst / "model.safetensors").exists() and not (dst / "keep.txt").exists()


def test_overwrite_refuses_a_folder_that_is_not_a_checkpoint(src, tmp_path):
    dst = tmp_path / "home"
    (dst / "Documents").mkdir(parents=True)
    (dst / "notes.txt").write_text("precious")
    assert_one_line_error(run("upcycle", src, dst, *RECIPE, "--overwrite"), "does not look like a checkpoint")
    assert sorted(p.name for p in dst.iterdir()) == ["Documents", "notes.txt"]


def test_destination_inside_source_is_refused(src):
    assert_one_line_error(run("upcycle", src, src, *RECIPE, "--overwrite"), "source", str(src))


def test_missing_shard(src, tmp_path):
    sorted(src.glob("model-*.safetensors"))[1].unlink()
    assert_one_line_error(run("upcycle", src, tmp_path / "out", *RECIPE), "shard is missing")
    assert not (tmp_path / "out").exists()


def test_corrupt_header(src, tmp_path):
    shard = sorted(src.glob("model-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[8:9] = b"["
    shard.write_bytes(bytes(data))
    assert_one_line_error(run("upcycle", src, tmp_path / "out", *RECIPE), shard.name)
    assert not (tmp_path / "out").exists()


def test_malformed_rule_file_error_points_at_field(src, tmp_path):
    rules = tmp_path / "bad.yaml"
    rules.write_text(
        "name: bad\nsource: {model_type: [mistral]}\ntarget: {model_type: mixtral}\n"
        "tensors:\n  - from: model.layers.{layer}.mlp.gate_proj.weight\n    too: x\n"
    )
    args = list(RECIPE)
    args[1] = str(rules)
    assert_one_line_error(run("upcycle", src, tmp_path / "out", *args), "bad.yaml", "tensors[0]", "'too'")
    assert not (tmp_path / "out").exists()


def test_pickle_only_folder_is_refused(tmp_path):
    (tmp_path / "pt").mkdir()
    (tmp_path / "pt" / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    assert_one_line_error(run("inspect", tmp_path / "pt"), "pickle", "safe_serialization")


def test_failure_mid_write_leaves_destination_untouched(src, tmp_path, monkeypatch):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "config.json").write_text("old")
    import surgery.execute

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(surgery.execute, "write_index", boom)
    result = run("upcycle", src, dst, *RECIPE, "--overwrite", "--max-shard-size", "20KB")
    assert_one_line_error(result, "disk is full", "was not changed")
    assert [p.name for p in dst.iterdir()] == ["config.json"] and (dst / "config.json").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_plan_prints_counts_and_reads_no_tensor_data(src, monkeypatch):
    import os

    def no_data_reads(*args, **kwargs):
        raise AssertionError("plan must not read tensor data")

    monkeypatch.setattr(os, "pread", no_data_reads)
    monkeypatch.setattr(os, "copy_file_range", no_data_reads)
    result = run("plan", src, *RECIPE[:-1], "--tensors")
    assert result.exit_code == 0, result.output
    dense = json.loads((src / "config.json").read_text())
    hidden, inter, layers = dense["hidden_size"], dense["intermediate_size"], dense["num_hidden_layers"]
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in result.output
    mlp = 3 * hidden * inter * layers
    totals = [line for line in result.output.splitlines() if line.startswith("parameters:")][0]
    dense_params = int(totals.split()[1].replace(",", ""))
    assert f"-> {dense_params + 3 * mlp + 4 * hidden * layers:,} total" in totals
    assert f"{dense_params + mlp + 4 * hidden * layers:,} active" in totals


def test_rules_lists_and_shows_builtins():
    listing = run("rules")
    assert listing.exit_code == 0 and "mistral-to-mixtral" in listing.output and "llama-to-mixtral" in listing.output
    lines = {line.split()[0]: line for line in listing.output.splitlines()}
    assert "-> qwen3_5_moe_text, qwen3_5_moe:" in lines["qwen3-5-to-qwen3-5-moe"]  # a templated target, rendered
    assert "mistral, llama, qwen2, qwen3 -> the same:" in lines["depth-upscale"]
    assert len({len(line) - len(line[len(name):].lstrip()) for name, line in lines.items()}) == 1  # one column
    shown = run("rules", "llama-to-mixtral")
    assert "block_sparse_moe.experts.{expert}.w1.weight" in shown.output
    assert_one_line_error(run("rules", "nope"), "unknown rule file")


@pytest.mark.parametrize("text,expected", [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 * 2**30),
                                           ("1000", 1000), ("20KB", 20_000), ("1.5GB", 1_500_000_000)])
def test_sizes(text, expected):
    assert parse_size(text) == expected


def test_every_command_has_help():
    for command in ("upcycle", "plan", "inspect", "verify", "rules", "demo"):
        result = run(command, "--help")
        assert result.exit_code == 0 and "Usage:" in result.output and len(result.output) > 200


def test_demo(tmp_path):
    result = run("demo", tmp_path / "demo")
    assert result.exit_code == 0, result.output
    assert "verified: 41 tensors" in result.output
    assert result.output.count("trainable params: ") == 2


def test_quickstart_demo_runs_twice(tmp_path, monkeypatch):
    """The second `surgery demo` replaces the first one's output, and only that."""
    monkeypatch.chdir(tmp_path)
    assert run("demo").exit_code == 0
    again = run("demo")
    assert again.exit_code == 0, again.output
    assert "replacing the previous demo output in surgery-demo" in again.output and "verified: 41 tensors" in again.output
    assert [p.name for p in tmp_path.iterdir()] == ["surgery-demo"]


def _snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() if p.is_file() else None for p in folder.rglob("*")}


def _notes(folder):
    (folder / "notes.txt").write_text("precious")


def _other_checkpoint(folder):
    (folder / "config.json").write_text('{"model_type": "mixtral"}')
    (folder / "model.safetensors").write_bytes(b"not the demo's")


def _demo_plus_a_user_file(folder):
    assert run("demo", folder).exit_code == 0
    (folder / "my-notes.txt").write_text("precious")


def _demo_with_another_card(folder):
    assert run("demo", folder).exit_code == 0
    card = folder / "README.md"
    card.write_text(card.read_text().replace("surgery demo", "surgery upcycle"))


@pytest.mark.parametrize("make", [_notes, _other_checkpoint, _demo_plus_a_user_file, _demo_with_another_card])
def test_demo_leaves_a_folder_that_is_not_its_own_untouched(tmp_path, monkeypatch, make):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "surgery-demo"
    folder.mkdir()
    make(folder)
    before = _snapshot(folder)
    for _ in range(2):  # the second run replaces its own output in surgery-demo-2
        result = run("demo")
        assert result.exit_code == 0, result.output
        assert "surgery-demo holds other files, left untouched: writing to surgery-demo-2" in result.output
        assert _snapshot(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["surgery-demo", "surgery-demo-2"]


def test_plan_of_header_only_mistral_7b(tmp_path):
    """The seed's numbers: Mistral-7B -> 4 experts is 7.24B -> 24.15B parameters, 12.88B active at top-2."""
    from benchmarks.synthetic import write_synthetic

    path = write_synthetic(tmp_path / "mistral-7b", layers=32, holes=True)
    result = run("plan", path, *RECIPE[:-1])
    assert result.exit_code == 0, result.output
    assert "parameters: 7,241,732,096 -> 24,153,690,112 total (7.24B -> 24.15B)" in result.output
    assert "12,879,400,960 active per token (12.88B)" in result.output
    assert "48,307,380,224 bytes" in result.output
    inspected = run("inspect", path)
    assert inspected.output.strip() == "trainable params: 7.24B || all params: 7.24B || trainable%: 100.0000"
