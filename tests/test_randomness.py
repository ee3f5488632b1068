"""Random values: right distributions, independent of how draws are split, of anything but (seed, key), and of
numpy's version (checked against numpy 1.24 in a throwaway venv)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import surgery.randomness as randomness
import surgery.values as values_module
from surgery import dtypes
from surgery.errors import SurgeryError
from surgery.plan import Options
from surgery.randomness import RandomStream
from surgery.rules import INITS

from .test_writer import payload, random_init

N = 1 << 18
#: the inits drawn straight from a stream (orthogonal is made from normal draws; see test_orthogonal_init)
STREAM_INITS = [kind for kind in INITS if kind != "orthogonal"]


def ks_distance(sample: np.ndarray, cdf) -> float:
    """Kolmogorov-Smirnov statistic of `sample` against the distribution function `cdf` (a Python callable)."""
    x = np.sort(sample)
    expected = np.array([cdf(float(v)) for v in x])
    n = x.size
    return float(max((np.arange(1, n + 1) / n - expected).max(), (expected - np.arange(n) / n).max()))


def normal_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


#: KS critical value at significance 0.001, times sqrt(n)
KS_001 = 1.95


# ----------------------------------------------------------------------------------------------- statistics


def test_normal_statistics():
    z = RandomStream(0, "statistics").normal(N)
    assert z.dtype == np.float64 and z.shape == (N,)
    assert abs(z.mean()) < 4.5 / math.sqrt(N)
    assert abs(z.std() - 1.0) < 4.5 * math.sqrt(1 / (2 * N))
    assert abs(((z - z.mean()) ** 4).mean() / z.var() ** 2 - 3.0) < 4.5 * math.sqrt(24 / N)  # kurtosis
    assert ks_distance(z, normal_cdf) < KS_001 / math.sqrt(N)
    for k in (2, 3, 4):  # the tails, which KS barely sees
        p = 2 * (1 - normal_cdf(k))
        assert abs(np.mean(np.abs(z) > k) - p) < 5 * math.sqrt(p * (1 - p) / N), k


def test_uniform_statistics():
    u = RandomStream(0, "statistics").uniform(N)
    assert u.dtype == np.float64 and u.min() >= 0.0 and u.max() < 1.0
    assert abs(u.mean() - 0.5) < 4.5 * math.sqrt(1 / 12 / N)
    assert abs(u.var() - 1 / 12) < 4.5 * math.sqrt(1 / 180 / N)
    assert ks_distance(u, lambda x: x) < KS_001 / math.sqrt(N)
    assert np.all(u * 2.0**53 == np.floor(u * 2.0**53))  # multiples of 2**-53 ...
    assert np.count_nonzero((u * 2.0**53) % 2) > N // 3  # ... using all 53 bits


def test_log_is_accurate():
    rng = np.random.default_rng(0)
    s = np.concatenate([rng.random(100_000), rng.random(1000) * 2.0**-102, 1 - rng.random(1000) * 2.0**-40,
                        [2.0**-102, 0.5, 0.7071067811865476, 0.7071067811865475, np.nextafter(1.0, 0)]])
    s = s[s > 0]
    expected = np.array([math.log(v) for v in s])
    assert np.all(np.abs(randomness._log(s) - expected) <= 2 * np.spacing(np.abs(expected)))


def test_random_init_is_the_stream_scaled():
    n = 1000
    normal = random_init("normal", 0.02, "F64", n, seed=3, key="w")
    uniform = random_init("uniform", 0.5, "F64", n, seed=3, key="w")
    assert payload(normal) == (RandomStream(3, "w").normal(n) * 0.02).tobytes()
    assert payload(uniform) == ((RandomStream(3, "w").uniform(n) * 2 - 1) * 0.5).tobytes()
    values = np.frombuffer(payload(uniform))
    assert values.min() >= -0.5 and values.max() < 0.5 and values.min() < -0.49 and values.max() > 0.49


def test_random_init_rounds_once_from_float64():
    values = RandomStream(1, "w").normal(N)
    got = payload(random_init("normal", 1.0, "F16", N, seed=1, key="w"))
    assert got == bytes(dtypes.encode(values, "F16"))
    assert got != values.astype(np.float32).astype(np.float16).tobytes()  # rounding twice differs somewhere


# ----------------------------------------------------------------------------------------------- splitting


def draws(stream: RandomStream, requests: list[tuple[str, int]]) -> np.ndarray:
    return np.concatenate([getattr(stream, kind)(n) for kind, n in requests])


@pytest.mark.parametrize("batch_pairs", [3, 1000, randomness.BATCH_PAIRS])
def test_draws_do_not_depend_on_how_requests_are_split(monkeypatch, batch_pairs):
    monkeypatch.setattr(randomness, "BATCH_PAIRS", batch_pairs)
    rng = np.random.default_rng(batch_pairs)
    for kind in ("normal", "uniform"):
        whole = getattr(RandomStream(5, "k"), kind)(100_000)
        sizes = rng.integers(0, 5000, 60)
        sizes = sizes[np.cumsum(sizes) < 100_000].tolist()
        split = draws(RandomStream(5, "k"), [(kind, n) for n in sizes + [100_000 - sum(sizes)]])
        assert split.tobytes() == whole.tobytes(), kind
    mixed = draws(RandomStream(5, "k"), [("normal", 3), ("uniform", 4), ("normal", 5000)])
    resplit = draws(RandomStream(5, "k"), [("normal", 1), ("normal", 2), ("uniform", 1), ("uniform", 3),
                                           ("normal", 4999), ("normal", 1)])
    assert mixed.tobytes() == resplit.tobytes()


def test_normals_do_not_depend_on_the_batch_size(monkeypatch):
    expected = RandomStream(9, "k").normal(10_000)
    monkeypatch.setattr(randomness, "BATCH_PAIRS", 7)
    assert RandomStream(9, "k").normal(10_000).tobytes() == expected.tobytes()


@pytest.mark.parametrize("kind", STREAM_INITS)
@pytest.mark.parametrize("dtype", dtypes.FLOATS)
def test_random_init_chunks_equal_one_big_draw(monkeypatch, kind, dtype):
    numel = 10_007

    def produced(chunk: int) -> bytes:
        monkeypatch.setattr(values_module, "CHUNK_ELEMENTS", chunk)
        return payload(random_init(kind, 0.7, dtype, numel, seed=11, key="t"))

    whole = produced(1 << 20)
    assert len(whole) == dtypes.nbytes(dtype, numel)
    assert produced(1000) == whole and produced(3331) == whole and produced(17) == whole


# ----------------------------------------------------------------------------------------------- seeding


def test_values_depend_only_on_seed_and_key():
    reference = RandomStream(1, "a").normal(100)
    np.random.seed(123)  # numpy's global state plays no part
    others = [RandomStream(seed, key) for seed, key in [(1, "b"), (2, "a"), (1, "a"), (1, "a ")]]
    for other in others[::-1]:
        other.normal(17)  # other streams' draws play no part either
    assert RandomStream(1, "a").normal(100).tobytes() == reference.tobytes()
    assert RandomStream(1, "a").uniform(100).tobytes() != RandomStream(1, "b").uniform(100).tobytes()
    assert RandomStream(2**64 - 1, "").normal(3).shape == (3,)
    assert RandomStream(0, "é").normal(3).tobytes() != RandomStream(0, "e").normal(3).tobytes()


@pytest.mark.parametrize("seed", [-1, 2**64, 1.0, True, "3", None])
def test_bad_seed_is_one_line(seed):
    with pytest.raises(SurgeryError, match=r"^seed must be an integer") as info:
        Options(seed=seed)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError):
        RandomStream(seed, "w")


def test_orthogonal_init(tmp_path):
    """Rows orthogonal, each of norm std * sqrt(columns); the same bytes twice; chunking does not matter."""
    from surgery.producers import produce
    from surgery.values import Init

    init = Init("orthogonal", (16, 64), "F64", 0.02, 3, "router")
    rows = np.frombuffer(payload(produce(init, "F64"))).reshape(16, 64)
    assert np.allclose(rows @ rows.T, np.eye(16) * 0.02**2 * 64, atol=1e-15)
    assert payload(produce(init, "F64")) == rows.tobytes()
    assert not np.allclose(rows, np.frombuffer(payload(produce(Init("orthogonal", (16, 64), "F64", 0.02, 4, "router"),
                                                                "F64"))).reshape(16, 64))


def test_largest_seed_and_zero_scale_are_fine():
    assert Options(seed=2**64 - 1).seed == 2**64 - 1
    assert not np.frombuffer(payload(random_init("uniform", 0, "F32", 4, 2**64 - 1, "w")), dtype="<f4").any()


# ----------------------------------------------------------------------------------------------- portability


BANNED = {
    np.random: ["Generator", "default_rng", "RandomState", "normal", "standard_normal", "uniform", "random",
                "random_sample", "rand", "randn"],
    np: ["log", "log1p", "log2", "log10", "exp", "expm1", "exp2", "sin", "cos", "tan", "arctanh", "tanh", "power",
         "float_power", "sinh", "cosh", "arctan2", "hypot"],
    math: ["log", "log1p", "log2", "exp", "sin", "cos", "sqrt", "erf"],
}


def test_no_generator_distribution_or_transcendental_function_is_used(monkeypatch):
    """numpy's Generator methods cannot be patched (an immutable type), so the names that reach them are."""

    def banned(name):
        def call(*args, **kwargs):
            raise AssertionError(f"{name} was called")
        return call

    for module, names in BANNED.items():
        for name in names:
            monkeypatch.setattr(module, name, banned(f"{module.__name__}.{name}"))
    stream = RandomStream(4, "k")
    assert stream.normal(70_000).size == 70_000 and stream.uniform(10).size == 10
    for kind in STREAM_INITS:
        assert len(payload(random_init(kind, 1.0, "BF16", 5000, 4, "k"))) == 10_000


