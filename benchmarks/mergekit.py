"""mergekit-moe and `surgery mergekit-moe` side by side: the same YAML on synthetic Mistral-7B-shaped checkpoints.

Four sources (random bf16, seeds 0-3, each with a small word-level tokenizer), one expert per source with a
handful of prompts, under `gate_mode: random` and `gate_mode: hidden`; each tool runs as a child process, its peak
RSS (ru_maxrss from os.wait4) and peak RssAnon (sampled) and wall time recorded, its output deleted before the next
run. Where four distinct sources and an output do not fit on the disk, the four source folders hold hard links to
one checkpoint (four paths, one copy of the data: the page cache then serves the three others' reads); where not
even one source and an output fit, the hidden mode's routers' pass is measured alone.

    python -m benchmarks.mergekit --layers 1,4,16,32 --mergekit /tmp/mk-venv/bin/python

`--mergekit PYTHON` is the interpreter of a venv where `pip install mergekit` was run (up to --mergekit-max-layers);
without it only surgery is measured. Results: mergekit.md and mergekit.json in --out.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
from pathlib import Path

import yaml

if __package__ in (None, ""):  # run as `python benchmarks/mergekit.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (
    command_line, dir_bytes, exit_on_sigterm, fits_on_disk, layer_list, machine, machine_line, place_arguments,
    publish, run_measured, scratch, stats_dict, surgery_command,
)
from benchmarks.synthetic import make_config, tensor_shapes, write_synthetic

#: the words of the word-level tokenizer written beside synthetic (and test) checkpoints
WORDS = ("the a cat dog sat on mat code python function return math number plus minus story once upon time king "
         "queen hello world").split()
#: one expert per source: what each should be routed
PROMPTS = [["the cat sat on the mat", "a dog sat"], ["python function return number", "code"],
           ["once upon a time a king", "the queen"], ["math plus minus number", "hello world"]]
MODES = ("random", "hidden")
#: goals of the issue: peak RSS of surgery per gate mode, MiB
BUDGET_MIB = {"random": 256, "hidden": 2048}


def save_word_tokenizer(folder: str | os.PathLike, words: tuple[str, ...] | list[str] = WORDS) -> Path:
    """A word-level tokenizer (`<unk>`, `<s>`, `</s>`, then `words`) saved with transformers into `folder`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["<unk>", "<s>", "</s>", *words])}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(folder)
    return Path(folder)


def moe_yaml(base: Path, sources: list[Path], mode: str) -> dict:
    """The mergekit-moe config: one expert per source, its prompts, bf16."""
    return {"base_model": str(base), "gate_mode": mode, "dtype": "bfloat16", "experts_per_token": 2,
            "experts": [{"source_model": str(s), "positive_prompts": p} for s, p in zip(sources, PROMPTS)]}


def make_sources(root: Path, layers: int, distinct: bool) -> list[Path]:
    """Four synthetic Mistral-7B checkpoints with tokenizers (hard links of the first where not `distinct`)."""
    folders = [root / f"source{i}" for i in range(4)]
    for i, folder in enumerate(folders):
        if distinct or i == 0:
            write_synthetic(folder, layers=layers, seed=i)
            save_word_tokenizer(folder)
        else:
            folder.mkdir()
            for path in folders[0].iterdir():
                os.link(path, folder / path.name)
    return folders


def source_bytes(layers: int) -> int:
    return sum(math.prod(shape) * 2 for _, shape in tensor_shapes(make_config("mistral-7b", layers)))


def output_bytes(layers: int) -> int:
    """The Mixtral with 4 experts: the source plus three more copies of every MLP, plus routers."""
    config = make_config("mistral-7b", layers)
    mlp = 3 * config["hidden_size"] * config["intermediate_size"] * 2
    return source_bytes(layers) + layers * (3 * mlp + 4 * config["hidden_size"] * 2)


def commands(tool: str, config: Path, out: Path, mergekit: str | None) -> list[str]:
    if tool == "surgery":
        return [*surgery_command(), "mergekit-moe", str(config), str(out), "--quiet", "--no-check"]
    return [str(Path(mergekit).parent / "mergekit-moe"), str(config), str(out)]


#: the routers' pass alone (what the hidden gate modes add to a copy), for depths whose output does not fit
_ROUTERS = """
import sys
from benchmarks.mergekit import PROMPTS
from surgery.api import open_source
from surgery.routers import Prompts, router_rows
router_rows(open_source(sys.argv[1]), [Prompts(tuple(p)) for p in PROMPTS], sys.argv[2], progress=False)
"""


