"""Sharing blocks with the source on reflink filesystems.

Pure parts first: the head / aligned middle / tail split of a copy (os.copy_file_range recorded), and the layout that
puts copied bytes at their source's offsets modulo 4096 (sharing.arrange, writer.plan_shards; copies from source
files at different offsets in different output shards). Then real upcycles on
XFS (`mkfs.xfs -m reflink=1`) and btrfs images that the tests loop-mount (root, xfsprogs and btrfs-progs needed;
skipped with the reason otherwise): almost nothing newly allocated, the same bytes as the same upcycle on the normal
disk, shared extents in the extent map (`filefrag -v`), the source untouched when the output is modified, a source
with odd tensor sizes still sharing every large tensor, a source in several files sharing as much, and `--no-share`
allocating everything.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from huggingface_hub import constants
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

import surgery
from benchmarks.synthetic import make_config, tensor_shapes, write_synthetic
from surgery.cli import main
from surgery.copying import copy_range, share_blocks
from surgery.errors import SurgeryError
from surgery.header import build_header
from surgery.hub import require_hub_client
from surgery.producers import Copy
from surgery.sharing import BLOCK, Item, Written, arrange, shareable_bytes
from surgery import writer
from surgery.writer import data_order, plan_shards
from tests.fake_hub import FakeHub, folder_files

RULES = "mistral-to-mixtral"
#: Mistral-7B's layout (names, GQA, bf16) at a size a test writes in well under a second
SMALL = dict(hidden_size=1024, intermediate_size=4096, vocab_size=2048, num_attention_heads=8, num_key_value_heads=2)
#: the share of an output that may be newly allocated on a reflink filesystem
NEW_AT_MOST = 0.02


# ----------------------------------------------------------------------------------------------- the copy split


@pytest.fixture
def files(tmp_path) -> Iterator[tuple[int, int, bytes, Path]]:
    """(source fd, destination fd, source bytes, destination path)."""
    data = os.urandom(16 * BLOCK)
    (tmp_path / "src").write_bytes(data)
    src = os.open(tmp_path / "src", os.O_RDONLY)
    dst = os.open(tmp_path / "dst", os.O_RDWR | os.O_CREAT, 0o644)
    yield src, dst, data, tmp_path / "dst"
    os.close(src)
    os.close(dst)


def record_copy_file_range(monkeypatch) -> list[tuple[int, int, int]]:
    """Every os.copy_file_range call as (count, source offset, destination offset); the calls still copy."""
    calls, real = [], os.copy_file_range

    def recording(src, dst, count, offset_src, offset_dst):
        calls.append((count, offset_src, offset_dst))
        return real(src, dst, count, offset_src, offset_dst)

    monkeypatch.setattr(os, "copy_file_range", recording)
    return calls


def test_a_copy_is_split_into_head_aligned_middle_and_tail(files, monkeypatch):
    src, dst, data, path = files
    calls = record_copy_file_range(monkeypatch)
    offset, length, dst_offset = BLOCK + 1000, 5 * BLOCK + 300, 3 * BLOCK + 1000  # same offset modulo 4096
    copy_range(src, dst, offset, length, dst_offset)
    head = BLOCK - 1000
    assert calls == [
        (head, offset, dst_offset),
        (4 * BLOCK, 2 * BLOCK, 4 * BLOCK),  # the aligned middle, in one call
        (length - head - 4 * BLOCK, 6 * BLOCK, 8 * BLOCK),
    ]
    assert path.read_bytes()[dst_offset:] == data[offset:offset + length]


@pytest.mark.parametrize("offset, length, dst_offset", [
    (BLOCK + 1000, 5 * BLOCK, 3 * BLOCK + 1008),  # offsets disagree modulo 4096: nothing could be remapped
    (BLOCK + 1000, BLOCK + 100, 3 * BLOCK + 1000),  # agree, but no whole block inside
    (2 * BLOCK, 3 * BLOCK, 5 * BLOCK),  # aligned already: the middle is all of it
])
def test_a_copy_without_head_and_tail_is_one_call(files, monkeypatch, offset, length, dst_offset):
    src, dst, data, path = files
    calls = record_copy_file_range(monkeypatch)
    copy_range(src, dst, offset, length, dst_offset)
    assert calls == [(length, offset, dst_offset)]
    assert path.read_bytes()[dst_offset:] == data[offset:offset + length]


def test_without_sharing_copies_never_use_copy_file_range(files, monkeypatch):
    src, dst, data, path = files
    calls = record_copy_file_range(monkeypatch)
    with share_blocks(False):
        copy_range(src, dst, BLOCK, 8 * BLOCK, 2 * BLOCK)
    copy_range(src, dst, 0, BLOCK, 0)  # the switch does not outlive its block
    assert calls == [(BLOCK, 0, 0)]
    assert path.read_bytes() == data[:BLOCK] + bytes(BLOCK) + data[BLOCK:9 * BLOCK]


# ----------------------------------------------------------------------------------------------- the layout


def starts(items: list[Item], order: list[int], data_start: int) -> dict[int, int]:
    """Where each item (by index) starts in a file whose data starts at `data_start`."""
    out, position = {}, data_start
    for i in order:
        out[i] = position
        position += items[i].size
    return out


def aligned(items: list[Item], order: list[int], phase: int | None) -> int:
    """Bytes that can share, counted independently of the code under test."""
    at = starts(items, order, 8 * BLOCK + (phase if phase is not None else 8))
    return sum(items[i].weights.get(at[i] % BLOCK, 0) for i in order)


def test_spacers_shift_a_second_group_into_its_phase():
    a = Item(3 * BLOCK, {1000: 2 * BLOCK}, ("f", 0))
    b = Item(2 * BLOCK, {3000: BLOCK}, ("g", 0))
    spacer = Item(2000)
    ragged = Item(7)  # not a multiple of 8: goes last, shifts nothing
    items = [a, b, spacer, ragged]
    order, phase = arrange(items)
    assert (order, phase) == ([0, 2, 1, 3], 1000)
    assert aligned(items, order, phase) == 3 * BLOCK
    assert shareable_bytes([items[i].weights for i in order], [starts(items, order, phase)[i] for i in order]) \
        == 3 * BLOCK
    # without the spacer the second group cannot be reached: only the heavier one shares
    order, phase = arrange([a, b, ragged])
    assert phase == 1000 and aligned([a, b, ragged], order, phase) == 2 * BLOCK


def test_an_odd_sized_copy_ends_its_group_and_shifts_the_next_one_into_place():
    body = Item(2 * BLOCK, {1000: BLOCK}, ("f", 0))
    tail = Item(3 * BLOCK + 512, {1000: 3 * BLOCK}, ("f", 10**6))  # shares at 1000 too, shifts by 512
    after = Item(BLOCK, {1512: BLOCK}, ("f", 2 * 10**6))
    items = [tail, body, after]
    order, phase = arrange(items)
    assert (order, phase) == ([1, 0, 2], 1000)
    assert aligned(items, order, phase) == 5 * BLOCK


def test_the_source_order_walk_reproduces_the_source_spacing():
    """Groups visited heaviest first would spend the only 512-byte spacer on the wrong step; the source-order walk
    (the spacer stored between the two groups in the source) aligns all three."""
    heavy = Item(4 * BLOCK, {0: 4 * BLOCK}, ("f", 0))
    small = Item(512, {}, ("f", 100))
    middle = Item(2 * BLOCK, {512: 2 * BLOCK}, ("f", 200))
    big_spacer = Item(1024, {}, ("f", 300))
    last = Item(3 * BLOCK, {1536: 3 * BLOCK}, ("f", 400))
    items = [heavy, small, middle, big_spacer, last]
    order, phase = arrange(items)
    assert aligned(items, order, phase) == 9 * BLOCK


ITEMSIZES = [1, 2, 4, 8]


@st.composite
def shards(draw) -> tuple[list[Item], list[int]]:
    """Items in the reference order (widest element first) and their element sizes."""
    count = draw(st.integers(1, 12))
    specs = []
    for k in range(count):
        itemsize = draw(st.sampled_from(ITEMSIZES))
        blocks = draw(st.sampled_from([True, False]))
        size = draw(st.integers(1, 4)) * BLOCK if blocks else draw(st.integers(1, 3000)) * itemsize
        phases = draw(st.lists(st.integers(0, BLOCK // itemsize - 1), max_size=2))
        weights = {p * itemsize: draw(st.integers(1, 10)) * BLOCK for p in phases}
        specs.append((itemsize, Item(size, weights, ("f", draw(st.integers(0, 100))))))
    specs.sort(key=lambda spec: -spec[0])
    return [item for _, item in specs], [itemsize for itemsize, _ in specs]


@settings(max_examples=300, deadline=None)
@given(shard=shards())
def test_the_layout_keeps_element_alignment_and_aligns_the_heaviest_group(shard):
    items, itemsizes = shard
    order, phase = arrange(items)
    assert sorted(order) == list(range(len(items)))
    assert arrange(items) == (order, phase)  # deterministic
    assert phase is None or phase % 8 == 0
    for data_start in ([8 * BLOCK + phase] if phase is not None else [8, 16, 8 * BLOCK]):
        at = starts(items, order, data_start)
        assert all(at[i] % itemsizes[i] == 0 for i in order), (order, phase)
    # the heaviest phase's items whose sizes are multiples of 8 share fully (the group it leads)
    best: dict[int, int] = {}
    for item in items:
        usable = {p: n for p, n in item.weights.items() if p % 8 == 0}
        if usable and item.size % 8 == 0:
            top = min(usable, key=lambda p: (-usable[p], p))
            best[top] = best.get(top, 0) + (usable[top] if item.size % BLOCK == 0 else 0)
    if phase is not None:
        assert aligned(items, order, phase) >= max(best.values())


def test_a_shard_without_copies_keeps_the_reference_layout(tmp_path):
    src = write_synthetic(tmp_path / "src", layers=1, holes=True, overrides=SMALL)
    plan = surgery.plan(src, RULES, 4, 2, dtype="fp32")  # every tensor computed: nothing can share
    for shard in plan_shards(plan.outputs, plan.options.max_shard_size):
        reference = data_order(list(shard.tensors))
        assert list(shard.tensors) == reference
        assert shard.header == build_header([(t.name, t.dtype, t.shape, t.nbytes) for t in reference],
                                            {"format": "pt"})
        assert shard.shareable == 0


def test_plan_puts_copies_at_their_source_offsets_modulo_4096(tmp_path):
    src = write_synthetic(tmp_path / "src", layers=4, holes=True)  # real Mistral-7B shapes, one source file
    plan = surgery.plan(src, RULES, 4, 2)
    shards = plan_shards(plan.outputs, plan.options.max_shard_size)
    copies = 0
    for shard in shards:
        assert len(shard.header) % 8 == 0 and shard.header[-1:] in (b" ", b"}")
        header = json.loads(shard.header[8:])  # right-padded with spaces: still one JSON document
        for t, offset in zip(shard.tensors, shard.offsets):
            assert header[t.name]["data_offsets"][0] == offset - len(shard.header)
            if isinstance(t.producer, Copy):
                (_, run), = t.producer.runs
                assert (offset + run.dst - run.src) % BLOCK == 0, t.name
                copies += 1
    assert copies == sum(isinstance(t.producer, Copy) for t in plan.outputs) > 0
    shareable = sum(s.shareable for s in shards)
    assert shareable > 0.999 * plan.nbytes
    out = CliRunner().invoke(main, ["plan", str(src), "-r", RULES, "-e", "4", "-k", "2"])
    assert out.exit_code == 0, out.output
    line = next(line for line in out.output.splitlines() if line.startswith("sharing:"))
    assert f"({100 * shareable / plan.nbytes:.1f}%) can share blocks with the source" in line
    assert "XFS, btrfs" in line


def data_phases(folder: Path) -> set[int]:
    """Where the data of `folder`'s safetensors files start, modulo BLOCK."""
    return {(8 + struct.unpack("<Q", path.read_bytes()[:8])[0]) % BLOCK for path in folder.glob("*.safetensors")}


