"""Every op of the rule language: output bytes equal what numpy (or torch) computes from the source, for every
float dtype; layout-only trees are byte copies that never read the source into Python; computed ones run in
bounded memory."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import surgery
from surgery import dtypes
from surgery.producers import Compute, Copy
from surgery.randomness import RandomStream
from surgery.values import chosen_indices

ROOT = Path(__file__).resolve().parent.parent
DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
#: one unit in the last place of each dtype, relative
RTOL = {"F16": 2**-10, "BF16": 2**-7, "F32": 2**-23, "F64": 2**-50}
SHAPES = {"a": (6, 8), "b": (6, 8), "x": (8, 6, 10), **{f"e.{i}": (4, 6) for i in range(3)}}


@pytest.fixture(scope="module", params=list(DTYPES))
def toy(request, tmp_path_factory) -> tuple[Path, str, dict[str, np.ndarray]]:
    """A checkpoint of `model_type: toy` in one dtype: the folder, the dtype, and every tensor as float64."""
    dtype = request.param
    folder = tmp_path_factory.mktemp(f"toy-{dtype}")
    generator = torch.Generator().manual_seed(0)
    tensors = {name: torch.randn(shape, generator=generator).to(DTYPES[dtype]) for name, shape in SHAPES.items()}
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({"model_type": "toy", "hidden_size": 8}))
    return folder, dtype, {name: t.double().numpy() for name, t in tensors.items()}


def rules(tmp_path: Path, tensors: list[dict], **extra: object) -> Path:
    doc = {"name": "ops", "source": {"model_type": ["toy"]}, "target": {"model_type": "toy"},
           "indices": {"i": {"count": 3}}, "tensors": tensors, **extra}
    path = tmp_path / "ops.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def apply(toy, tmp_path: Path, value: object, **rule: object) -> tuple[bytes, surgery.api.Plan]:
    """Write one output `out` with this value; return its bytes and the plan."""
    folder, _, _ = toy
    path = rules(tmp_path, [{"to": "out", "for_each": "a", "value": value, **rule}])
    plan = surgery.plan(folder, path)
    out = surgery.upcycle(folder, tmp_path / "out", path, progress=False)
    return raw(load_file(out / "model.safetensors")["out"]), plan


def raw(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def stored(values: np.ndarray, dtype: str) -> bytes:
    """float64 values rounded once to `dtype` (dtypes.encode is checked against exact rounding in test_dtypes)."""
    return bytes(dtypes.encode(np.asarray(values, dtype=np.float64), dtype))


def producer(plan, name: str = "out"):
    return next(p.tensor.producer for p in plan.tensors if p.tensor.name == name)


# ----------------------------------------------------------------------------------------------- layout


LAYOUTS = [
    ({"slice": "a", "dim": 1, "start": 2, "stop": 7, "step": 2}, lambda s: s["a"][:, 2:7:2]),
    ({"slice": "b", "dim": 0, "part": 1, "parts": 3}, lambda s: s["b"][2:4]),
    ({"slice": "x", "dim": -1, "start": 3, "stop": 9}, lambda s: s["x"][..., 3:9]),
    ({"take": "b", "dim": 0, "index": [5, 0, 1, 2]}, lambda s: s["b"][[5, 0, 1, 2]]),
    ({"take": "x", "dim": 0, "index": 3}, lambda s: s["x"][3]),
    ({"repeat": "a", "dim": 0, "times": 2}, lambda s: np.repeat(s["a"], 2, axis=0)),
    ({"concat": ["a", "b"], "dim": 0}, lambda s: np.concatenate([s["a"], s["b"]], 0)),
    ({"concat": ["b", "a"], "dim": 1}, lambda s: np.concatenate([s["b"], s["a"]], 1)),
    ({"stack": "e.{i}", "over": "i"}, lambda s: np.stack([s[f"e.{i}"] for i in range(3)])),
    ({"stack": {"slice": "e.{i}", "dim": 1, "start": 1, "stop": 5}, "over": "i"},
     lambda s: np.stack([s[f"e.{i}"][:, 1:5] for i in range(3)])),
]


@pytest.mark.parametrize("value,expected", LAYOUTS, ids=lambda v: next(iter(v)) if isinstance(v, dict) else "")
def test_layout_ops_are_byte_copies(toy, tmp_path, monkeypatch, value, expected):
    _, dtype, source = toy
    plan = surgery.plan(toy[0], rules(tmp_path, [{"to": "out", "for_each": "a", "value": value}]))
    if isinstance(producer(plan), Copy):  # copied in the kernel: Python never reads the source's bytes
        for name in ("pread", "preadv", "read"):
            monkeypatch.setattr(os, name, _no_reads)
    data, _ = apply(toy, tmp_path, value)
    monkeypatch.undo()
    assert data == stored(expected(source), dtype)
    assert producer(plan).__class__ in (Copy, Compute) and not producer(plan).node.computed()


def _no_reads(*args, **kwargs):
    raise AssertionError("a byte copy read source data into Python")


def test_strided_copies_stay_a_few_runs(tmp_path):
    """A column slice and a stack of 8 experts' 3-D tensors: byte-equal to numpy, one run per contiguous block."""
    folder = tmp_path / "src"
    folder.mkdir()
    generator = torch.Generator().manual_seed(1)
    experts = {f"w.{e}": torch.randn(2, 64, 1024, generator=generator).to(torch.bfloat16) for e in range(8)}
    save_file(experts, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({"model_type": "toy"}))
    path = rules(tmp_path, [
        {"to": "fused", "for_each": "w.0", "value": {"stack": "w.{i}", "over": "i"}},
        {"to": "columns", "for_each": "w.0", "value": {"stack": {"slice": "w.{i}", "dim": 2, "start": 256, "stop": 768},
                                                        "over": "i"}},
    ], indices={"i": {"count": 8}})
    plan = surgery.plan(folder, path)
    fused, columns = producer(plan, "fused"), producer(plan, "columns")
    assert isinstance(fused, Copy) and len(fused.runs) == 8 and all(run.count == 1 for _, run in fused.runs)
    assert isinstance(columns, Copy) and len(columns.runs) == 8 * 2 and all(run.count == 64 for _, run in columns.runs)
    out = load_file(surgery.upcycle(folder, tmp_path / "out", path, progress=False) / "model.safetensors")
    assert raw(out["fused"]) == raw(torch.stack(list(experts.values())))
    assert raw(out["columns"]) == raw(torch.stack([w[:, :, 256:768] for w in experts.values()]))


