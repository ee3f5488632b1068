"""`surgery upcycle` on reflink filesystems (XFS, btrfs): wall time against `cp --reflink=never`, and new disk.

For each filesystem it makes a sparse image file in --workdir, attaches it to a loop device with direct I/O (no
second page cache in between), makes the filesystem (XFS with reflink=1) and mounts it. For each depth it writes a
random bf16 Mistral-7B there and runs, interleaved, `cp`, `surgery upcycle ...`, `cp`, ... (--repeats pairs), each
from a cold page cache (root), its time including the `sync` that puts its output on disk:

- cp: `cp --reflink=never` of the source shards one after the other, round and round, until at least the upcycle's
  output bytes are copied (each copy synced, then deleted, so the disk holds one at a time); its time is scaled to
  exactly the output's bytes.
- upcycle: the real CLI; new disk is the filesystem's free space before minus after (both synced), shared bytes
  come from the extent map (FIEMAP shared flags).

Reported: the median over pairs of upcycle/cp, new disk as a share of the output, and what `plan` says can share.
Everything written, the images included, is deleted; the ext4 numbers are the throughput benchmark's.
Results: reflink.md and reflink.json in --out. Needs root, xfsprogs and btrfs-progs.

    python -m benchmarks.reflink                            # 4 and 32 layers, XFS and btrfs, 3 pairs each
    python -m benchmarks.reflink --layers 4 --fs xfs --repeats 1
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

if __package__ in (None, ""):  # run as `python benchmarks/reflink.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (
    RECIPE_TEXT, command_line, drop_caches, exit_on_sigterm, fits_on_disk, layer_list, machine, machine_line,
    place_arguments, planned_sizes, publish, run_measured, scratch, upcycle_command,
)
from benchmarks.synthetic import write_synthetic

#: mkfs and mount options; no online discard (it frees blocks late, so free space would lag): `fstrim` instead
FILESYSTEMS = {
    "xfs": (["mkfs.xfs", "-q", "-f", "-m", "reflink=1"], ["-o", "nodiscard"]),
    "btrfs": (["mkfs.btrfs", "-q", "-f"], ["-o", "nodiscard"]),
}
#: room in the image beyond the source, one copy of a source shard and the output's unshareable bytes
IMAGE_SLACK = 4 * 10**9


@contextlib.contextmanager
def loop_filesystem(kind: str, root: Path, size: int) -> Iterator[Path]:
    """A fresh `kind` filesystem on a sparse `size`-byte image in `root`, mounted; everything removed afterwards."""
    mkfs, options = FILESYSTEMS[kind]
    with scratch(root) as folder:
        image, mount = folder / f"{kind}.img", folder / "mnt"
        mount.mkdir()
        with open(image, "wb") as f:
            f.truncate(size)
        device = subprocess.run(["losetup", "--find", "--show", "--direct-io=on", str(image)], check=True,
                                capture_output=True, text=True).stdout.strip()
        try:
            subprocess.run([*mkfs, device], check=True, capture_output=True)
            subprocess.run(["mount", *options, device, str(mount)], check=True, capture_output=True)
            try:
                yield mount
            finally:
                subprocess.run(["umount", str(mount)], check=True)
        finally:
            subprocess.run(["losetup", "-d", device], check=True)


def free_bytes(folder: Path) -> int:
    """Free space of the filesystem at `folder` once what was written and deleted has settled (synced, and the
    same in two reads 0.2 s apart)."""
    previous = None
    for _ in range(100):
        os.sync()
        stat = os.statvfs(folder)
        free = stat.f_bfree * stat.f_frsize
        if free == previous:
            break
        previous = free
        time.sleep(0.2)
    return free


def trim(folder: Path) -> None:
    """Give the blocks of deleted files back to the image's host disk (the image is sparse again)."""
    os.sync()
    subprocess.run(["fstrim", str(folder)], check=True, capture_output=True)