def shareable_with_greedy_split(plan, monkeypatch) -> tuple[int, int]:
    """(bytes that can share, shards) with huggingface_hub's split of the same output (no phase classes)."""
    with monkeypatch.context() as patch:
        patch.setattr(writer, "phase_classes", lambda tensors, least: [None] * len(tensors))
        shards = plan_shards(plan.outputs, plan.options.max_shard_size)
    return sum(s.shareable for s in shards), len(shards)


def test_copies_from_source_files_at_different_phases_go_to_different_shards(tmp_path, monkeypatch):
    """Mistral-7B's real shapes in 2 GB source files whose data start at different offsets modulo 4096: in one
    output file only one source file's copies can line up, so each output shard takes one source file's copies."""
    src = write_synthetic(tmp_path / "src", layers=4, holes=True, shard_size=2_000_000_000)
    assert len(data_phases(src)) > 1
    plan = surgery.plan(src, RULES, 4, 2)
    copied = sum(t.nbytes for t in plan.outputs if isinstance(t.producer, Copy))
    shards = plan_shards(plan.outputs, plan.options.max_shard_size)
    assert sum(s.shareable for s in shards) > 0.9999 * copied
    assert all(s.nbytes <= plan.options.max_shard_size for s in shards)
    greedy, count = shareable_with_greedy_split(plan, monkeypatch)
    assert greedy < 0.9 * copied  # the case arises: huggingface_hub's split mixes source files in output shards
    assert len(shards) <= count + len(data_phases(src)) - 1