# ----------------------------------------------------------------------------------------------- values


VALUES = [
    ({"scale": "a", "by": 3}, lambda s: s["a"] * 3),
    ({"scale": {"slice": "x", "dim": 2, "start": 3, "stop": 9}, "by": 0.1}, lambda s: s["x"][..., 3:9] * 0.1),
    ({"add": ["a", "b"]}, lambda s: s["a"] + s["b"]),
    ({"mean": "e.{i}", "over": "i"}, lambda s: (s["e.0"] + s["e.1"] + s["e.2"]) / 3),
    ({"scale": {"stack": "e.{i}", "over": "i"}, "by": 2}, lambda s: np.stack([s[f"e.{i}"] for i in range(3)]) * 2),
    ({"concat": [{"scale": "a", "by": -1}, "b"], "dim": 1}, lambda s: np.concatenate([-s["a"], s["b"]], 1)),
]


@pytest.mark.parametrize("value,expected", VALUES, ids=lambda v: next(iter(v)) if isinstance(v, dict) else "")
def test_value_ops_round_once(toy, tmp_path, value, expected):
    _, dtype, source = toy
    data, plan = apply(toy, tmp_path, value)
    assert isinstance(producer(plan), Compute)
    assert data == stored(expected(source), dtype)


@pytest.mark.parametrize("target", list(DTYPES))
def test_cast(toy, tmp_path, target):
    _, _, source = toy
    data, _ = apply(toy, tmp_path, {"cast": "a", "dtype": target})
    assert data == stored(source["a"], target)


def test_cast_in_the_middle_rounds_there(toy, tmp_path):
    """cast to F16 then add: the sum of the F16-rounded values, not of the originals."""
    _, dtype, source = toy
    data, _ = apply(toy, tmp_path, {"add": [{"cast": "a", "dtype": "F16"}, {"cast": "b", "dtype": "F16"}]},
                    dtype="F64")
    f16 = {k: np.frombuffer(stored(source[k], "F16"), dtype="<f2").astype(np.float64).reshape(6, 8) for k in "ab"}
    assert data == stored(f16["a"] + f16["b"], "F64")


@pytest.mark.parametrize("relative", [False, True])
def test_noise(toy, tmp_path, relative):
    _, dtype, source = toy
    data, _ = apply(toy, tmp_path, {"noise": "a", "std": 0.5, "relative": relative, "key": "noise-key"})
    scale = 0.5 * (source["a"].std() if relative else 1.0)
    assert data == stored(source["a"] + RandomStream(0, "noise-key").normal(48).reshape(6, 8) * scale, dtype)


