"""Human-readable numbers and summaries: parameter counts in the seed's format, plan tables, model cards."""

from __future__ import annotations

import json
from collections import Counter

from . import __version__
from .plan import Plan


def human_count(n: float) -> str:
    """7241732096 -> '7.24B' (K/M/B/T, two decimals, thousands as 1000)."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def human_bytes(n: int) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def parameter_line(trainable: int, total: int) -> str:
    """The seed's format: `trainable params: 7.24B || all params: 7.24B || trainable%: 100.0000`."""
    percent = 100 * trainable / total if total else 0.0
    return f"trainable params: {human_count(trainable)} || all params: {human_count(total)} || trainable%: {percent:.4f}"


def plan_summary(plan: Plan, list_tensors: bool = False) -> str:
    """What `surgery plan` prints: parameters, bytes, what each rule does, and the shard layout."""
    src, opts = plan.source, plan.options
    shards = plan.shards()
    by_rule = Counter(p.rule for p in plan.tensors)
    lines = [
        f"source:     {src.location} ({src.config.get('model_type')}, {src.num_parameters:,} parameters, "
        f"{len({t.file for t in src.tensors.values()})} file(s))" + (f" @ {src.revision}" if src.revision else ""),
        f"rules:      {plan.rules.name} ({plan.rules.path})",
        f"target:     {plan.config.get('model_type')} {', '.join(plan.config.get('architectures', []))}",
        f"options:    {opts.num_experts} experts, top-{opts.experts_per_token}, router {opts.router_init}"
        + (f"(std {opts.router_std:g})" if opts.router_init == "normal" else "")
        + f", seed {opts.seed}, dtype {opts.dtype or 'as source'}",
        f"parameters: {src.num_parameters:,} -> {plan.num_parameters:,} total "
        f"({human_count(src.num_parameters)} -> {human_count(plan.num_parameters)}), "
        f"{plan.active_parameters:,} active per token ({human_count(plan.active_parameters)})",
        f"output:     {plan.nbytes:,} bytes ({human_bytes(plan.nbytes)}) in {len(shards)} shard(s) "
        f"of at most {human_bytes(opts.max_shard_size)}",
        f"tensors:    {len(plan.tensors)}",
    ]
    for rule in plan.rules.tensors:
        lines.append(
            f"  {rule.where}: {rule.source or 'new'} -> {rule.to}: {plan.rule_counts.get(rule.where, 0)} matched, "
            f"{by_rule.get(rule.where, 0)} written"
        )
    lines.append(f"  unchanged (no rule matched, copied as is): {by_rule.get('unchanged', 0)}")
    lines.append("shards:")
    lines += [f"  {name}  {human_bytes(sum(t.nbytes for t in ts)):>10}  {len(ts)} tensors" for name, ts in shards]
    if list_tensors:
        lines.append("tensors:")
        lines += [
            f"  {p.tensor.name}  {p.tensor.dtype}{list(p.tensor.shape)}  <- "
            + (f"{p.source} ({p.tensor.producer.describe()})" if p.source else p.tensor.producer.describe())
            for p in plan.tensors
        ]
    return "\n".join(lines)


def model_card(plan: Plan, command: str | None = None) -> str:
    """README.md for the output folder: the recipe, so the result can be reproduced."""
    src, opts = plan.source, plan.options
    recipe = {
        "source": src.location,
        "source_revision": src.revision,
        "rules": plan.rules.name,
        "rules_sha256": plan.rules.sha256,
        "num_experts": opts.num_experts,
        "experts_per_token": opts.experts_per_token,
        "router_init": opts.router_init,
        "router_std": opts.router_std,
        "seed": opts.seed,
        "dtype": opts.dtype or "as source",
        "surgery_version": __version__,
    }
    lines = [
        "---",
        "tags: [moe, upcycled, surgery]",
        *([f"base_model: {src.location}"] if src.revision else []),  # a Hub source: link the model back to it
        "---",
        f"# {plan.config.get('model_type')} upcycled from {src.location}",
        "",
        f"Sparse upcycling (arXiv 2212.05055) with surgery "
        f"rule file `{plan.rules.name}`: {plan.rules.description}",
        "",
        "| | parameters |",
        "|---|---|",
        f"| source | {src.num_parameters:,} ({human_count(src.num_parameters)}) |",
        f"| this model | {plan.num_parameters:,} ({human_count(plan.num_parameters)}) |",
        f"| active per token | {plan.active_parameters:,} ({human_count(plan.active_parameters)}) |",
        "",
        "The experts start as copies of the dense MLP and the router is freshly initialised: continue",
        "pre-training this model before use.",
        "",
        "## Recipe",
        "```json",
        json.dumps(recipe, indent=2),
        "```",
    ]
    if command:
        lines += ["", "Command:", "```", command, "```"]
    return "\n".join(lines) + "\n"