# ----------------------------------------------------------------------------------------------- loop filesystems


FILESYSTEMS = {"xfs": ["mkfs.xfs", "-q", "-m", "reflink=1"], "btrfs": ["mkfs.btrfs", "-q"]}
#: sparse: only what the tests write takes space on the disk
IMAGE_BYTES = 2 << 30


@pytest.fixture(scope="module", params=sorted(FILESYSTEMS))
def reflink_dir(request, tmp_path_factory) -> Iterator[Path]:
    """A freshly made XFS (reflink=1) or btrfs filesystem, loop-mounted from a sparse image; unmounted and deleted
    afterwards."""
    kind, mkfs = request.param, FILESYSTEMS[request.param]
    if os.geteuid() != 0:
        pytest.skip(f"{kind}: making and mounting a loop filesystem needs root")
    if shutil.which(mkfs[0]) is None or shutil.which("mount") is None:
        pytest.skip(f"{kind}: {mkfs[0]} is not installed (apt-get install xfsprogs btrfs-progs)")
    folder = tmp_path_factory.mktemp(kind)
    image, mount = folder / f"{kind}.img", folder / "mnt"
    mount.mkdir()
    with open(image, "wb") as f:
        f.truncate(IMAGE_BYTES)
    mounted = False
    try:
        for command in ([*mkfs, str(image)], ["mount", "-o", "loop", str(image), str(mount)]):
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                pytest.skip(f"{kind}: `{' '.join(command)}` failed: {done.stderr.strip()[-300:]}")
        mounted = True
        yield mount
    finally:
        if mounted:
            subprocess.run(["umount", str(mount)], check=True)
        image.unlink(missing_ok=True)


