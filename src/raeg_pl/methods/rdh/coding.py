"""Bit-stream coding of the RDH baseline: integers, Elias-gamma and unary codes, the sparse
perturbation code and the location map of pre-moved pixels.

Everything here is lossless and self-delimiting given what the decoder already knows (the
number of values, the candidate pixels); a code that does not decode raises
:class:`RDHError`.
"""

from __future__ import annotations

import functools
import math

import numpy as np

_RICE_BITS = 4


class RDHError(ValueError):
    """A protected image whose hidden data is damaged: tampered with, or a wrong key."""


def uint_bits(values: np.ndarray | int, width: int) -> np.ndarray:
    """Big-endian ``width``-bit codes of non-negative integers, concatenated: (k * width,) 0/1."""
    values = np.atleast_1d(np.asarray(values, dtype=np.int64))
    if width == 0:
        return np.zeros(0, np.uint8)
    shifts = np.arange(width - 1, -1, -1, dtype=np.int64)
    return ((values[:, None] >> shifts) & 1).astype(np.uint8).ravel()


@functools.lru_cache(maxsize=4096)
def gamma_code(m: int) -> np.ndarray:
    """Elias-gamma code of an integer ``m >= 1``: ``len - 1`` zeros, then ``m`` in binary."""
    n = int(m).bit_length()
    out = np.zeros(2 * n - 1, np.uint8)
    out[n - 1 :] = uint_bits(m, n)
    out.flags.writeable = False  # cached and shared
    return out


def gamma_length(m: int) -> int:
    """Length in bits of :func:`gamma_code` of ``m >= 1``."""
    return 2 * int(m).bit_length() - 1


def _bit_lengths(values: np.ndarray) -> np.ndarray:
    """``int.bit_length`` of each value of a non-negative int64 array below 2**52."""
    return np.where(values > 0, np.frexp(values.astype(np.float64))[1], 0).astype(np.int64)


def _gammas(values: np.ndarray) -> np.ndarray:
    """Concatenated Elias-gamma codes of an array of integers >= 1 (vectorised)."""
    values = np.asarray(values, np.int64)
    n = _bit_lengths(values)
    lens = 2 * n - 1
    starts = np.cumsum(lens) - lens
    out = np.zeros(int(lens.sum()), np.uint8)
    b = np.arange(int(n.max(initial=1)))
    valid = b[None, :] < n[:, None]
    shift = np.maximum(n[:, None] - 1 - b[None, :], 0)
    where = starts[:, None] + n[:, None] - 1 + b[None, :]
    out[where[valid]] = ((values[:, None] >> shift) & 1)[valid]
    return out


def _unary(q: np.ndarray) -> np.ndarray:
    """Unary codes of non-negative integers: ``q`` ones then a zero each, concatenated."""
    q = np.asarray(q, dtype=np.int64)
    out = np.ones(int(q.sum()) + len(q), np.uint8)
    out[np.cumsum(q + 1) - 1] = 0
    return out


class BitReader:
    """Sequential reader of a 0/1 ``uint8`` array; every overrun raises :class:`RDHError`."""

    def __init__(self, bits: np.ndarray) -> None:
        self.bits = bits
        self.pos = 0

    def take(self, n: int) -> np.ndarray:
        """The next ``n`` bits, (n,) uint8."""
        if n < 0 or self.pos + n > len(self.bits):
            raise RDHError("hidden bit stream ends early")
        out = self.bits[self.pos : self.pos + n]
        self.pos += n
        return out

    def uint(self, width: int) -> int:
        """The next ``width`` bits as a big-endian unsigned integer."""
        value = 0
        for b in self.take(width):
            value = (value << 1) | int(b)
        return value

    def uints(self, count: int, width: int) -> np.ndarray:
        """The next ``count`` big-endian ``width``-bit integers, (count,) int64."""
        if width == 0:
            return np.zeros(count, np.int64)
        block = self.take(count * width).reshape(count, width).astype(np.int64)
        return block @ (1 << np.arange(width - 1, -1, -1, dtype=np.int64))

    def gamma(self, limit: int = 1 << 40) -> int:
        """The next Elias-gamma coded integer; raises if it exceeds ``limit``."""
        ones = np.flatnonzero(self.bits[self.pos : self.pos + 64])
        if len(ones) == 0:
            raise RDHError("invalid Elias-gamma code in hidden bit stream")
        zeros = int(ones[0])
        self.pos += zeros
        value = self.uint(zeros + 1)
        if value > limit:
            raise RDHError(f"hidden value {value} exceeds its bound {limit}")
        return value

    def unary(self, count: int) -> np.ndarray:
        """The next ``count`` unary codes (ones ended by a zero), (count,) int64."""
        if count == 0:
            return np.zeros(0, np.int64)
        zeros = np.flatnonzero(self.bits[self.pos :] == 0)[:count]
        if len(zeros) < count:
            raise RDHError("hidden bit stream ends early")
        q = np.diff(zeros, prepend=-1) - 1
        self.pos += int(zeros[-1]) + 1
        return q


