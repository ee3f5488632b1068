"""Encoding computed values: rounded once, to nearest even, exactly as rational arithmetic says; overflow refused."""

from __future__ import annotations

import functools
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

import surgery.values as values_module
from surgery import dtypes
from surgery.errors import SurgeryError
from surgery.writer import OutputTensor, write_checkpoint

from .test_writer import cast, load_torch, source

#: fraction bits, smallest and largest exponent of the normal numbers
FORMATS = {"F16": (10, -14, 15), "BF16": (7, -126, 127), "F32": (23, -126, 127)}
WORD = {"F16": np.uint16, "BF16": np.uint16, "F32": np.uint32}
PAIRS = [("F64", "F16"), ("F64", "BF16"), ("F64", "F32"), ("F32", "BF16"), ("F32", "F16")]
NUMPY = {"F64": np.float64, "F32": np.float32}


# ----------------------------------------------------------------------------------------------- reference


def exact_round(x: float, target: str) -> float:
    """x rounded to nearest, ties to even, into `target` (inf beyond its range), computed with rationals."""
    if not math.isfinite(x) or x == 0:
        return x
    fraction_bits, emin, emax = FORMATS[target]
    q = abs(Fraction(x))
    e = q.numerator.bit_length() - q.denominator.bit_length()  # q = odd / 2**k, so 2**e <= q < 2**(e + 1)
    ulp = Fraction(2) ** (max(e, emin) - fraction_bits)
    rounded = round(q / ulp) * ulp  # round() of a Fraction breaks ties to even
    largest = (2 - Fraction(2) ** -fraction_bits) * Fraction(2) ** emax
    return math.copysign(math.inf if rounded > largest else float(rounded), x)


def target_bits(values: list[float], target: str) -> np.ndarray:
    """The encodings of values that `target` represents exactly."""
    if target == "F16":
        return np.array(values, dtype=np.float16).view(np.uint16)
    words = np.array(values, dtype=np.float32).view(np.uint32)
    return (words >> 16).astype(np.uint16) if target == "BF16" else words


def encoded(values: np.ndarray, target: str) -> np.ndarray:
    return np.frombuffer(bytes(dtypes.encode(values, target)), dtype=WORD[target])


def exact_bits(values: np.ndarray, target: str) -> np.ndarray:
    return target_bits([exact_round(float(v), target) for v in values], target)


def assert_rounds_exactly(values: np.ndarray, target: str, want: np.ndarray | None = None):
    got = encoded(values, target)
    want = exact_bits(values, target) if want is None else want
    bad = np.flatnonzero(got != want)
    assert not bad.size, f"{bad.size} wrong, e.g. {values[bad[0]]!r} -> {got[bad[0]]:#x}, exact {want[bad[0]]:#x}"


# ----------------------------------------------------------------------------------------------- test values