def free_bytes(folder: Path) -> int:
    """Free space of the filesystem holding `folder`, once everything written so far is on it."""
    os.sync()
    stat = os.statvfs(folder)
    return stat.f_bfree * stat.f_frsize


@dataclass
class Run:
    out: Path
    new: int  # bytes of the filesystem newly allocated by the upcycle
    written: Written  # what the upcycle reported


def upcycle(src: Path, dst: Path, **options) -> Run:
    before, reports = free_bytes(dst.parent), []
    out = surgery.upcycle(src, dst, RULES, 4, 2, progress=False, report=reports.append, **options)
    return Run(out, before - free_bytes(dst.parent), *reports)


def shard_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def shared_ranges(path: Path) -> list[tuple[int, int]]:
    """Byte ranges [begin, end) of `path` that `filefrag -v` (e2fsprogs, the kernel's FIEMAP) flags as shared."""
    if shutil.which("filefrag") is None:
        pytest.skip("filefrag (e2fsprogs) is not installed")
    text = subprocess.run(["filefrag", "-v", str(path)], capture_output=True, text=True, check=True).stdout
    block = int(re.search(r"blocks of (\d+) bytes", text).group(1))
    ranges = []
    for line in text.splitlines():
        match = re.match(r"\s*\d+:\s*(\d+)\.\.\s*(\d+):\s*\d+\.\.\s*\d+:\s*\d+:(.*)$", line)
        if match and "shared" in match.group(3):
            ranges.append((int(match.group(1)) * block, (int(match.group(2)) + 1) * block))
    return ranges


