"""Peak memory of the real `surgery upcycle` CLI on synthetic Mistral-7B shapes, at several depths.

For each depth it writes a random bf16 Mistral-7B with that many layers, runs
`surgery upcycle SRC DST --rules mistral-to-mixtral --num-experts 4 --experts-per-token 2 --quiet`
as a child process, and records its peak RSS (ru_maxrss from os.wait4) and peak RssAnon (sampled from
/proc/<pid>/status every 10 ms). The growth per layer is the least-squares slope of peak RSS against
depth. `--engine` also measures two single-shard outputs of >= 4 GB: one made of copies, one made of
computed tensors (a bf16 -> fp32 cast). Results: memory.md, memory.json and memory.png in --out.

    python -m benchmarks.memory                           # depths 1,2,4,8 -> benchmarks/results/
    python -m benchmarks.memory --layers 1,4 --check      # the CI gate: non-zero exit over budget
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as `python benchmarks/memory.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (
    RECIPES, RECIPE_TEXT, command_line, dir_bytes, exit_on_sigterm, fits_on_disk, layer_list, machine, machine_line,
    place_arguments, planned_sizes, publish, run_measured, scratch, shapes_text, source_arch, stats_dict,
    upcycle_command,
)
from benchmarks.synthetic import write_synthetic

#: peak RSS allowed at every depth and in every engine case
RSS_BUDGET_MIB = 256
#: growth of peak RSS per layer allowed (least-squares slope)
GROWTH_BUDGET_MIB = 1.0
#: the engine cases: single-shard outputs of >= 4 GB
ENGINE_CASES = [
    dict(case="copies", layers=3, dtype=None, extra=["--max-shard-size", "1000GB"],
         what="identical experts: every byte but the routers copied with copy_file_range"),
    dict(case="computed", layers=2, dtype="fp32", extra=["--dtype", "fp32", "--max-shard-size", "1000GB"],
         what="--dtype fp32: every tensor cast bf16 -> fp32 in chunks, routers drawn in chunks"),
]


def measure(layers: int, root: Path, extra: Sequence[str] = (), dtype: str | None = None, label: str = "",
            recipe: str = "copy") -> dict:
    """Upcycle a fresh `layers`-layer synthetic Mistral-7B once; sizes and memory, or why it was skipped."""
    label = label or f"{layers} layers"
    sizes = planned_sizes(layers, root, dtype, recipe)
    row = {"layers": layers, "source_bytes": sizes.source_bytes, "output_params": sizes.output_params,
           "planned_output_bytes": sizes.output_bytes, "copied_fraction": round(sizes.copied_bytes / sizes.output_bytes, 6)}
    fits, message = fits_on_disk(sizes.disk_needed, root)
    if not fits:
        print(f"  skipped {label}: {message}", flush=True)
        return {**row, "skipped": message}
    try:
        with scratch(root) as folder:
            src = write_synthetic(folder / "src", layers=layers, arch=source_arch(recipe))
            stats = run_measured(upcycle_command(src, folder / "out", list(extra), recipe), folder / "log.txt")
            row["output_bytes"] = dir_bytes(folder / "out")
        if row["output_bytes"] < sizes.output_bytes:
            raise RuntimeError(f"wrote {row['output_bytes']:,} bytes, the plan says {sizes.output_bytes:,}")
    except (OSError, RuntimeError) as exc:  # e.g. the disk filled up: record it, measure the other depths
        print(f"  {label} failed: {exc}", flush=True)
        return {**row, "error": str(exc)[-500:]}
    print(f"  {label}: {row['output_bytes'] / 1e9:.2f} GB out, peak RSS {stats.maxrss_mib:.1f} MiB, "
          f"RssAnon {stats.rss_anon_mib:.1f} MiB, {stats.wall_s:.1f} s", flush=True)
    return {**row, **stats_dict(stats)}


def slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of ys against xs (None with fewer than two distinct xs)."""
    if len(set(xs)) < 2:
        return None
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def budget_failures(depths: list[dict], engine: list[dict], growth: float | None) -> list[str]:
    """Every budget exceeded, as one line each."""
    failures = [f"{r.get('case', 'upcycle')} at {r['layers']} layers: peak RSS {r['maxrss_mib']:.1f} MiB > {RSS_BUDGET_MIB} MiB"
                for r in depths + engine if "maxrss_mib" in r and r["maxrss_mib"] > RSS_BUDGET_MIB]
    failures += [f"{r.get('case', 'upcycle')} at {r['layers']} layers failed" for r in depths + engine if "error" in r]
    if not any("maxrss_mib" in r for r in depths):
        failures.append("no depth was measured")
    if growth is not None and growth >= GROWTH_BUDGET_MIB:
        failures.append(f"peak RSS grows {growth:.3f} MiB/layer >= {GROWTH_BUDGET_MIB} MiB/layer")
    return failures