def timed_cp(shards: list[Path], nbytes: int, folder: Path, cold: bool) -> dict:
    """`cp --reflink=never` of `shards` round and round until `nbytes` are copied; seconds scaled to `nbytes`."""
    dropped = drop_caches() if cold else (os.sync() or False)
    seconds, copied, k = 0.0, 0, 0
    while copied < nbytes:
        shard = shards[k % len(shards)]
        copy = folder / f"copy-{k}"
        start = time.perf_counter()
        subprocess.run(["cp", "--reflink=never", str(shard), str(copy)], check=True)
        os.sync()
        seconds += time.perf_counter() - start
        copied += shard.stat().st_size
        copy.unlink()
        trim(folder)
        k += 1
    return {"copied_bytes": copied, "measured_s": round(seconds, 3), "total_s": round(seconds * nbytes / copied, 3),
            "caches_dropped": dropped}


def timed_upcycle(src: Path, out: Path, folder: Path, cold: bool) -> dict:
    """The CLI from a cold cache, its time including the sync; new disk from free space; shared bytes from FIEMAP."""
    from surgery.sharing import shared_extent_bytes

    before = free_bytes(folder)
    dropped = drop_caches() if cold else False
    stats = run_measured(upcycle_command(src, out), folder / "upcycle.log")
    start = time.perf_counter()
    os.sync()
    sync_s = time.perf_counter() - start
    new = before - free_bytes(folder)
    shards = sorted(out.glob("*.safetensors"))
    written = sum(p.stat().st_size for p in shards)
    shared = sum(shared_extent_bytes(p) for p in shards)
    report = (folder / "upcycle.log").read_text().strip().splitlines()[-1].strip()
    shutil.rmtree(out)
    trim(folder)
    return {"command_s": round(stats.wall_s, 3), "sync_s": round(sync_s, 3), "total_s": round(stats.wall_s + sync_s, 3),
            "maxrss_mib": round(stats.maxrss_mib, 1), "written_bytes": written, "shared_bytes": shared,
            "new_bytes": new, "reported": report, "caches_dropped": dropped}


def shareable(layers: int, root: Path) -> int:
    """What `surgery plan` says can share, for a synthetic checkpoint of this depth (headers only)."""
    import surgery
    from surgery.writer import plan_shards

    with scratch(root) as folder:
        plan = surgery.plan(write_synthetic(folder / "src", layers=layers, holes=True), "mistral-to-mixtral", 4, 2)
        return sum(s.shareable for s in plan_shards(plan.outputs, plan.options.max_shard_size))


def measure(kind: str, layers: int, repeats: int, root: Path, cold: bool) -> dict:
    """Interleaved cp / upcycle pairs at one depth on a fresh `kind` filesystem."""
    sizes = planned_sizes(layers, root)
    can_share = shareable(layers, root)
    row: dict = {"fs": kind, "layers": layers, "output_bytes": sizes.output_bytes, "shareable_bytes": can_share}
    image = sizes.source_bytes + 5 * 10**9 + (sizes.output_bytes - can_share) + IMAGE_SLACK
    fits, message = fits_on_disk(image, root)
    if not fits:
        print(f"  skipped {kind}, {layers} layers: {message}", flush=True)
        return {**row, "skipped": message}
    pairs = []
    with loop_filesystem(kind, root, image) as mount:
        src = write_synthetic(mount / "src", layers=layers)
        shards = sorted(src.glob("*.safetensors"))
        for i in range(repeats):
            cp = timed_cp(shards, sizes.output_bytes, mount, cold)
            upcycle = timed_upcycle(src, mount / "out", mount, cold)
            pairs.append({"cp": cp, "upcycle": upcycle, "ratio": round(upcycle["total_s"] / cp["total_s"], 4)})
            print(f"  {kind}, {layers} layers, pair {i + 1}: cp {cp['total_s']:.1f} s, upcycle "
                  f"{upcycle['total_s']:.2f} s, ratio {pairs[-1]['ratio']:.3f}, new disk "
                  f"{upcycle['new_bytes'] / 1e6:.1f} MB ({100 * upcycle['new_bytes'] / sizes.output_bytes:.2f}%)",
                  flush=True)
    median = lambda what, key: statistics.median(p[what][key] for p in pairs)  # noqa: E731
    return {
        **row,
        "pairs": pairs,
        "cp_median_s": median("cp", "total_s"),
        "upcycle_median_s": median("upcycle", "total_s"),
        "upcycle_command_median_s": median("upcycle", "command_s"),
        "median_ratio": statistics.median(p["ratio"] for p in pairs),
        "new_bytes_median": median("upcycle", "new_bytes"),
        "shared_bytes_median": median("upcycle", "shared_bytes"),
        "upcycle_peak_rss_mib": max(p["upcycle"]["maxrss_mib"] for p in pairs),
        "caches_dropped": all(p[w]["caches_dropped"] for p in pairs for w in ("cp", "upcycle")),
    }