def same_files(a: Path, b: Path, src_a: Path, src_b: Path) -> None:
    """The two output folders hold the same files with the same bytes (the model card names its source)."""
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        left, right = (a / name).read_bytes(), (b / name).read_bytes()
        if name == "README.md":
            left, right = left.replace(bytes(src_a), b"SRC"), right.replace(bytes(src_b), b"SRC")
        assert left == right, name


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, Path]:
    """(source, output) of the upcycle on the normal disk."""
    folder = tmp_path_factory.mktemp("normal-disk")
    src = write_synthetic(folder / "src", layers=2, overrides=SMALL)
    return src, surgery.upcycle(src, folder / "out", RULES, 4, 2, progress=False)


@pytest.fixture(scope="module")
def shared(reflink_dir) -> tuple[Path, Run]:
    """(source, upcycle) on the reflink filesystem."""
    src = write_synthetic(reflink_dir / "src", layers=2, overrides=SMALL)
    return src, upcycle(src, reflink_dir / "out")


def test_upcycle_allocates_almost_nothing_new(shared):
    _, run = shared
    size = shard_bytes(run.out)
    assert size > 200e6
    assert run.new <= NEW_AT_MOST * size, f"{run.new:,} of {size:,} bytes newly allocated"
    assert run.written.written == size and run.written.how == "extent map"
    assert run.written.shared >= (1 - NEW_AT_MOST) * size


def test_output_is_byte_identical_to_the_normal_disk(shared, reference):
    src, run = shared
    same_files(run.out, reference[1], src, reference[0])


def test_the_extent_map_shows_the_shared_extents(shared):
    _, run = shared
    for path in run.out.glob("*.safetensors"):
        ranges = shared_ranges(path)
        assert sum(end - begin for begin, end in ranges) >= (1 - NEW_AT_MOST) * path.stat().st_size, path.name


def test_modifying_the_output_leaves_the_source_unchanged(shared, reflink_dir):
    src, _ = shared
    out = upcycle(src, reflink_dir / "out-modified").out
    name = "model.layers.1.block_sparse_moe.experts.2.w3.weight"
    path, begin = tensor_location(out, name)
    source_path, source_begin = tensor_location(src, "model.layers.1.mlp.up_proj.weight")
    before = source_path.read_bytes()
    at = begin + 5 * BLOCK + 17
    assert any(lo <= at < hi for lo, hi in shared_ranges(path))  # the byte is in a shared block
    original = path.read_bytes()[at]
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(bytes([original ^ 0xFF]))
    os.sync()
    assert path.read_bytes()[at] == original ^ 0xFF
    assert source_path.read_bytes() == before
    assert before[source_begin + 5 * BLOCK + 17] == original
    sibling, sibling_begin = tensor_location(out, name.replace("experts.2", "experts.1"))
    assert sibling.read_bytes()[sibling_begin + 5 * BLOCK + 17] == original  # other copies of the block too