def markdown(result: dict) -> str:
    """The results as markdown tables."""
    g, ga = result["growth_mib_per_layer"], result["rss_anon_growth_mib_per_layer"]
    lines = [
        f"# Peak memory of `surgery upcycle` ({result['recipe']})",
        "",
        f"Synthetic {shapes_text(result.get('arch', 'mistral-7b'))}, "
        "random bf16 in 5 GB shards; the real CLI as a child process. Peak RSS is its ru_maxrss from os.wait4 "
        "(spawned by a ~10 MiB launcher: Linux starts a child's ru_maxrss at its spawner's RSS); VmHWM and RssAnon "
        "are the peaks of /proc/<pid>/status sampled every 10 ms. GB = 10^9 bytes. Wall: the command alone, "
        "warm page cache, output not synced (for timing see throughput.md).",
        "",
        f"Machine: {machine_line(result['machine'])}.",
        "",
        "| layers | source GB | output GB | output params | peak RSS (MiB) | VmHWM (MiB) | peak RssAnon (MiB) | wall (s) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["depths"]:
        if "maxrss_mib" not in r:
            lines.append(f"| {r['layers']} | {r['source_bytes'] / 1e9:.2f} | {r['planned_output_bytes'] / 1e9:.2f} | "
                         f"{r['output_params']:,} | {_not_measured(r)} | | | |")
        else:
            lines.append(f"| {r['layers']} | {r['source_bytes'] / 1e9:.2f} | {r['output_bytes'] / 1e9:.2f} | "
                         f"{r['output_params']:,} | {r['maxrss_mib']:.1f} | {r['sampled_hwm_mib']:.1f} | "
                         f"{r['rss_anon_mib']:.1f} | {r['wall_s']:.1f} |")
    lines += [
        "",
        "Growth per layer (least-squares slope): "
        + (f"peak RSS {g:+.3f} MiB/layer, RssAnon {ga:+.3f} MiB/layer." if g is not None else "n/a (one depth)."),
        f"Budgets: peak RSS <= {RSS_BUDGET_MIB} MiB at every depth, growth < {GROWTH_BUDGET_MIB:g} MiB/layer: "
        + ("**pass**." if not result["failures"] else "**FAIL**: " + "; ".join(result["failures"]) + "."),
    ]
    if result["engine"]:
        lines += [
            "",
            "## Engine: single-shard outputs of >= 4 GB",
            "",
            "| case | layers | output GB | copied bytes | peak RSS (MiB) | peak RssAnon (MiB) | wall (s) | what |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for r in result["engine"]:
            if "maxrss_mib" not in r:
                lines.append(f"| {r['case']} | {r['layers']} | {r['planned_output_bytes'] / 1e9:.2f} | | "
                             f"{_not_measured(r)} | | | {r['what']} |")
                continue
            lines.append(f"| {r['case']} | {r['layers']} | {r['output_bytes'] / 1e9:.2f} | {100 * r['copied_fraction']:.4f}% | "
                         f"{r['maxrss_mib']:.1f} | {r['rss_anon_mib']:.1f} | {r['wall_s']:.1f} | {r['what']} |")
    lines += ["", f"Regenerate: `{result['command']}`", ""]
    return "\n".join(lines)


def _not_measured(row: dict) -> str:
    return f"skipped: {row['skipped']}" if "skipped" in row else "failed (see memory.json)"


def plot(result: dict, path: Path) -> None:
    """Peak RSS and RssAnon against output size, with the budget line; matplotlib is imported only here."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depths = [r for r in result["depths"] if "maxrss_mib" in r]
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=100)
    xs = [r["output_bytes"] / 1e9 for r in depths]
    ax.plot(xs, [r["maxrss_mib"] for r in depths], "o-", label="peak RSS (ru_maxrss)")
    ax.plot(xs, [r["rss_anon_mib"] for r in depths], "s--", label="peak RssAnon (sampled)")
    for x, r in zip(xs, depths):
        ax.annotate(f"{r['layers']}L", (x, r["maxrss_mib"]), textcoords="offset points", xytext=(0, 7),
                    ha="center", fontsize=8)
    for r, marker in zip(result["engine"], "^v"):
        if "maxrss_mib" in r:
            ax.plot([r["output_bytes"] / 1e9], [r["maxrss_mib"]], marker, markersize=9, linestyle="none",
                    label=f"{r['case']}: {r['layers']}L, one {r['output_bytes'] / 1e9:.1f} GB shard (peak RSS)")
    ax.axhline(RSS_BUDGET_MIB, color="red", linestyle=":", label=f"budget {RSS_BUDGET_MIB} MiB")
    ax.set_ylim(0, RSS_BUDGET_MIB * 1.15)
    ax.set_xlim(left=0)
    ax.set_xlabel("output size (GB); point labels: layers")
    ax.set_ylabel("MiB")
    ax.set_title("surgery upcycle Mistral-7B shapes -> Mixtral (4 experts, top-2): peak memory", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="python -m benchmarks.memory",
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--layers", type=layer_list, default=[1, 2, 4, 8], help="depths, e.g. 1,4 (default: 1,2,4,8)")
    parser.add_argument("--engine", action="store_true", help="also measure the two >= 4 GB single-shard outputs")
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="copy",
                        help="copy: identical experts; scaled: every expert's down_proj scaled; fp32: all cast")
    parser.add_argument("--name", default="memory", help="results file name (default: memory)")
    parser.add_argument("--check", action="store_true", help="exit 1 if a budget is exceeded (the CI gate)")
    place_arguments(parser)
    parser.add_argument("--no-plot", action="store_true", help="skip memory.png (no matplotlib needed)")
    parser.add_argument("--replot", action="store_true", help="only redraw memory.md and memory.png from memory.json in --out")
    args = parser.parse_args(argv)
    exit_on_sigterm()

    if args.replot:
        result = json.loads((args.out / "memory.json").read_text())
        (args.out / "memory.md").write_text(markdown(result))
        plot(result, args.out / "memory.png")
        return 0
    command = command_line("memory", argv)
    print(f"upcycle at depths {args.layers} (scratch in {args.workdir})", flush=True)
    depths = [measure(layers, args.workdir, recipe=args.recipe) for layers in args.layers]
    engine = []
    if args.engine:
        print("engine cases", flush=True)
        for case in ENGINE_CASES:
            row = measure(case["layers"], args.workdir, case["extra"], case["dtype"], f"{case['case']}, {case['layers']} layers")
            engine.append({"case": case["case"], "what": case["what"], "cli_options": case["extra"], **row})
    measured = [r for r in depths if "maxrss_mib" in r]
    xs = [r["layers"] for r in measured]
    growth = slope(xs, [r["maxrss_mib"] for r in measured])
    anon_growth = slope(xs, [r["rss_anon_mib"] for r in measured])
    result = {
        "command": command,
        "recipe": RECIPE_TEXT[args.recipe],
        "arch": source_arch(args.recipe),
        "budgets": {"peak_rss_mib": RSS_BUDGET_MIB, "growth_mib_per_layer": GROWTH_BUDGET_MIB},
        "machine": machine(),
        "depths": depths,
        "growth_mib_per_layer": None if growth is None else round(growth, 4),
        "rss_anon_growth_mib_per_layer": None if anon_growth is None else round(anon_growth, 4),
        "engine": engine,
        "failures": budget_failures(depths, engine, growth),
    }
    publish(args.out, args.name, result, markdown(result))
    if not args.no_plot and measured:
        plot(result, args.out / f"{args.name}.png")
        print(f"wrote {args.out / f'{args.name}.png'}")
    for failure in result["failures"]:
        print(f"over budget: {failure}", file=sys.stderr)
    return 1 if args.check and result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
