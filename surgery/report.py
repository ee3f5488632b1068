"""Human-readable numbers and summaries: parameter counts in the seed's format, plan tables, model cards."""

from __future__ import annotations

import json

from . import __version__
from .plan import Plan
from .writer import plan_shards


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
    """What `surgery plan` prints: parameters, bytes, what each rule does, exactness, and the shard layout."""
    src, opts = plan.source, plan.options
    shards = plan.shards()
    copied, computed = byte_split(plan)
    unchanged = [p for p in plan.tensors if p.rule == "unchanged"]
    lines = [
        f"source:     {src.location} ({src.config.get('model_type')}, {src.num_parameters:,} parameters, "
        f"{len({t.file for t in src.tensors.values()})} file(s))" + (f" @ {src.revision}" if src.revision else ""),
        *[f"source {name}: {other.location}" + (f" @ {other.revision}" if other.revision else "")
          for name, other in plan.sources.items() if other is not src],
        *[f"note:       {note}" for note in plan.notes],
        f"rules:      {plan.rules.name} ({plan.rules.path})",
        f"target:     {plan.config.get('model_type')} {', '.join(plan.config.get('architectures', []))}",
        f"recipe:     {''.join(f'{k}={v}, ' for k, v in plan.params.items())}seed {opts.seed}, "
        f"dtype {opts.dtype or 'as source'}",
        f"parameters: {src.num_parameters:,} -> {plan.num_parameters:,} total "
        f"({human_count(src.num_parameters)} -> {human_count(plan.num_parameters)}), "
        f"{plan.active_parameters:,} active per token ({human_count(plan.active_parameters)})",
        f"output:     {plan.nbytes:,} bytes ({human_bytes(plan.nbytes)}) in {len(shards)} shard(s) "
        f"of at most {human_bytes(opts.max_shard_size)}; {human_bytes(copied)} copied as is, "
        f"{human_bytes(computed)} computed",
        f"sharing:    {sharing_line(plan)}",
        f"exact:      {exactness_line(plan)}",
        f"tensors:    {len(plan.tensors)}",
    ]
    for rule in plan.rules.tensors:
        stats = plan.stats[rule.where]
        lines.append(
            f"  {rule.where}: {rule.for_each} -> {rule.to}: {stats.matched} matched, {stats.outputs} written "
            f"({human_bytes(stats.copied)} copied, {human_bytes(stats.computed)} computed)"
        )
    lines.append(f"  unchanged (no rule took them, copied as is): {len(unchanged)}")
    lines.append("shards:")
    lines += [f"  {name}  {human_bytes(sum(t.nbytes for t in ts)):>10}  {len(ts)} tensors" for name, ts in shards]
    if list_tensors:
        lines.append("tensors:")
        lines += [f"  {p.tensor.name}  {p.tensor.dtype}{list(p.tensor.shape)}  <- {p.tensor.producer.describe()}"
                  for p in plan.tensors]
    return "\n".join(lines)


def sharing_line(plan: Plan) -> str:
    """How many output bytes a reflink filesystem can share with the source instead of writing them: the copied
    bytes whose source and output offsets agree modulo 4096, in whole aligned blocks."""
    shareable = sum(s.shareable for s in plan_shards(plan.outputs, plan.options.max_shard_size))
    share = f"{100 * shareable / plan.nbytes:.1f}%" if plan.nbytes else "0%"
    return (f"{human_bytes(shareable)} ({share}) can share blocks with the source instead of being written, on a "
            "reflink filesystem (XFS, btrfs, ZFS >= 2.2, bcachefs) holding both the source and the output")


def exactness_line(plan: Plan) -> str:
    """`function-preserving at init: yes (why)`, `no (why)`, or that the rule file does not say."""
    verdict, why = plan.exact
    if verdict is None:
        return "function-preserving at init: not stated by the rule file"
    return f"function-preserving at init: {'yes' if verdict else 'no'} ({why})"


def byte_split(plan: Plan) -> tuple[int, int]:
    """(bytes copied as is, bytes computed) of the whole output; tensors no rule took count as copied."""
    unchanged = sum(p.tensor.nbytes for p in plan.tensors if p.rule == "unchanged")
    copied = sum(s.copied for s in plan.stats.values())
    return copied + unchanged, sum(s.computed for s in plan.stats.values())


def _tags(plan: Plan) -> list[str]:
    """`moe` where the rule file routes tokens to experts (an index with `active`), `upcycled` where it also
    changes the model type (a dense model made MoE), and `surgery`."""
    moe = any(index.active is not None for index in plan.rules.indices.values())
    upcycled = moe and plan.config.get("model_type") != plan.source.config.get("model_type")
    return [*(["moe"] if moe else []), *(["upcycled"] if upcycled else []), "surgery"]


def model_card(plan: Plan, command: str | None = None) -> str:
    """README.md for the output folder: the recipe, so the result can be reproduced."""
    src, opts = plan.source, plan.options
    recipe = {
        "source": src.location,
        "source_revision": src.revision,
        **({"sources": {name: {"location": other.location, "revision": other.revision}
                        for name, other in plan.sources.items() if other is not src}}
           if len(plan.sources) > 1 else {}),
        "rules": plan.rules.name,
        "rules_sha256": plan.rules.sha256,
        "parameters": plan.params,
        "seed": opts.seed,
        "dtype": opts.dtype or "as source",
        "surgery_version": __version__,
    }
    lines = [
        "---",
        f"tags: [{', '.join(_tags(plan))}]",
        *([f"base_model: {src.location}"] if src.revision else []),  # a Hub source: link the model back to it
        "---",
        f"# {plan.config.get('model_type')} made from {src.location}",
        "",
        f"Made with surgery, rule file `{plan.rules.name}`: {plan.rules.description}",
        "",
        "| | parameters |",
        "|---|---|",
        f"| source | {src.num_parameters:,} ({human_count(src.num_parameters)}) |",
        f"| this model | {plan.num_parameters:,} ({human_count(plan.num_parameters)}) |",
        f"| active per token | {plan.active_parameters:,} ({human_count(plan.active_parameters)}) |",
        "",
        exactness_line(plan)[0].upper() + exactness_line(plan)[1:] + ".",
        "",
        "## Recipe",
        "```json",
        json.dumps(recipe, indent=2),
        "```",
    ]
    if command:
        lines += ["", "Command:", "```", command, "```"]
    return "\n".join(lines) + "\n"