def test_no_share_allocates_everything_and_writes_the_same_bytes(shared, reflink_dir):
    src, run = shared
    copied = upcycle(src, reflink_dir / "out-copied", share=False)
    size = shard_bytes(copied.out)
    assert copied.new >= (1 - NEW_AT_MOST) * size, f"{copied.new:,} of {size:,} bytes newly allocated"
    assert copied.written.shared <= NEW_AT_MOST * size
    same_files(copied.out, run.out, src, src)
    shutil.rmtree(copied.out)


def test_the_command_line_reports_bytes_shared(shared, reflink_dir):
    src, _ = shared
    for flags, dst in (([], "cli-shared"), (["--no-share"], "cli-copied")):
        result = CliRunner().invoke(main, ["upcycle", str(src), str(reflink_dir / dst), "-r", RULES, "-e", "4",
                                           "-k", "2", "--quiet", *flags])
        assert result.exit_code == 0, result.output
        assert result.stdout == f"wrote {reflink_dir / dst}\n"
        line = result.stderr.strip().splitlines()[-1]  # the report goes to stderr, beside the progress bar
        share = float(re.search(r"\(([\d.]+)%\) sharing blocks with the source", line).group(1))
        assert (share >= 98.0) if not flags else (share <= 2.0), line
        shutil.rmtree(reflink_dir / dst)


