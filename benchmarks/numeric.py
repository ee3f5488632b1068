"""Peak memory and time of `surgery verify --numeric` on synthetic Mistral-7B shapes, at several depths.

For each depth it writes a random bf16 Mistral-7B with that many layers, upcycles it (4 experts, top-2), then
runs `surgery verify SRC DST --rules mistral-to-mixtral -e 4 -k 2 --numeric --quiet` as a child process and
records its peak RSS (ru_maxrss from os.wait4) and wall time. Every layer's dense MLP and MoE block are loaded
alone, in fp32: memory should be about one layer's, whatever the depth. Results: numeric.md and .json in --out.

    python -m benchmarks.numeric --layers 4,32
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python benchmarks/numeric.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (
    RECIPES, command_line, exit_on_sigterm, fits_on_disk, layer_list, machine, machine_line, place_arguments,
    planned_sizes, publish, run_measured, scratch, stats_dict, surgery_command, upcycle_command,
)
from benchmarks.synthetic import write_synthetic


def measure(layers: int, root: Path) -> dict:
    sizes = planned_sizes(layers, root)
    row: dict = {"layers": layers, "output_bytes": sizes.output_bytes}
    fits, message = fits_on_disk(sizes.disk_needed, root)
    if not fits:
        print(f"  skipped {layers} layers: {message}", flush=True)
        return {**row, "skipped": message}
    with scratch(root) as folder:
        src = write_synthetic(folder / "src", layers=layers)
        run_measured(upcycle_command(src, folder / "out"), folder / "upcycle.log")
        verify = [*surgery_command(), "verify", str(src), str(folder / "out"), *RECIPES["copy"], "--numeric", "--quiet"]
        stats = run_measured(verify, folder / "verify.log")
        report = (folder / "verify.log").read_text()
    if f"{layers} of {layers} layers compute the source's function" not in report:
        raise RuntimeError(f"verify --numeric did not pass at {layers} layers:\n{report[-2000:]}")
    print(f"  {layers} layers: verify --numeric {stats.wall_s:.1f} s, peak RSS {stats.maxrss_mib:.0f} MiB", flush=True)
    return {**row, **stats_dict(stats)}


def markdown(result: dict) -> str:
    lines = [
        "# `surgery verify --numeric`: peak memory and time",
        "",
        "mistral-to-mixtral, 4 experts, top-2, on synthetic Mistral-7B shapes (random bf16); each layer's dense MLP "
        "and MoE block loaded alone by transformers in fp32 and run on 64 random hidden states. Peak RSS is the "
        "child's ru_maxrss; warm page cache.",
        "",
        f"Machine: {machine_line(result['machine'])}.",
        "",
        "| layers | output GB | verify --numeric (s) | s per layer | peak RSS (MiB) |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["depths"]:
        if "skipped" in r:
            lines.append(f"| {r['layers']} | {r['output_bytes'] / 1e9:.2f} | skipped: {r['skipped']} | | |")
            continue
        lines.append(f"| {r['layers']} | {r['output_bytes'] / 1e9:.2f} | {r['wall_s']:.1f} | "
                     f"{r['wall_s'] / r['layers']:.2f} | {r['maxrss_mib']:.0f} |")
    lines += ["", f"Regenerate: `{result['command']}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="python -m benchmarks.numeric")
    parser.add_argument("--layers", type=layer_list, default=[4, 32], help="depths, e.g. 4,32 (default: 4,32)")
    place_arguments(parser)
    args = parser.parse_args(argv)
    exit_on_sigterm()
    command = command_line("numeric", argv)
    result = {"command": command, "machine": machine(),
              "depths": [measure(layers, args.workdir) for layers in args.layers]}
    publish(args.out, "numeric", result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
