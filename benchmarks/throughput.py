"""Wall time of the real `surgery upcycle` CLI against `cp` of the same number of output bytes.

For each depth it writes a random bf16 Mistral-7B with that many layers and a file of the upcycle's
planned output size (the source shards concatenated, in the kernel), then runs, interleaved,
`cp --reflink=never FILE COPY`, `surgery upcycle ...`, `cp ...`, `surgery upcycle ...` (--repeats pairs).
Before every timed run it syncs and drops the page cache (root only; whether it worked is recorded),
so both read their input from disk. A run's time is the command plus the `sync` that puts its output
on disk. Reported: the median over pairs of upcycle/cp. Results: throughput.md and .json in --out.

    python -m benchmarks.throughput                       # depths 1,2,4,8, 3 pairs each
    python -m benchmarks.throughput --layers 1 --repeats 2
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python benchmarks/throughput.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (
    RECIPES, RECIPE_TEXT, command_line, dir_bytes, drop_caches, exit_on_sigterm, fits_on_disk, layer_list, machine,
    machine_line, place_arguments, planned_sizes, publish, run_measured, scratch, shapes_text, source_arch,
    upcycle_command,
)
from benchmarks.synthetic import write_synthetic


def concatenate(sources: list[Path], path: Path, nbytes: int) -> None:
    """Write `nbytes` into `path` by copying the `sources` one after the other, round and round."""
    from surgery.copying import copy_range

    with open(path, "wb") as out:
        written = 0
        while written < nbytes:
            for source in sources:
                length = min(source.stat().st_size, nbytes - written)
                with open(source, "rb") as f:
                    copy_range(f.fileno(), out.fileno(), 0, length)
                written += length
                if written == nbytes:
                    break


def timed(cmd: list[str], log: Path, cold: bool) -> dict:
    """Run `cmd` from a cold (or just synced) page cache; its time including the sync of its output."""
    dropped = drop_caches() if cold else (os.sync() or False)
    stats = run_measured(cmd, log)
    start = time.perf_counter()
    os.sync()
    sync_s = time.perf_counter() - start
    return {"command_s": round(stats.wall_s, 3), "sync_s": round(sync_s, 3), "total_s": round(stats.wall_s + sync_s, 3),
            "maxrss_mib": round(stats.maxrss_mib, 1), "disk_read_gb": round(stats.disk_read_gb, 3),
            "disk_written_gb": round(stats.disk_written_gb, 3), "caches_dropped": dropped}


def measure(layers: int, repeats: int, root: Path, cold: bool, recipe: str = "copy", jobs: int = 1) -> dict:
    """Interleaved cp / upcycle pairs at one depth (the upcycle with `jobs` processes)."""
    sizes = planned_sizes(layers, root, recipe=recipe)
    row: dict = {"layers": layers, "output_bytes": sizes.output_bytes}
    fits, message = fits_on_disk(sizes.source_bytes + 2 * sizes.output_bytes, root)
    if not fits:
        print(f"  skipped {layers} layers: {message}", flush=True)
        return {**row, "skipped": message}
    pairs = []
    with scratch(root) as folder:
        src = write_synthetic(folder / "src", layers=layers, arch=source_arch(recipe))
        blob, copy, out = folder / "blob", folder / "copy", folder / "out"
        concatenate(sorted(src.glob("*.safetensors")), blob, sizes.output_bytes)
        for i in range(repeats):
            cp = timed(["cp", "--reflink=never", str(blob), str(copy)], folder / "cp.log", cold)
            copy.unlink()
            upcycle = timed(upcycle_command(src, out, ["--jobs", str(jobs)], recipe), folder / "upcycle.log", cold)
            if dir_bytes(out) < sizes.output_bytes:
                raise RuntimeError(f"upcycle wrote {dir_bytes(out):,} bytes, the plan says {sizes.output_bytes:,}")
            shutil.rmtree(out)
            pairs.append({"cp": cp, "upcycle": upcycle, "ratio": round(upcycle["total_s"] / cp["total_s"], 3),
                          "command_ratio": round(upcycle["command_s"] / cp["command_s"], 3)})
            print(f"  {layers} layers, pair {i + 1}: cp {cp['total_s']:.1f} s, upcycle {upcycle['total_s']:.1f} s, "
                  f"ratio {pairs[-1]['ratio']:.2f}", flush=True)
    median = lambda key, what: statistics.median(p[what][key] for p in pairs)  # noqa: E731
    return {
        **row,
        "pairs": pairs,
        "cp_median_s": median("total_s", "cp"),
        "upcycle_median_s": median("total_s", "upcycle"),
        "median_ratio": statistics.median(p["ratio"] for p in pairs),
        "median_command_ratio": statistics.median(p["command_ratio"] for p in pairs),
        "upcycle_peak_rss_mib": max(p["upcycle"]["maxrss_mib"] for p in pairs),
        "cp_disk_read_gb": median("disk_read_gb", "cp"),
        "upcycle_disk_read_gb": median("disk_read_gb", "upcycle"),
        "caches_dropped": all(p[w]["caches_dropped"] for p in pairs for w in ("cp", "upcycle")),
    }


def markdown(result: dict) -> str:
    """The results as a markdown table."""
    dropped = all(r.get("caches_dropped", True) for r in result["depths"])
    lines = [
        "# Wall time of `surgery upcycle` vs `cp` of the same bytes",
        "",
        f"{RECIPE_TEXT[result.get('recipe', 'copy')]}"
        + (f", `--jobs {result['jobs']}`" if result.get("jobs", 1) > 1 else "")
        + f", on synthetic {shapes_text(source_arch(result.get('recipe', 'copy')))} (random bf16, 5 GB shards). "
        f"Interleaved cp, upcycle, cp, upcycle, ... ({result['repeats']} pairs per depth); "
        + ("page cache dropped before every run" if dropped and result["cold"] else "page cache NOT dropped")
        + "; times include the `sync` that writes the output to disk. GB = 10^9 bytes. Disk reads are the "
        "child's ru_inblock: cp reads every output byte, upcycle reads each source byte it uses once (a tensor "
        "copied several times, such as an MLP into several experts, comes from the page cache after the first).",
        "",
        f"Machine: {machine_line(result['machine'])}.",
        "",
        "| layers | output GB | cp median (s) | upcycle median (s) | upcycle GB/s | median ratio upcycle/cp "
        "| ratio, commands only (no sync) | GB read from disk: cp / upcycle | upcycle peak RSS (MiB) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["depths"]:
        if "skipped" in r:
            lines.append(f"| {r['layers']} | {r['output_bytes'] / 1e9:.2f} | skipped: {r['skipped']} | | | | | | |")
            continue
        lines.append(f"| {r['layers']} | {r['output_bytes'] / 1e9:.2f} | {r['cp_median_s']:.1f} | {r['upcycle_median_s']:.1f} | "
                     f"{r['output_bytes'] / 1e9 / r['upcycle_median_s']:.2f} | **{r['median_ratio']:.2f}** | "
                     f"{r['median_command_ratio']:.2f} | {r['cp_disk_read_gb']:.2f} / {r['upcycle_disk_read_gb']:.2f} | "
                     f"{r['upcycle_peak_rss_mib']:.1f} |")
    lines += ["", f"Regenerate: `{result['command']}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="python -m benchmarks.throughput",
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--layers", type=layer_list, default=[1, 2, 4, 8], help="depths, e.g. 1,4 (default: 1,2,4,8)")
    parser.add_argument("--repeats", type=int, default=3, help="cp/upcycle pairs per depth (default: 3)")
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="copy",
                        help="copy: identical experts; scaled: every expert's down_proj scaled; fp32: all cast")
    parser.add_argument("--name", default="throughput", help="results file name (default: throughput)")
    parser.add_argument("--warm", action="store_true", help="do not drop the page cache before each run (only sync)")
    parser.add_argument("--jobs", type=int, default=1, help="processes writing shards (surgery's --jobs; default: 1)")
    place_arguments(parser)
    args = parser.parse_args(argv)
    exit_on_sigterm()

    cold = not args.warm
    if cold and not drop_caches():
        print("cannot drop the page cache here (not root?): runs start from a synced, warm cache", flush=True)
    command = command_line("throughput", argv)
    print(f"cp vs upcycle at depths {args.layers}, {args.repeats} pairs each (scratch in {args.workdir})", flush=True)
    depths = [measure(layers, args.repeats, args.workdir, cold, args.recipe, args.jobs) for layers in args.layers]
    result = {"command": command, "recipe": args.recipe, "jobs": args.jobs, "repeats": args.repeats,
              "cold": cold, "machine": machine(), "depths": depths}
    publish(args.out, args.name, result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