def test_odd_sized_tensors_still_share_every_large_tensor(reflink_dir):
    """Qwen2-style q/k/v biases (2048 and 512 bytes) and an odd vocabulary (embeddings of 500.5 blocks), stored in
    the reference writer's order (by name), so they shift the source's phase between most large tensors."""
    src = reflink_dir / "odd-src"
    src.mkdir()
    config = make_config("mistral-7b", 2, {**SMALL, "vocab_size": 1001})
    shapes = dict(tensor_shapes(config))
    for layer in range(2):
        for proj, rows in (("q", 1024), ("k", 256), ("v", 256)):
            shapes[f"model.layers.{layer}.self_attn.{proj}_proj.bias"] = (rows,)
    generator = torch.Generator().manual_seed(0)
    tensors = {name: torch.randint(-2**15, 2**15, shape, dtype=torch.int16, generator=generator).view(torch.bfloat16)
               for name, shape in shapes.items()}
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    (src / "config.json").write_text(json.dumps(config))
    del tensors
    run = upcycle(src, reflink_dir / "odd-out")
    path = run.out / "model.safetensors"
    ranges = shared_ranges(path)
    large = 0
    with safe_open(str(path), framework="pt") as f:
        names = list(f.keys())
    for name in names:
        begin, end = tensor_range(path, name)
        if end - begin < 64 * 1024:
            continue
        large += 1
        inner = (-(-begin // BLOCK) * BLOCK, end // BLOCK * BLOCK)
        covered = sum(max(0, min(hi, inner[1]) - max(lo, inner[0])) for lo, hi in ranges)
        assert covered == inner[1] - inner[0], f"{name}: {covered:,} of {inner[1] - inner[0]:,} aligned bytes shared"
    assert large == 2 + 2 * (4 + 4 * 3)  # embeddings, lm_head; per layer q, k, v, o and 4 experts x 3
    assert run.new <= NEW_AT_MOST * shard_bytes(run.out)
    shutil.rmtree(run.out)


def test_several_source_files_share_nearly_everything(reflink_dir, monkeypatch):
    """Source files whose data start at different phases, and output shards small enough that huggingface_hub's
    split would put copies from two of them in one file."""
    src = write_synthetic(reflink_dir / "multi-src", layers=4, overrides=SMALL, shard_size=60_000_000)
    plan = surgery.plan(src, RULES, 4, 2, max_shard_size=150_000_000)
    copied = sum(t.nbytes for t in plan.outputs if isinstance(t.producer, Copy))
    assert len(data_phases(src)) > 1 and shareable_with_greedy_split(plan, monkeypatch)[0] < 0.9 * copied
    run = upcycle(src, reflink_dir / "multi-out", max_shard_size=150_000_000)
    assert len(list(run.out.glob("*.safetensors"))) > 1
    assert run.new <= NEW_AT_MOST * shard_bytes(run.out)
    shutil.rmtree(src)
    shutil.rmtree(run.out)


def tensor_range(path: Path, name: str) -> tuple[int, int]:
    """[begin, end) of a tensor's bytes in a safetensors file, from its header."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        begin, end = json.loads(f.read(n))[name]["data_offsets"]
    return 8 + n + begin, 8 + n + end


def tensor_location(folder: Path, name: str) -> tuple[Path, int]:
    """The shard of `folder` holding `name`, and where its bytes start."""
    index = folder / "model.safetensors.index.json"
    shard = json.loads(index.read_text())["weight_map"][name] if index.exists() else "model.safetensors"
    return folder / shard, tensor_range(folder / shard, name)[0]


def test_evicted_hub_blobs_leave_the_output_intact(shared, reflink_dir, monkeypatch):
    """With the Hugging Face cache on the same reflink filesystem, the output shares the downloaded blobs' blocks,
    and --evict-source deleting the blobs loses nothing: shared blocks outlive the unlink."""
    try:
        require_hub_client()
    except SurgeryError as exc:
        pytest.skip(str(exc))
    src, run = shared
    hub = FakeHub()
    try:
        hub.add_repo("tiny-org/synthetic", {"c" * 40: folder_files(src)}, {"main": "c" * 40})
        cache = reflink_dir / "hf-cache"
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            hub.url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(reflink_dir / "hf-token"))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
            monkeypatch.delenv(var, raising=False)
        hubbed = upcycle("tiny-org/synthetic", reflink_dir / "from-hub", evict_source=True)
    finally:
        hub.close()
    assert not list(cache.rglob("*.safetensors")) and not any(p.stat().st_size > 1e6 for p in cache.rglob("*")
                                                                if p.is_file())
    size = shard_bytes(hubbed.out)
    source = shard_bytes(src)
    assert hubbed.written.shared >= (1 - NEW_AT_MOST) * size  # measured before eviction
    assert hubbed.new <= source + NEW_AT_MOST * size, f"{hubbed.new:,} bytes new for {source:,} downloaded"
    for path in run.out.glob("*.safetensors"):
        assert (hubbed.out / path.name).read_bytes() == path.read_bytes(), path.name
    shutil.rmtree(hubbed.out)


def test_later_copies_clone_the_first_where_the_source_cannot_be_shared(reflink_dir):
    """One output shard fed by two source shards whose data start at different offsets modulo 4096: one group of
    copies cannot line up with its source, but the later experts' copies clone the first copy in the output."""
    src = write_synthetic(reflink_dir / "two-shards", layers=2, overrides=SMALL, shard_size=60_000_000)
    plan = surgery.plan(src, RULES, 4, 2, max_shard_size=10**12)
    (shard,) = plan_shards(plan.outputs, 10**12)
    unshareable = shard.nbytes - shard.shareable
    assert len({t.file for t in plan.source.tensors.values()}) > 1 and unshareable > 30e6  # the case arises
    run = upcycle(src, reflink_dir / "two-shards-out", max_shard_size=10**12)
    assert run.new <= unshareable / 4 + 4e6, f"{run.new:,} bytes new; {unshareable:,} cannot share with the source"
    shutil.rmtree(src)
    shutil.rmtree(run.out)