def measure(layers: int, root: Path, modes: list[str], mergekit: str | None) -> list[dict]:
    """Every (tool, mode) run at one depth (mergekit where given); where no output fits on the disk, the routers'
    pass alone (hidden modes); else a row saying why the depth was skipped."""
    single = source_bytes(layers)
    distinct, _ = fits_on_disk(4 * single + output_bytes(layers), root)
    fits, why = fits_on_disk((4 if distinct else 1) * single + output_bytes(layers), root)
    if not fits and fits_on_disk(single, root)[0] and any(m != "random" for m in modes):
        print(f"{layers} layers: no room for an output ({why}): the routers' pass alone", flush=True)
        return [routers_only(layers, root, m) for m in modes if m != "random"]
    if not fits:
        print(f"{layers} layers: skipped, {why}", flush=True)
        return [{"layers": layers, "skipped": why}]
    rows = []
    with scratch(root) as folder:
        sources = make_sources(folder, layers, distinct)
        for mode in modes:
            config = folder / f"{mode}.yml"
            config.write_text(yaml.safe_dump(moe_yaml(sources[0], sources, mode)))
            for tool in ("surgery", "mergekit") if mergekit else ("surgery",):
                out = folder / f"out-{tool}-{mode}"
                print(f"{layers} layers, {mode}, {tool} ...", flush=True)
                row = {"layers": layers, "mode": mode, "tool": tool, "distinct_sources": distinct}
                try:
                    stats = run_measured(commands(tool, config, out, mergekit), folder / f"{tool}-{mode}.log")
                    row.update(stats_dict(stats), output_bytes=dir_bytes(out))
                except RuntimeError as exc:
                    row["failed"] = str(exc).splitlines()[0][-300:]
                rows.append(row)
                print(f"  {row}", flush=True)
                shutil.rmtree(out, ignore_errors=True)
    return rows


def routers_only(layers: int, root: Path, mode: str) -> dict:
    """Peak RSS and wall time of computing the routers of `mode` from PROMPTS on one synthetic source."""
    with scratch(root) as folder:
        source = make_sources(folder, layers, distinct=False)[0]
        stats = run_measured([sys.executable, "-c", _ROUTERS, str(source), mode], folder / "routers.log")
        return {"layers": layers, "mode": f"{mode} (routers' pass only)", "tool": "surgery", "distinct_sources": True,
                **stats_dict(stats), "output_bytes": 0}


def markdown(result: dict) -> str:
    lines = [
        "# mergekit-moe vs surgery mergekit-moe",
        "",
        f"Command: `{result['command']}`. {result['what']}",
        "",
        "| layers | gate_mode | tool | peak RSS | peak RssAnon | wall | output |",
        "|---:|---|---|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        if "skipped" in row:
            lines.append(f"| {row['layers']} | | | skipped: {row['skipped']} | | | |")
        elif "failed" in row:
            lines.append(f"| {row['layers']} | {row['mode']} | {row['tool']} | failed: {row['failed']} | | | |")
        else:
            links = "" if row["distinct_sources"] else " (hard-linked sources)"
            lines.append(f"| {row['layers']}{links} | {row['mode']} | {row['tool']} | {row['maxrss_mib']:,.1f} MiB | "
                         f"{row['rss_anon_mib']:,.1f} MiB | {row['wall_s']:.1f} s | {_gb(row['output_bytes'])} |")
    lines += ["", f"mergekit-moe was run up to {result['mergekit_max_layers']} layers: its peak grows by about 2 GB per "
              "layer here, so deeper runs would exhaust the machine's RAM.",
              "", f"Budgets (surgery): {', '.join(f'{m} <= {b} MiB' for m, b in BUDGET_MIB.items())}; "
              f"failures: {', '.join(result['failures']) or 'none'}.", "", f"Machine: {machine_line(result['machine'])}", ""]
    return "\n".join(lines)


def _gb(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes else "none"


def failures(rows: list[dict]) -> list[str]:
    return [f"{r['layers']} layers, {r['mode']}: {r['maxrss_mib']:.0f} MiB > {_budget(r)} MiB"
            for r in rows if r.get("tool") == "surgery" and "maxrss_mib" in r and r["maxrss_mib"] > _budget(r)]


def _budget(row: dict) -> int:
    return BUDGET_MIB[row["mode"].split()[0]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="python -m benchmarks.mergekit",
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--layers", type=layer_list, default=[4], help="depths, e.g. 4,32 (default: 4)")
    parser.add_argument("--modes", default=",".join(MODES), help="gate modes (default: random,hidden)")
    parser.add_argument("--mergekit", help="python of a venv with mergekit installed (default: surgery only)")
    parser.add_argument("--mergekit-max-layers", type=int, default=4,
                        help="run mergekit up to this depth only: it holds ~2 GB per layer of Mistral-7B shapes, so "
                             "deeper runs exhaust RAM and the OOM killer may pick other processes (default: 4)")
    parser.add_argument("--name", default="mergekit", help="results file name (default: mergekit)")
    parser.add_argument("--check", action="store_true", help="exit 1 if surgery exceeds a budget")
    place_arguments(parser)
    args = parser.parse_args(argv)
    exit_on_sigterm()
    modes = [m for m in args.modes.split(",") if m]
    rows = [row for layers in args.layers for row in measure(
        layers, args.workdir, modes, args.mergekit if layers <= args.mergekit_max_layers else None)]
    result = {
        "command": command_line("mergekit", argv),
        "what": ("Mistral-7B shapes (hidden 4096, intermediate 14336, vocab 32000), four sources, one expert each, "
                 "top-2, dtype bfloat16; hidden: two prompts per expert. surgery writes the per-expert layout, "
                 "mergekit 0.1.5 the fused one (the same bytes)."),
        "machine": machine(),
        "mergekit_max_layers": args.mergekit_max_layers,
        "rows": rows,
        "failures": failures(rows),
    }
    publish(args.out, args.name, result, markdown(result))
    return 1 if args.check and result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