def markdown(result: dict) -> str:
    """The results as a markdown table."""
    dropped = all(r.get("caches_dropped", True) for r in result["runs"])
    lines = [
        "# `surgery upcycle` on reflink filesystems: wall time vs `cp --reflink=never`, and new disk",
        "",
        f"{RECIPE_TEXT['copy']}, on synthetic Mistral-7B shapes (random bf16, 5 GB source shards), on XFS "
        "(`mkfs.xfs -m reflink=1`) and btrfs made on sparse image files, loop devices with direct I/O. Interleaved cp, "
        f"upcycle, cp, ... ({result['repeats']} pairs per row); "
        + ("page cache dropped before every run" if dropped and result["cold"] else "page cache NOT dropped")
        + "; times include the `sync` that writes the output to disk. cp copies the source shards one after the "
        "other (each synced, then deleted) until as many bytes as the output are copied, its time scaled to exactly "
        "the output's bytes. New disk: free space before minus after (synced). Shared: FIEMAP shared flags of the "
        "output shards. Shareable: what `surgery plan` prints (copied bytes at their source offsets modulo 4096, in "
        "whole blocks). GB = 10^9 bytes.",
        "",
        f"Machine: {machine_line(result['machine'])}.",
        "",
        "| filesystem | layers | output GB | shareable (plan) | shared (FIEMAP) | new disk | new disk / output "
        "| cp median (s) | upcycle median (s) | median ratio upcycle/cp | upcycle peak RSS (MiB) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["runs"]:
        out = r["output_bytes"]
        head = f"| {r['fs']} | {r['layers']} | {out / 1e9:.2f} | {100 * r['shareable_bytes'] / out:.2f}% |"
        if "skipped" in r:
            lines.append(f"{head} skipped: {r['skipped']} | | | | | | |")
            continue
        lines.append(f"{head} {100 * r['shared_bytes_median'] / out:.2f}% | {r['new_bytes_median'] / 1e6:,.1f} MB | "
                     f"**{100 * r['new_bytes_median'] / out:.2f}%** | {r['cp_median_s']:.1f} | "
                     f"{r['upcycle_median_s']:.2f} | **{r['median_ratio']:.3f}** | {r['upcycle_peak_rss_mib']:.1f} |")
    lines += ["", f"Regenerate: `{result['command']}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="python -m benchmarks.reflink",
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--layers", type=layer_list, default=[4, 32], help="depths, e.g. 4,32 (default: 4,32)")
    parser.add_argument("--fs", default="xfs,btrfs", help="filesystems, of xfs and btrfs (default: xfs,btrfs)")
    parser.add_argument("--repeats", type=int, default=3, help="cp/upcycle pairs per row (default: 3)")
    parser.add_argument("--warm", action="store_true", help="do not drop the page cache before each run (only sync)")
    place_arguments(parser, "where the images go")
    args = parser.parse_args(argv)
    exit_on_sigterm()
    kinds = [k.strip() for k in args.fs.split(",") if k.strip()]
    if os.geteuid() != 0:
        parser.error("needs root: it attaches loop devices and mounts filesystems")
    for kind in kinds:
        if kind not in FILESYSTEMS or shutil.which(FILESYSTEMS[kind][0][0]) is None:
            parser.error(f"--fs {kind}: use xfs or btrfs, with its mkfs installed (apt-get install xfsprogs btrfs-progs)")
    cold = not args.warm
    command = command_line("reflink", argv)
    runs = [measure(kind, layers, args.repeats, args.workdir, cold) for kind in kinds for layers in args.layers]
    result = {"command": command, "repeats": args.repeats, "cold": cold, "machine": machine(), "runs": runs}
    publish(args.out, "reflink", result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