@pytest.mark.parametrize("dim", [0, 1])
def test_reinit(toy, tmp_path, dim):
    """The chosen rows/columns re-drawn from N(mean, std) of what they replace; the rest untouched."""
    _, dtype, source = toy
    data, _ = apply(toy, tmp_path, {"reinit": "a", "dim": dim, "fraction": 0.5, "key": "drop"})
    a = source["a"]
    n = a.shape[dim]
    chosen = np.sort(chosen_indices(0, "drop", n, n // 2))
    replaced = a[chosen] if dim == 0 else a[:, chosen]
    draws = RandomStream(0, "drop#out").normal(replaced.size).reshape(replaced.shape)
    expected = a.copy()
    values = draws * replaced.std() + replaced.mean()
    if dim == 0:
        expected[chosen] = values
    else:
        expected[:, chosen] = values
    got = dtypes.decode(data, dtype).astype(np.float64).reshape(a.shape)
    kept = np.ones(n, dtype=bool)
    kept[chosen] = False
    untouched = (slice(None), kept) if dim == 1 else kept
    assert got[untouched].tobytes() == a[untouched].tobytes()  # the rest is the source, exactly
    # the re-drawn values: equal up to the last bit of the dtype (mean and std are summed in another order)
    assert np.allclose(got, dtypes.decode(stored(expected, dtype), dtype).reshape(a.shape), rtol=RTOL[dtype], atol=0)
    assert len(chosen) == n // 2 and len(set(chosen)) == n // 2


@pytest.mark.parametrize("kind,field,scale", [("normal", "std", 0.3), ("uniform", "bound", 0.7), ("zeros", None, 0)])
def test_init(toy, tmp_path, kind, field, scale):
    _, dtype, _ = toy
    value = {"init": kind, "shape": [5, "hidden_size"], "key": "k", **({field: scale} if field else {})}
    data, _ = apply(toy, tmp_path, value)
    stream = RandomStream(0, "k")
    draws = {"normal": lambda: stream.normal(40) * scale, "uniform": lambda: (stream.uniform(40) * 2 - 1) * scale,
             "zeros": lambda: np.zeros(40)}[kind]()
    assert data == stored(draws, dtype)


def test_router_bytes_are_the_streams_of_their_names(mistral, tmp_path):
    """The built-in rule files draw each router from the stream of (seed, tensor name): the same bytes as before
    the rule language grew, for every seed and router init."""
    for seed, init in ((0, "normal"), (5, "uniform")):
        out = surgery.upcycle(mistral, tmp_path / f"out{seed}", "mistral-to-mixtral", 4, 2, seed=seed,
                              router_init=init, progress=False)
        tensors = {}
        for shard in out.glob("*.safetensors"):
            tensors.update(load_file(shard))
        for name in ("model.layers.0.block_sparse_moe.gate.weight", "model.layers.1.block_sparse_moe.gate.weight"):
            stream = RandomStream(seed, name)
            draws = stream.normal(4 * 32) * 0.02 if init == "normal" else (stream.uniform(128) * 2 - 1) / math.sqrt(32)
            assert raw(tensors[name]) == stored(draws, "F32"), (seed, init, name)


# ----------------------------------------------------------------------------------------------- bounded memory


def test_a_computed_op_on_a_large_tensor_runs_in_bounded_memory(tmp_path):
    """Every expert's down_proj scaled: a 1.17 GB bf16 output computed from a Mistral-7B-shaped down_proj
    [4096, 14336], in a subprocess whose peak RSS is measured."""
    folder = tmp_path / "src"
    folder.mkdir()
    from surgery.header import build_header

    rows, cols = 4096, 14336
    nbytes = rows * cols * 2
    with open(folder / "model.safetensors", "wb") as f:
        f.write(build_header([("down", "BF16", (rows, cols), nbytes)], {"format": "pt"}))
        rng = np.random.default_rng(0)
        for _ in range(rows // 512):
            words = rng.integers(0x3C00, 0x3D00, 512 * cols, dtype=np.uint16)
            f.write(words.tobytes())
    (folder / "config.json").write_text(json.dumps({"model_type": "toy"}))
    path = rules(tmp_path, [{"to": "experts", "for_each": "down",
                             "value": {"scale": {"stack": "down", "over": "i"}, "by": 4}}], indices={"i": 10})
    script = (  # VmHWM, not ru_maxrss: that counts the forking parent (pytest with torch loaded) too
        "import surgery\n"
        f"surgery.upcycle({str(folder)!r}, {str(tmp_path / 'out')!r}, {str(path)!r}, progress=False)\n"
        "print(next(line for line in open('/proc/self/status') if line.startswith('VmHWM')))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    peak_mib = int(result.stdout.split()[-2]) / 1024
    written = (tmp_path / "out" / "model.safetensors").stat().st_size
    assert written > 10 * nbytes >= 1_000_000_000
    assert peak_mib < 200, f"peak RSS {peak_mib:.0f} MiB for a {written / 1e9:.2f} GB computed output"
    with open(tmp_path / "out" / "model.safetensors", "rb") as f:  # spot check: the last expert's last row, times 4
        f.seek(-cols * 2, os.SEEK_END)
        last = np.frombuffer(f.read(), dtype="<u2")
    with open(folder / "model.safetensors", "rb") as f:
        f.seek(-cols * 2, os.SEEK_END)
        source = dtypes.decode(f.read(), "BF16")
    assert bytes(dtypes.encode(source * 4, "BF16")) == last.tobytes()