def _rice_lengths(gaps: np.ndarray) -> np.ndarray:
    """Total Rice-code length of ``gaps`` for each parameter 0..15: (16,) int64."""
    r = np.arange(1 << _RICE_BITS, dtype=np.int64)
    return (gaps[None, :] >> r[:, None]).sum(axis=1) + len(gaps) * (1 + r)


def perturbation_code_length(positions: np.ndarray, magnitudes: np.ndarray) -> int:
    """Length in bits of :func:`encode_perturbation` for given non-zero values.

    Args:
        positions: (k,) int, sorted flat indices of the non-zero values.
        magnitudes: (k,) int >= 1, their absolute values in the same order.

    Returns:
        The code length in bits, equal to ``len(encode_perturbation(d))``.
    """
    k = len(positions)
    n = gamma_length(k + 1)
    if k == 0:
        return n
    m_max = int(magnitudes.max())
    gaps = np.diff(positions.astype(np.int64), prepend=-1) - 1
    fixed = k * (m_max - 1).bit_length()
    unary = int((m_max - magnitudes).sum()) + k
    return (
        n
        + gamma_length(m_max)
        + _RICE_BITS
        + int(_rice_lengths(gaps).min())
        + k
        + 1
        + min(fixed, unary)
    )


def encode_perturbation(d: np.ndarray) -> np.ndarray:
    """Lossless, compact code of a sparse integer perturbation.

    Layout: ``gamma(k + 1)`` (k non-zero values); if ``k > 0``: ``gamma(max |d|)``, a 4-bit
    Rice parameter ``r``, the unary quotients of the gaps between successive positions, their
    ``r`` low bits, ``k`` sign bits, a mode bit and the magnitudes (fixed width
    ``bitlen(max - 1)``, or unary in ``max - |d|``, whichever is shorter; PGD values sit
    mostly at the ball's edge, where unary costs one bit).

    Args:
        d: (n,) integer perturbation (flattened), values in [-255, 255].

    Returns:
        (L,) uint8 array of 0/1 bits.
    """
    d = np.asarray(d).ravel()
    pos = np.flatnonzero(d)
    k = len(pos)
    parts = [gamma_code(k + 1)]
    if k:
        vals = d[pos].astype(np.int64)
        mags = np.abs(vals)
        m_max = int(mags.max())
        gaps = np.diff(pos.astype(np.int64), prepend=-1) - 1
        r = int(np.argmin(_rice_lengths(gaps)))
        width = (m_max - 1).bit_length()
        unary = int((m_max - mags).sum()) + k <= k * width
        parts += [
            gamma_code(m_max),
            uint_bits(r, _RICE_BITS),
            _unary(gaps >> r),
            uint_bits(gaps & ((1 << r) - 1), r),
            (vals < 0).astype(np.uint8),
            np.array([unary], np.uint8),
            _unary(m_max - mags) if unary else uint_bits(mags - 1, width),
        ]
    return np.concatenate(parts)


def decode_perturbation(reader: BitReader | np.ndarray, n: int) -> np.ndarray:
    """Inverse of :func:`encode_perturbation`: (n,) int16 perturbation.

    Args:
        reader: the code (0/1 array) or a reader positioned at it.
        n: number of values of the flattened perturbation.

    Raises:
        RDHError: the code is malformed or does not fit ``n`` values.
    """
    if not isinstance(reader, BitReader):
        reader = BitReader(np.asarray(reader, np.uint8))
    d = np.zeros(n, np.int16)
    k = reader.gamma(limit=n + 1) - 1
    if k == 0:
        return d
    m_max = reader.gamma(limit=255)
    r = reader.uint(_RICE_BITS)
    gaps = (reader.unary(k) << r) | reader.uints(k, r)
    pos = np.cumsum(gaps + 1) - 1
    if pos[-1] >= n:
        raise RDHError("hidden perturbation position out of range")
    negative = reader.take(k).astype(bool)
    if reader.take(1)[0]:
        mags = m_max - reader.unary(k)
        if mags.min() < 1:
            raise RDHError("hidden perturbation magnitude out of range")
    else:
        mags = reader.uints(k, (m_max - 1).bit_length()) + 1
        if mags.max() > m_max:
            raise RDHError("hidden perturbation magnitude out of range")
    d[pos] = np.where(negative, -mags, mags)
    return d


