"""Machine-readable output: the JSON documents that `plan`, `inspect`, `verify` and `rules` print with `--json`.

Each command prints one JSON object on stdout; counts and sizes are exact integers, never rounded. The shapes are
documented in docs/json.md. Errors are not documents: they go to stderr, with a non-zero exit.
"""

from __future__ import annotations

import json
import os

import yaml

from . import __version__
from .checkpoint import Checkpoint
from .plan import Plan, PlannedTensor, RuleStats
from .producers import Copy
from .report import byte_split
from .rules import RuleFile, TensorRule, find_rules, load_rules, target_model_types


def dumps(document: dict) -> str:
    """The text of one document, `surgery_version` first: indented, strict JSON (no NaN or Infinity)."""
    return json.dumps({"surgery_version": __version__, **document}, indent=2, allow_nan=False)


def plan_document(plan: Plan, list_tensors: bool = False) -> dict:
    """What `surgery plan --json` prints: the numbers of the text summary, unrounded, plus the output config."""
    copied, computed = byte_split(plan)
    unchanged = [p for p in plan.tensors if p.rule == "unchanged"]
    document = {
        "source": source_document(plan.source),
        "rules": rules_reference(plan.rules),
        "recipe": recipe_document(plan),
        "parameters": {"source": plan.source.num_parameters, "total": plan.num_parameters,
                       "active": plan.active_parameters},
        "bytes": {"total": plan.nbytes, "copied": copied, "computed": computed},
        "exact": exact_document(plan),
        "num_tensors": len(plan.tensors),
        "rules_applied": [rule_applied(rule, plan.stats[rule.where]) for rule in plan.rules.tensors],
        "unchanged": {"tensors": len(unchanged), "bytes": sum(p.tensor.nbytes for p in unchanged)},
        "shards": [{"name": name, "bytes": sum(t.nbytes for t in tensors), "tensors": len(tensors)}
                   for name, tensors in plan.shards()],
        "config": plan.config,
    }
    if list_tensors:
        document["tensors"] = [tensor_document(p) for p in plan.tensors]
    return document


def rule_applied(rule: TensorRule, stats: RuleStats) -> dict:
    """What one tensor rule did: source tensors matched, outputs written, bytes copied and computed."""
    return {"rule": rule.where, "for_each": rule.for_each, "to": rule.to, "matched": stats.matched,
            "written": stats.outputs, "copied_bytes": stats.copied, "computed_bytes": stats.computed}


def source_document(source: Checkpoint) -> dict:
    """Where the source is and how big: location, Hub revision (or null), model_type, parameters, weight files."""
    return {
        "location": source.location,
        "revision": source.revision,
        "model_type": source.config.get("model_type"),
        "parameters": source.num_parameters,
        "files": len({t.file for t in source.tensors.values()}),
    }


def rules_reference(rules: RuleFile) -> dict:
    """Which rule file: its name, path and the SHA-256 of its bytes."""
    return {"name": rules.name, "path": rules.path, "sha256": rules.sha256}


def recipe_document(plan: Plan) -> dict:
    """The rule file's parameter values and the write options (`dtype` null: as the source)."""
    opts = plan.options
    return {"parameters": plan.params, "seed": opts.seed, "dtype": opts.dtype, "max_shard_size": opts.max_shard_size}


def exact_document(plan: Plan) -> dict:
    """The exactness verdict: true or false with the rule file's reason, or null when the rule file does not say."""
    verdict, why = plan.exact
    return {"function_preserving": verdict, "reason": why if verdict is not None else None}


def tensor_document(planned: PlannedTensor) -> dict:
    """One output tensor and where its bytes come from (`copy`: moved as is, no value computed)."""
    tensor = planned.tensor
    return {
        "name": tensor.name,
        "dtype": tensor.dtype,
        "shape": list(tensor.shape),
        "bytes": tensor.nbytes,
        "rule": planned.rule,
        "sources": list(planned.sources),
        "copy": isinstance(tensor.producer, Copy),
        "origin": tensor.producer.describe(),
    }


def inspect_document(checkpoint: Checkpoint) -> dict:
    """What `surgery inspect --json` prints: the parameter counts of the text line, exact, and the checkpoint's size."""
    total = checkpoint.num_parameters
    return {
        "location": checkpoint.location,
        "revision": checkpoint.revision,
        "model_type": checkpoint.config.get("model_type"),
        "parameters": {"trainable": total, "total": total, "trainable_percent": 100.0 if total else 0.0},
        "num_tensors": len(checkpoint.tensors),
        "bytes": sum(t.nbytes for t in checkpoint.tensors.values()),
        "files": sorted({t.file for t in checkpoint.tensors.values()}),
    }


def verify_document(plan: Plan, dst: str | os.PathLike, count: int) -> dict:
    """What `surgery verify --json` prints once DST matched the plan (a mismatch is an error, not a document)."""
    return {
        "verified": True,
        "destination": str(dst),
        "source": plan.source.location,
        "rules": rules_reference(plan.rules),
        "recipe": recipe_document(plan),
        "tensors": count,
        "bytes": plan.nbytes,
    }


def rules_list_document(names: list[str]) -> dict:
    """What `surgery rules --json` prints: every built-in rule file, as the text listing shows it."""
    return {"rules": [_summary(load_rules(name)) for name in names]}


def rule_document(name: str) -> dict:
    """What `surgery rules NAME --json` prints: the file's summary, its declared parameters and its text."""
    rules = load_rules(name)
    text = find_rules(name).read_text()
    parameters = yaml.safe_load(text).get("parameters") or {}
    return {**_summary(rules), "sha256": rules.sha256, "parameters": parameters, "text": text}


def _summary(rules: RuleFile) -> dict:
    return {"name": rules.name, "description": rules.description, "path": rules.path,
            "source_model_types": list(rules.source_model_types), "target": dict(rules.target),
            "target_model_types": target_model_types(rules)}