CASES = [(0, "model.layers.0.block_sparse_moe.gate.weight"), (2**64 - 1, ""), (12345, "clé ✓"), (2**33, "x")]
COUNTS = {"normal": 60_000, "uniform": 1000}  # 60k normals span several polar batches

DRAW = """
import importlib.util, json, sys
from pathlib import Path
spec = importlib.util.spec_from_file_location("randomness", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
cases, counts, out = json.loads(sys.argv[2]), json.loads(sys.argv[3]), Path(sys.argv[4])
for i, (seed, key) in enumerate(cases):
    stream = module.RandomStream(seed, key)
    for kind, n in counts.items():
        (out / f"{i}.{kind}").write_bytes(getattr(stream, kind)(n).tobytes())
print(module.np.__version__)
"""


def draw_with(python: str, folder: Path) -> str:
    """Run the draws of CASES with `python` into `folder`; return its numpy version."""
    folder.mkdir()
    result = subprocess.run([python, "-c", DRAW, randomness.__file__, json.dumps(CASES), json.dumps(COUNTS),
                             str(folder)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.fixture(scope="session")
def numpy_124(tmp_path_factory) -> str:
    """The python of a fresh venv with numpy 1.24.4 (made once per session), or a skip saying why not."""
    venv = tmp_path_factory.mktemp("numpy-1.24")
    steps = [[sys.executable, "-m", "venv", str(venv)],
             [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "numpy==1.24.4"]]
    for step in steps:
        try:
            result = subprocess.run(step, capture_output=True, text=True, timeout=120)
        except subprocess.TimeoutExpired:
            pytest.skip(f"cross-version check needs numpy 1.24.4 in a venv: `{' '.join(step[-3:])}` timed out")
        if result.returncode:
            reason = (result.stderr.strip().splitlines() or ["no output"])[-1]
            pytest.skip(f"cross-version check needs numpy 1.24.4 in a venv: `{' '.join(step[-3:])}` failed: {reason}")
    return str(venv / "bin" / "python")


def test_same_bytes_under_numpy_1_24(numpy_124, tmp_path):
    assert np.__version__.startswith("2.")
    assert draw_with(numpy_124, tmp_path / "old") == "1.24.4"
    assert draw_with(sys.executable, tmp_path / "new") == np.__version__
    for i, case in enumerate(CASES):
        for kind in COUNTS:
            old = np.frombuffer((tmp_path / "old" / f"{i}.{kind}").read_bytes(), dtype=np.uint64)
            new = np.frombuffer((tmp_path / "new" / f"{i}.{kind}").read_bytes(), dtype=np.uint64)
            assert old.size == COUNTS[kind]
            differ = np.flatnonzero(old != new)
            assert not differ.size, f"{case} {kind}: {differ.size} values differ, the first at {differ[0]}"