def _enumerative(flags: np.ndarray) -> np.ndarray:
    """Enumerative code of a flag vector of known length n: ``gamma(k + 1)`` and its rank.

    The rank among the ``C(n, k)`` vectors with ``k`` ones (combinatorial number system,
    ``sum_i C(p_i, i + 1)`` over the sorted positions ``p_i`` of the ones) takes
    ``bitlen(C(n, k) - 1)`` bits, close to ``n * H(k / n)``: the best one can do for flags
    that look random, as in JPEG-noisy saturated areas.
    """
    n, ones = len(flags), np.flatnonzero(flags)
    k = len(ones)
    width = (math.comb(n, k) - 1).bit_length()
    rank = sum(math.comb(int(p), i + 1) for i, p in enumerate(ones))
    if width == 0:
        return gamma_code(k + 1)
    raw = np.unpackbits(np.frombuffer(rank.to_bytes((width + 7) // 8, "big"), np.uint8))
    return np.concatenate([gamma_code(k + 1), raw[-width:]])


def _read_enumerative(reader: BitReader, n: int) -> np.ndarray:
    k = reader.gamma(limit=n + 1) - 1
    total = math.comb(n, k)
    bits = reader.take((total - 1).bit_length())
    padded = np.concatenate([np.zeros(-len(bits) % 8, np.uint8), bits])
    rank = int.from_bytes(np.packbits(padded).tobytes(), "big")
    if rank >= total:
        raise RDHError("invalid location map")
    flags = np.zeros(n, bool)
    for pos in range(n - 1, -1, -1):
        if k == 0:
            break
        c = math.comb(pos, k)
        if rank >= c:
            flags[pos] = True
            rank -= c
            k -= 1
    return flags


def _map_groups(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Candidates grouped by their (moved) value, each value one context of the map.

    Returns the candidate indices sorted by value (stable) and the group boundaries in it.
    """
    order = np.argsort(values, kind="stable")
    cuts = np.flatnonzero(np.diff(values[order])) + 1
    return order, np.concatenate([[0], cuts, [len(values)]])


def encode_location_map(flags: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Location map of ``n`` candidate pixels (``n`` and ``values`` are known to the extractor).

    Nothing when ``n = 0``; ``0`` when no candidate was moved; else ``1``, a mode bit and
    either the run lengths of the flags in Elias-gamma (``1``; suits large clean saturated
    areas) or, for each candidate value in increasing order, the enumerative code of its
    flags (``0``; suits scattered flags), whichever is shorter.
    """
    n = len(flags)
    if n == 0:
        return np.zeros(0, np.uint8)
    if not flags.any():
        return np.zeros(1, np.uint8)
    edges = np.flatnonzero(flags[1:] != flags[:-1]) + 1
    runs = np.diff(np.concatenate([[0], edges, [n]]))
    if flags[0]:
        runs = np.concatenate([[0], runs])  # runs alternate starting with (possibly no) zeros
    runs[0] += 1  # the first run may be empty; gamma codes need >= 1
    rle = int((2 * _bit_lengths(runs) - 1).sum())
    order, bounds = _map_groups(values)
    grouped = flags[order]
    sizes = np.diff(bounds).tolist()
    ones = np.add.reduceat(grouped, bounds[:-1]).tolist()
    enum = sum(
        gamma_length(k + 1) + (math.comb(m, k) - 1).bit_length() for m, k in zip(sizes, ones)
    )
    if rle <= enum:
        return np.concatenate([[1, 1], _gammas(runs)]).astype(np.uint8)
    parts = [_enumerative(grouped[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    return np.concatenate([[1, 0], *parts]).astype(np.uint8)


def decode_location_map(reader: BitReader, values: np.ndarray) -> np.ndarray:
    """Inverse of :func:`encode_location_map`: (n,) bool flags of the ``n`` candidates."""
    n = len(values)
    flags = np.zeros(n, bool)
    if n == 0 or not reader.take(1)[0]:
        return flags
    if not reader.take(1)[0]:
        order, bounds = _map_groups(values)
        for a, b in zip(bounds[:-1], bounds[1:]):
            flags[order[a:b]] = _read_enumerative(reader, int(b - a))
        return flags
    total = reader.gamma(limit=n + 1) - 1
    value = True
    while total < n:
        run = reader.gamma(limit=n - total)
        flags[total : total + run] = value
        total += run
        value = not value
    return flags
