"""What the memory and throughput benchmarks share: running a command while measuring its memory,
the `surgery upcycle` command line, planned sizes, scratch folders, machine facts and result files."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.synthetic import write_synthetic

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
#: scratch space on the same disk as the repository (git-ignored)
DEFAULT_WORKDIR = RESULTS / "tmp"
#: the recipes a benchmark can run, as `surgery upcycle` options: identical experts (copies), every expert's
#: down_proj scaled (a third of the output computed), and everything cast to fp32 (all of it computed)
RECIPES = {
    "copy": ["--rules", "mistral-to-mixtral", "--num-experts", "4", "--experts-per-token", "2"],
    "scaled": ["--rules", str(REPO / "benchmarks" / "rules" / "scaled-experts.yaml"), "-e", "4", "-k", "2"],
    "fp32": ["--rules", "mistral-to-mixtral", "-e", "4", "-k", "2", "--dtype", "fp32"],
    "granularity4": ["--rules", "mistral-to-mixtral", "-e", "8", "-k", "4", "--granularity", "4"],
    "drop0.5": ["--rules", "mistral-to-mixtral", "-e", "4", "-k", "2", "--drop-ratio", "0.5"],
    "moe-expert": ["--rules", "mixtral-to-mistral", "-p", "mode=expert", "-p", "expert=3"],
    "moe-mean": ["--rules", "mixtral-to-mistral", "-p", "mode=mean"],
    # the newer families, on Qwen3-8B shapes (parameters as -p, which planned_sizes reads too)
    "qwen3.5": ["--rules", "qwen3-5-to-qwen3-5-moe", "-e", "4", "-k", "2"],
    "granite": ["--rules", "granite-to-granitemoeshared", "-e", "4", "-k", "2"],
    "ernie4.5": ["--rules", "ernie4-5-to-ernie4-5-moe", "-e", "4", "-k", "2", "-p", "shared_experts=1"],
    "hunyuan": ["--rules", "hunyuan-v1-dense-to-hunyuan-v1-moe", "-e", "4", "-k", "2"],
    "cohere2": ["--rules", "cohere2-to-cohere2-moe", "-e", "4", "-k", "2"],
    "flexolmo": ["--rules", "olmo2-to-flex-olmo", "-e", "4", "-k", "2", "-p", "layout=fused"],
}
#: the synthetic source each recipe reads (default: mistral-7b)
RECIPE_SOURCE = {"moe-expert": "mixtral-8x7b", "moe-mean": "mixtral-8x7b", "qwen3.5": "qwen3_5-8b",
                 "granite": "granite-8b", "ernie4.5": "ernie4_5-8b", "hunyuan": "hunyuan_v1_dense-8b",
                 "cohere2": "cohere2-8b", "flexolmo": "olmo2-8b"}
RECIPE_TEXT = {
    "copy": "mistral-to-mixtral, 4 experts, top-2",
    "scaled": "mistral-to-mixtral, 4 experts, top-2, every expert's down_proj scaled by 0.5 (benchmarks/rules/scaled-experts.yaml)",
    "fp32": "mistral-to-mixtral, 4 experts, top-2, --dtype fp32 (every tensor cast)",
    "granularity4": "mistral-to-mixtral, 8 experts, top-4, --granularity 4 (two copies of the MLP in quarters; "
                    "w2 scaled by 4, the rest strided copies)",
    "drop0.5": "mistral-to-mixtral, 4 experts, top-2, --drop-ratio 0.5 (Drop-Upcycling: half of every expert's "
               "neurons re-drawn)",
    "moe-expert": "mixtral-to-mistral mode=expert (Mixtral-8x7B shapes -> one expert's MLP: byte copies)",
    "moe-mean": "mixtral-to-mistral mode=mean (Mixtral-8x7B shapes -> the 8 experts' mean, computed)",
    "qwen3.5": "qwen3-5-to-qwen3-5-moe, 4 experts, top-2, one shared expert (Qwen3-8B shapes; shared down_proj x 2)",
    "granite": "granite-to-granitemoeshared, 4 experts, top-2, one shared MLP (Qwen3-8B shapes; fused input_linear)",
    "ernie4.5": "ernie4-5-to-ernie4-5-moe, 4 experts, top-2, one shared expert (Qwen3-8B shapes; fp32 routers)",
    "hunyuan": "hunyuan-v1-dense-to-hunyuan-v1-moe, 4 experts, top-2, its shared MLP (Qwen3-8B shapes; fp32 routers)",
    "cohere2": "cohere2-to-cohere2-moe, 4 experts, top-2 (Qwen3-8B shapes)",
    "flexolmo": "olmo2-to-flex-olmo, 4 experts, top-2, --layout fused (Qwen3-8B shapes; stacked experts)",
}


def source_arch(recipe: str) -> str:
    """The synthetic architecture a recipe reads."""
    return RECIPE_SOURCE.get(recipe, "mistral-7b")


def shapes_text(arch: str) -> str:
    """The shapes of a synthetic architecture, for result headers."""
    if arch == "mistral-7b":
        return "Mistral-7B shapes (hidden 4096, intermediate 14336, vocab 32000, 32 heads, 8 KV heads)"
    if arch == "mixtral-8x7b":
        return "Mixtral-8x7B shapes (hidden 4096, 8 experts of intermediate 14336, vocab 32000, 32 heads, 8 KV heads)"
    return "Qwen3-8B shapes (hidden 4096, intermediate 12288, vocab 151936, 32 heads, 8 KV heads)"
MIB = 1 << 20
#: free disk left untouched when deciding whether a depth fits
DISK_MARGIN = 5 * 10**9


@dataclass
class RunStats:
    """One measured run of a child process."""

    wall_s: float
    #: peak RSS of the child as the kernel accounts it (ru_maxrss from os.wait4 in the launcher)
    maxrss_mib: float
    #: peak RssAnon (anonymous memory: heap, numpy arrays) sampled from /proc/<pid>/status
    rss_anon_mib: float
    #: the last VmHWM (the kernel's high-water mark of the child's RSS) seen by the sampler: a cross-check
    sampled_hwm_mib: float
    samples: int
    #: bytes the child read from and wrote to storage (ru_inblock / ru_oublock; cache hits are not reads)
    disk_read_gb: float
    disk_written_gb: float


def surgery_command() -> list[str]:
    """The installed `surgery` console script of this interpreter (one process, no shell shim in between)."""
    script = Path(sys.executable).parent / "surgery"
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from surgery.cli import main; sys.exit(main())"]


def upcycle_command(src: Path, dst: Path, extra: Sequence[str] = (), recipe: str = "copy") -> list[str]:
    """`surgery upcycle SRC DST` with one of the RECIPES, no progress bar, no check afterwards (it imports torch and
    transformers, whose memory is not the upcycle's)."""
    return [*surgery_command(), "upcycle", str(src), str(dst), *RECIPES[recipe], "--quiet", "--no-check", *extra]


#: Runs argv[2:] with output to the file argv[1]; prints the child's pid, then its exit code, rusage and wall time.
#: Linux starts a child's ru_maxrss at the RSS of the process that spawned it (exec records the old address
#: space's high-water mark), so children of this ~40 MiB benchmark would never report less than ~40 MiB.
#: This launcher (python -S, nothing imported) is ~10 MiB: the CLI's ru_maxrss is then its own.
_LAUNCHER = """
import os, sys, time
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.execvp(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
print(pid, flush=True)
_, status, usage = os.wait4(pid, 0)
wall = time.perf_counter() - start
print(os.waitstatus_to_exitcode(status), usage.ru_maxrss, usage.ru_inblock, usage.ru_oublock, wall, flush=True)
"""


def run_measured(cmd: list[str], log: Path, interval: float = 0.01) -> RunStats:
    """Run `cmd` (output to `log`), sampling its /proc/<pid>/status every `interval` s; raise if it fails."""
    peaks = {"RssAnon": 0, "VmHWM": 0, "samples": 0}
    done = threading.Event()
    launcher = subprocess.Popen([sys.executable, "-S", "-c", _LAUNCHER, str(log), *cmd], stdout=subprocess.PIPE, text=True)
    pid = None
    try:
        pid = int(launcher.stdout.readline())
        sampler = threading.Thread(target=_sample, args=(pid, interval, peaks, done), daemon=True)
        sampler.start()
        report = launcher.stdout.readline().split()
        launcher.wait()
    except BaseException:  # interrupted: stop the child before its files are removed
        for victim in filter(None, (pid, launcher.pid)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)
        launcher.wait()
        raise
    finally:
        done.set()
    sampler.join()
    code, maxrss_kib, inblock, oublock = map(int, report[:4])
    if code != 0:
        tail = log.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{' '.join(cmd)} exited with {code}:\n{tail}")
    return RunStats(float(report[4]), maxrss_kib / 1024, peaks["RssAnon"] / 1024, peaks["VmHWM"] / 1024,
                    peaks["samples"], inblock * 512 / 1e9, oublock * 512 / 1e9)


def _sample(pid: int, interval: float, peaks: dict[str, int], done: threading.Event) -> None:
    path = f"/proc/{pid}/status"
    while not done.is_set():
        try:
            with open(path) as f:
                for line in f:
                    key, _, value = line.partition(":")
                    if key in ("RssAnon", "VmHWM"):
                        peaks[key] = max(peaks[key], int(value.split()[0]))  # kB
            peaks["samples"] += 1
        except (FileNotFoundError, ProcessLookupError):
            pass
        done.wait(interval)


@contextlib.contextmanager
def scratch(root: Path) -> Iterator[Path]:
    """A fresh temporary folder under `root`, removed with everything in it however the block ends."""
    root.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="surgery-bench-", dir=root))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@dataclass
