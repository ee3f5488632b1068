"""Random values that depend only on (seed, key): the same bits on every numpy version and every machine.

numpy promises stable streams for its bit generators and SeedSequence, but not for Generator distributions
(`standard_normal`, `uniform`), and transcendental functions (log, cos) may differ in the last bit across CPUs
and libm versions. So values are made here from PCG64's raw 64-bit words with IEEE-754 basic operations only
(+ - * /, sqrt: correctly rounded everywhere) and exact bit manipulation. No operation ever sees a subnormal, so
flush-to-zero modes cannot change a result either.

This module needs numpy and the standard library only, so tests can load it by path under other numpy versions.
"""

from __future__ import annotations

import hashlib

import numpy as np

#: candidate pairs per batch of the polar method: bounds its temporaries (~256 KiB each) and keeps them in cache.
#: Normals do not depend on it; a stream that mixes uniform and normal calls does.
BATCH_PAIRS = 1 << 14

_LN2 = 0.6931471805599453  # the double nearest ln 2, written out so that no libm is involved
_TWO_BITS = np.uint64(0x4000000000000000)  # 2.0: with 52 random mantissa bits, uniform in [2, 4)
_SQRT_HALF_BITS = np.uint64(0x3FE6A09E667F3BCD)  # the double nearest sqrt(1/2)
_REDUCE = np.uint64(0x3FF0000000000000) - _SQRT_HALF_BITS
_MANTISSA = np.uint64((1 << 52) - 1)
#: 1/19, 1/17, ..., 1/3, 1: atanh(t) / t as a polynomial in t*t; ten terms reach double precision for |t| <= 0.1716
_ATANH = tuple(1.0 / k for k in range(19, 0, -2))


def check_seed(seed: object) -> None:
    """Raise ValueError unless `seed` is an integer in [0, 2**64)."""
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an integer from 0 to 2**64 - 1, got {seed!r}")


class RandomStream:
    """An endless sequence of random values seeded by (seed, key), e.g. a tensor name.

    Each call returns the next values: how requests are split does not matter (normal(3) then normal(5) equals
    normal(8); the same for uniform).
    """

    def __init__(self, seed: int, key: str):
        check_seed(seed)
        words = np.frombuffer(hashlib.sha256(key.encode()).digest()[:16], dtype="<u4")
        self._bits = np.random.PCG64(np.random.SeedSequence([seed, *words.tolist()]))
        self._spare = np.empty(0)  # normals made but not yet returned

    def uniform(self, n: int) -> np.ndarray:
        """The next `n` values uniform in [0, 1) as float64: multiples of 2**-53, one raw word each."""
        words = self._bits.random_raw(n)
        words >>= np.uint64(11)
        values = words.view(np.int64).astype(np.float64)  # exact: below 2**53
        values *= 2.0**-53
        return values

    def normal(self, n: int) -> np.ndarray:
        """The next `n` standard normal values as float64."""
        out = np.empty(n)
        filled = 0
        while filled < n:
            if not self._spare.size:
                self._spare = self._polar_batch()
            take = min(n - filled, self._spare.size)
            out[filled:filled + take] = self._spare[:take]
            self._spare = self._spare[take:]
            filled += take
        return out

    def _polar_batch(self) -> np.ndarray:
        """Marsaglia's polar method on BATCH_PAIRS candidate pairs: two normals per accepted pair, in order."""
        words = self._bits.random_raw(2 * BATCH_PAIRS)
        words >>= np.uint64(12)
        words |= _TWO_BITS
        u = words.view(np.float64)  # uniform in [2, 4)
        u -= 3.0  # exact: uniform in [-1, 1), multiples of 2**-51
        squares = u * u
        s = squares[0::2] + squares[1::2]
        keep = np.flatnonzero((s > 0) & (s < 1))  # a kept s is at least 2**-102: never subnormal
        s = s[keep]
        pairs = u.reshape(-1, 2)[keep]
        pairs *= np.sqrt(-2.0 * _log(s) / s)[:, None]
        return pairs.reshape(-1)


def _log(s: np.ndarray) -> np.ndarray:
    """Natural log of positive normal doubles, within 2 ulp, by exact range reduction and the series of atanh.

    The bits of s are split (as in musl's log) into s = m * 2**k with m in [sqrt(1/2), sqrt(2)); then
    log(m) = 2 atanh(t) with t = (m - 1) / (m + 1), |t| <= 0.1716, and the series is evaluated by Horner's rule.
    """
    u = s.view(np.uint64) + _REDUCE
    k = (u >> np.uint64(52)).view(np.int64) - 1023
    m = ((u & _MANTISSA) + _SQRT_HALF_BITS).view(np.float64)
    t = (m - 1.0) / (m + 1.0)  # m - 1 is exact
    t2 = t * t
    series = t2 * _ATANH[0]
    for c in _ATANH[1:-1]:
        series += c
        series *= t2
    series += 1.0
    series *= t
    series *= 2.0
    series += k * _LN2
    return series