def as_float64(words: np.ndarray, target: str) -> np.ndarray:
    """The values of `target` encoded by `words`."""
    if target == "F16":
        return words.view(np.float16).astype(np.float64)
    if target == "BF16":
        return (words.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return words.view(np.float32).astype(np.float64)


@functools.cache
def adversarial(source: str, target: str, seed: int = 0) -> np.ndarray:
    """Values of `source` at, next to and two steps from: random values of `target` (subnormals included), the
    halfway points between them and their successors (where rounding twice goes wrong), and the edges of the
    subnormal and overflow ranges; with both signs, none that overflows."""
    fraction_bits, emin, emax = FORMATS[target]
    words = np.random.default_rng(seed).integers(0, target_bits([math.inf], target)[0], 1000).astype(WORD[target])
    low, high = as_float64(words, target), as_float64(words + 1, target)
    tiny = math.ldexp(1.0, emin - fraction_bits)
    largest = (2 - 2.0**-fraction_bits) * 2.0**emax
    limit = largest + 2.0 ** (emax - fraction_bits - 1)  # halfway to the next power of two: rounds to inf
    edges = np.array([tiny / 2, tiny, 1.5 * tiny, 2.0**emin, largest, limit, 1.0, 2.0**-30])
    kind = NUMPY[source]
    base = np.concatenate([low, (low + high) / 2, edges]).astype(kind)  # halfway points are exact in float32 too
    around = [base]
    for direction in (kind(0), kind(math.inf)):
        step = np.nextafter(base, direction)
        around += [step, np.nextafter(step, direction)]
    if source == "F64":
        around += [base * (1 + 2.0**-30), base * (1 - 2.0**-30)]  # beyond float32's precision
    values = np.concatenate(around)
    values = values[np.abs(values) < limit]
    return np.concatenate([values, -values])


@functools.cache
def adversarial_bits(source: str, target: str) -> np.ndarray:
    """The exact encodings of adversarial(source, target)."""
    return exact_bits(adversarial(source, target), target)


# ----------------------------------------------------------------------------------------------- rounding


@pytest.mark.parametrize("source,target", PAIRS)
def test_adversarial_values_round_exactly(source, target):
    assert_rounds_exactly(adversarial(source, target), target, adversarial_bits(source, target))


@pytest.mark.parametrize("source,target", PAIRS)
def test_random_values_round_exactly(source, target):
    fraction_bits, emin, emax = FORMATS[target]
    rng = np.random.default_rng(1)
    n = 20_000
    exponents = rng.integers(emin - fraction_bits - 3, emax + 1, n)
    values = np.ldexp(rng.random(n) + 1.0, exponents) * rng.choice([-1.0, 1.0], n)
    values = values[np.abs(values) < (2 - 2.0**-fraction_bits) * 2.0**emax].astype(NUMPY[source])
    assert_rounds_exactly(values[np.isfinite(values)], target)


@pytest.mark.parametrize("target", ["F16", "BF16"])
def test_adversarial_values_defeat_rounding_twice(target):
    """Precondition: rounding through float32 gets some of the float64 test values wrong."""
    values = adversarial("F64", target)
    twice = torch.from_numpy(values).float().to(torch.float16 if target == "F16" else torch.bfloat16)
    assert np.count_nonzero(twice.view(torch.int16).numpy().view(np.uint16) != adversarial_bits("F64", target)) > 100


@pytest.mark.parametrize("source", ["F64", "F32"])
@pytest.mark.parametrize("target", ["F16", "BF16", "F32"])
def test_specials_pass_through(source, target):
    values = np.array([0.0, -0.0, math.inf, -math.inf, math.nan, -math.nan], dtype=NUMPY[source])
    back = dtypes.decode(bytes(dtypes.encode(values, target)), target)
    assert back.dtype == np.float32
    assert np.array_equal(np.signbit(back), np.signbit(values))
    assert np.array_equal(back[:4], values[:4]) and np.isnan(back[4:]).all()


def test_decode_is_exact_and_keeps_float64():
    values = np.array([1 / 3, -2.0**-1074, 1e300, -math.inf])
    assert dtypes.decode(values.tobytes(), "F64").tobytes() == values.tobytes()
    assert dtypes.decode(np.float32([1 / 3]).tobytes(), "F32").dtype == np.float32
    halves = np.array([0x0001, 0x7BFF, 0x8400, 0x3C01], dtype="<u2")
    assert np.array_equal(dtypes.decode(halves.tobytes(), "F16"), halves.view(np.float16).astype(np.float32))
    assert np.array_equal(dtypes.decode(halves.tobytes(), "BF16").view(np.uint32), halves.astype(np.uint32) << 16)


# ----------------------------------------------------------------------------------------------- overflow


@pytest.mark.parametrize("value,source,target,shown", [
    (70000.0, "F32", "F16", "values up to 7e+04 do not fit in F16 (largest 65504); use a wider --dtype"),
    (-65520.0, "F64", "F16", "values down to -6.55e+04 do not fit in F16 (largest 65504)"),
    (3.5e38, "F64", "BF16", "values up to 3.5e+38 do not fit in BF16 (largest 3.3895e+38)"),
    (float.fromhex("0x1.ffp127"), "F32", "BF16", "values up to 3.4e+38 do not fit in BF16"),  # a tie: to even
    (3.5e38, "F64", "F32", "values up to 3.5e+38 do not fit in F32 (largest 3.4028e+38)"),
])
def test_overflow_is_refused(value, source, target, shown):
    values = np.array([1.0, math.inf, math.nan, value, value / 2], dtype=NUMPY[source])
    with pytest.raises(SurgeryError) as info:
        dtypes.encode(values, target)
    assert shown in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("value,target,largest", [
    (65519.99, "F16", 65504.0), (3.3961e38 * (1 - 2**-20), "BF16", 3.3895313892515355e38),
    (3.4028235e38 * (1 + 2**-26), "F32", 3.4028234663852886e38),
])
def test_values_just_below_the_overflow_round_to_the_largest(value, target, largest):
    got = dtypes.decode(bytes(dtypes.encode(np.array([value, -value]), target)), target)
    assert got.tolist() == [largest, -largest]


def test_overflow_check_costs_nothing_without_large_values(monkeypatch):
    """The fast path: no per-element test unless some value exceeds the target's largest."""
    for name in ("isinf", "isfinite"):
        monkeypatch.setattr(np, name, lambda *a: pytest.fail("slow path taken"))
    dtypes.encode(np.array([1.0, -65504.0, math.nan]), "F16")
    dtypes.encode(np.array([], dtype=np.float32), "BF16")


def test_overflow_during_a_cast_names_the_tensor_and_writes_nothing(tmp_path):
    ckpt = source(tmp_path / "src", {"w": torch.tensor([1.0, 7e4, -3.0])})
    out = tmp_path / "out"
    plan = [OutputTensor("w", "F16", (3,), cast(ckpt, "w", "F16"))]
    with pytest.raises(SurgeryError, match="w: values up to 7e\\+04 do not fit in F16"):
        write_checkpoint(plan, out)
    assert not out.exists() or not any(out.iterdir())


# ----------------------------------------------------------------------------------------------- casts


@pytest.mark.parametrize("target", ["F16", "BF16", "F32"])
def test_cast_from_f64_rounds_once(tmp_path, monkeypatch, target):
    monkeypatch.setattr(values_module, "CHUNK_ELEMENTS", 1000)
    values = adversarial("F64", target)
    ckpt = source(tmp_path / "src", {"w": torch.from_numpy(values)})
    out = OutputTensor("w", target, values.shape, cast(ckpt, "w", target))
    write_checkpoint([out], tmp_path / "out")
    got = load_torch(tmp_path / "out")["w"].contiguous().view(torch.int16 if target != "F32" else torch.int32)
    expected = adversarial_bits("F64", target)
    assert np.array_equal(got.numpy().view(expected.dtype), expected)