class Sizes:
    """Planned sizes of an upcycle, from headers alone (a holes checkpoint: no data written)."""

    source_bytes: int
    output_bytes: int
    output_params: int
    copied_bytes: int

    @property
    def disk_needed(self) -> int:
        return self.source_bytes + self.output_bytes


def planned_sizes(layers: int, root: Path, dtype: str | None = None, recipe: str = "copy") -> Sizes:
    """Source and output sizes of upcycling a `layers`-layer synthetic Mistral-7B with a recipe (optionally cast to
    `dtype`)."""
    import surgery
    from surgery.producers import Copy

    args = RECIPES[recipe]
    dtype = dtype or (args[args.index("--dtype") + 1] if "--dtype" in args else None)
    with scratch(root) as folder:
        src = write_synthetic(folder / "src", layers=layers, arch=source_arch(recipe), holes=True)
        plan = surgery.plan(src, args[1], dtype=dtype, **_recipe_params(args))
        source_bytes = sum(t.nbytes for t in plan.source.tensors.values())
        copied = sum(t.nbytes for t in plan.outputs if isinstance(t.producer, Copy))
        return Sizes(source_bytes, plan.nbytes, plan.num_parameters, copied)


def _recipe_params(args: list[str]) -> dict:
    """The rule-file parameters of a recipe's command-line options."""
    names = {"-e": "num_experts", "-k": "experts_per_token", "--num-experts": "num_experts",
             "--experts-per-token": "experts_per_token", "--granularity": "granularity", "--drop-ratio": "drop_ratio"}
    params = {names[a]: float(v) if "." in v else int(v) for a, v in zip(args, args[1:]) if a in names}
    params.update(v.split("=", 1) for a, v in zip(args, args[1:]) if a == "-p")
    return params


