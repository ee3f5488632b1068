"""`--json`: each command prints exactly one JSON document on stdout, holding the numbers its text output shows."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from click.testing import CliRunner

import surgery
from surgery.cli import main
from surgery.report import human_bytes, human_count

RECIPE = ["--rules", "mistral-to-mixtral", "--num-experts", "4", "--experts-per-token", "2"]


def run(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def document(*args: object) -> dict:
    """The command's stdout parsed as one JSON object (json.loads refuses anything after the document)."""
    result = run(*args, "--json")
    assert result.exit_code == 0, result.output
    parsed = json.loads(result.stdout)
    assert isinstance(parsed, dict) and parsed["surgery_version"] == surgery.__version__
    return parsed


@pytest.fixture(scope="module")
def mistral_7b(tmp_path_factory):
    """A header-only Mistral-7B (32 layers, data left as holes): plans in milliseconds, holds a few KB."""
    from benchmarks.synthetic import write_synthetic

    return write_synthetic(tmp_path_factory.mktemp("json") / "mistral-7b", layers=32, holes=True)


@pytest.fixture
def upcycled(mistral, tmp_path):
    """A private copy of the tiny Mistral and its upcycled output."""
    src = shutil.copytree(mistral, tmp_path / "src")
    assert run("upcycle", src, tmp_path / "out", *RECIPE, "--quiet").exit_code == 0
    return src, tmp_path / "out"


def line(text: str, prefix: str) -> str:
    return next(row for row in text.splitlines() if row.startswith(prefix))


def test_plan_json_holds_the_numbers_of_the_text(mistral_7b):
    text = run("plan", mistral_7b, *RECIPE).stdout
    doc = document("plan", mistral_7b, *RECIPE)
    counts = doc["parameters"]
    assert (counts["source"], counts["total"], counts["active"]) == (7_241_732_096, 24_153_690_112, 12_879_400_960)
    assert (f"parameters: {counts['source']:,} -> {counts['total']:,} total "
            f"({human_count(counts['source'])} -> {human_count(counts['total'])}), "
            f"{counts['active']:,} active per token") in text
    size = doc["bytes"]
    assert size["total"] == 48_307_380_224 and size["copied"] + size["computed"] == size["total"]
    output = line(text, "output:")
    assert f"{size['total']:,} bytes" in output and f"in {len(doc['shards'])} shard(s)" in output
    assert f"{human_bytes(size['copied'])} copied as is, {human_bytes(size['computed'])} computed" in output
    assert line(text, "tensors:") == f"tensors:    {doc['num_tensors']}"
    assert doc["exact"]["function_preserving"] is True
    assert line(text, "exact:") == f"exact:      function-preserving at init: yes ({doc['exact']['reason']})"
    assert doc["source"]["parameters"] == counts["source"] and doc["source"]["model_type"] == "mistral"
    assert doc["recipe"]["parameters"]["num_experts"] == 4 and doc["recipe"]["seed"] == 0
    assert doc["config"]["num_local_experts"] == 4 and doc["config"]["model_type"] == "mixtral"


def test_plan_json_rules_and_shards_match_the_text(mistral_7b):
    text = run("plan", mistral_7b, *RECIPE).stdout
    doc = document("plan", mistral_7b, *RECIPE)
    assert doc["rules_applied"], "the built-in rule file has tensor rules"
    for rule in doc["rules_applied"]:
        assert (f"  {rule['rule']}: {rule['for_each']} -> {rule['to']}: {rule['matched']} matched, "
                f"{rule['written']} written ({human_bytes(rule['copied_bytes'])} copied, "
                f"{human_bytes(rule['computed_bytes'])} computed)") in text.splitlines()
    assert f"  unchanged (no rule took them, copied as is): {doc['unchanged']['tensors']}" in text.splitlines()
    rule_bytes = sum(r["copied_bytes"] + r["computed_bytes"] for r in doc["rules_applied"])
    assert rule_bytes + doc["unchanged"]["bytes"] == doc["bytes"]["total"]
    shard_rows = re.findall(r"^  (model-\d+-of-\d+\.safetensors)\s+(.+?)\s+(\d+) tensors$", text, re.MULTILINE)
    assert shard_rows == [(s["name"], human_bytes(s["bytes"]), str(s["tensors"])) for s in doc["shards"]]
    assert sum(s["bytes"] for s in doc["shards"]) == doc["bytes"]["total"]
    assert sum(s["tensors"] for s in doc["shards"]) == doc["num_tensors"]
    assert "tensors" not in doc, "the tensor list comes only with --tensors"