def fits_on_disk(needed: int, root: Path) -> tuple[bool, str]:
    """Whether `needed` bytes fit in `root`'s free space with DISK_MARGIN to spare, and a message saying so."""
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    message = f"needs {needed / 1e9:.1f} GB, {free / 1e9:.1f} GB free (keeping {DISK_MARGIN / 1e9:.0f} GB spare)"
    return needed + DISK_MARGIN <= free, message


def dir_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def drop_caches() -> bool:
    """Write back dirty pages and drop the page cache (needs root); False if the kernel refused."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def exit_on_sigterm() -> None:
    """Turn SIGTERM (a CI timeout, `kill`) into SystemExit, so `scratch` folders are still removed."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def machine() -> dict:
    """Facts about the machine and the code measured (the `surgery` this interpreter imports), stored with results."""
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    fs = subprocess.run(["findmnt", "-n", "-o", "FSTYPE", "-T", str(REPO)], capture_output=True, text=True)
    import surgery

    code = Path(surgery.__file__).resolve().parent.parent
    commit = subprocess.run(["git", "-C", str(code), "describe", "--always", "--dirty"], capture_output=True, text=True)

    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "ram_gib": round(int(meminfo["MemTotal"].split()[0]) / MIB, 1),
        "swap_gib": round(int(meminfo["SwapTotal"].split()[0]) / MIB, 1),
        "kernel": platform.release(),
        "filesystem": fs.stdout.strip(),
        "python": platform.python_version(),
        "surgery": surgery.__version__,
        "surgery_path": str(code),
        "commit": commit.stdout.strip() or "unknown",
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    }


def machine_line(facts: dict) -> str:
    return (f"{facts['cpu']}, {facts['cpus']} CPUs, {facts['ram_gib']} GiB RAM, swap {facts['swap_gib']} GiB, "
            f"Linux {facts['kernel']}, {facts['filesystem']}, Python {facts['python']}, "
            f"surgery {facts['surgery']} @ {facts['commit']}, {facts['date']}")


def command_line(module: str, argv: Sequence[str] | None) -> str:
    """How a benchmark was run, for its results: `python -m benchmarks.MODULE ARGS`."""
    return " ".join(["python -m benchmarks." + module, *(argv if argv is not None else sys.argv[1:])])


def publish(out: Path, name: str, data: dict, markdown: str) -> None:
    """Write `name`.json and `name`.md into `out`; print the markdown and the files written."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.json", out / f"{name}.md"]
    paths[0].write_text(json.dumps(data, indent=2) + "\n")
    paths[1].write_text(markdown)
    print(markdown)
    print("wrote " + ", ".join(map(str, paths)))


def layer_list(text: str) -> list[int]:
    """'1,2,4,8' -> [1, 2, 4, 8]"""
    return [int(part) for part in text.split(",") if part.strip()]


def stats_dict(stats: RunStats) -> dict:
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in asdict(stats).items()}


def place_arguments(parser: argparse.ArgumentParser, workdir_help: str = "scratch space") -> None:
    """The --out (results folder) and --workdir (scratch space) options every benchmark takes."""
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"results folder (default: {RESULTS})")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                        help=f"{workdir_help}; a temp folder inside is always removed (default: {DEFAULT_WORKDIR})")