def test_plan_json_tensor_list_matches_the_text(mistral):
    text = run("plan", mistral, *RECIPE, "--tensors").stdout
    doc = document("plan", mistral, *RECIPE, "--tensors")
    listed = text.split("\ntensors:\n", 1)[1].splitlines()
    assert len(doc["tensors"]) == doc["num_tensors"] == len(listed)
    for row, tensor in zip(listed, doc["tensors"]):
        assert row == f"  {tensor['name']}  {tensor['dtype']}{tensor['shape']}  <- {tensor['origin']}"
    routers = [t for t in doc["tensors"] if t["name"].endswith("block_sparse_moe.gate.weight")]
    assert routers and not any(t["copy"] for t in routers)
    assert sum(t["bytes"] for t in doc["tensors"] if not t["copy"]) == doc["bytes"]["computed"]


def test_inspect_json_matches_the_text(mistral_7b):
    doc = document("inspect", mistral_7b)
    assert doc["parameters"] == {"trainable": 7_241_732_096, "total": 7_241_732_096, "trainable_percent": 100.0}
    total = doc["parameters"]["total"]
    assert run("inspect", mistral_7b).stdout.strip() == (
        f"trainable params: {human_count(total)} || all params: {human_count(total)} || trainable%: 100.0000")
    assert doc["model_type"] == "mistral" and doc["bytes"] == 2 * total and len(doc["files"]) >= 2
    assert doc["parameters"]["total"] == document("plan", mistral_7b, *RECIPE)["parameters"]["source"]


def test_verify_json_matches_the_text(upcycled):
    src, out = upcycled
    text = run("verify", src, out, *RECIPE, "--quiet").stdout
    doc = document("verify", src, out, *RECIPE)  # with the progress bar: it goes to stderr
    assert doc["verified"] is True and text.strip() == f"verified: {doc['tensors']} tensors in {out} match the plan byte for byte"
    planned = document("plan", src, *RECIPE)
    assert doc["tensors"] == planned["num_tensors"] and doc["bytes"] == planned["bytes"]["total"]
    assert doc["rules"] == planned["rules"] and doc["recipe"] == planned["recipe"]


def test_rules_json_matches_the_text():
    listing = run("rules").stdout.splitlines()
    doc = document("rules")
    assert [r["name"] for r in doc["rules"]] == [row.split()[0] for row in listing]
    for rule, row in zip(doc["rules"], listing):
        targets = rule["target_model_types"]
        shown = "the same" if targets == rule["source_model_types"] and len(targets) > 1 else ", ".join(targets)
        assert row.endswith(f"-> {shown}: {rule['description']}")
        assert ", ".join(rule["source_model_types"]) in row
    shown = document("rules", "mistral-to-mixtral")
    assert shown["text"] == run("rules", "mistral-to-mixtral").stdout
    assert {"num_experts", "experts_per_token"} <= set(shown["parameters"])
    assert shown["parameters"]["num_experts"]["type"] == "int" and shown["source_model_types"] == ["mistral"]


@pytest.mark.parametrize("command", [
    ["plan", "{src}", "--rules", "no-such-rules", "-e", "4", "-k", "2"],
    ["plan", "{src}", *RECIPE[:-1], "5"],
    ["inspect", "{missing}"],
    ["verify", "{src}", "{src}", *RECIPE, "--quiet"],
    ["rules", "nope"],
])
def test_errors_go_to_stderr_with_nothing_on_stdout(mistral, tmp_path, command):
    args = [a.format(src=mistral, missing=tmp_path / "missing") for a in command]
    result = run(*args, "--json")
    assert result.exit_code != 0 and result.stdout == ""
    assert result.stderr.startswith("Error: ") and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_a_failed_verification_is_an_error_not_a_document(upcycled):
    src, out = upcycled
    shard = sorted(out.glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01
    shard.write_bytes(bytes(data))
    result = run("verify", src, out, *RECIPE, "--quiet", "--json")
    assert result.exit_code == 1 and result.stdout == "" and "does not hold the planned bytes" in result.stderr
