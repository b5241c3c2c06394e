"""Reversible adversarial examples through reversible data hiding (RDH), a baseline.

In the spirit of Liu et al., "Reversible adversarial examples" (arXiv 1811.00189, 2018/2019):
an adversarial image ``A = x + d`` (``d`` an integer L-inf PGD perturbation against the
surrogates) is made reversible by hiding ``d`` losslessly *inside ``A`` itself* with a
reversible data hiding scheme. The protected image is ``P = Embed(A, code(d))``; an
authorised user computes ``Extract(P) = (A, code(d))`` and ``x = A - d``, bit for bit, from
``P`` alone (plus an optional key that scrambles the hidden perturbation).

Data hiding scheme: prediction-error expansion (Thodi & Rodriguez, IEEE TIP 2007) on a
checkerboard rhombus predictor (Sachnev et al., IEEE TCSVT 2009), a generalisation of
histogram shifting (Ni et al., IEEE TCSVT 2006): with threshold ``T`` (``T = 1`` is
histogram shifting of the prediction-error bins 0 and -1)

    e  = v - round(mean of the 4 neighbours of the other checkerboard colour)
    e' = 2 e + b      if -T <= e < T   (carries one bit b)
    e' = e + T        if e >= T        (shifted, carries nothing)
    e' = e - T        if e < -T

so every pixel moves by at most ``T`` levels (where the prediction is dark, below 128, the
error is mirrored, ``e = p - v``, so flat black areas carry bits as flat white ones do). One
*slot* is one checkerboard colour of one channel; slots are used in a fixed cyclic order
(channel 0 colour 1, channel 0 colour 0, channel 1 colour 1, ...), one pass over all of them
is a *layer*, and an image uses as many slots as its payload needs, up to ``max_layers``
layers. The extractor undoes the slots in the reverse order of embedding.

Overflow and underflow: before embedding a slot, its pixels within ``T`` of 0 or 255 are
moved ``T`` levels inwards, so no pixel can leave [0, 255]. A location map (one flag per
slot pixel whose pre-moved value is ambiguous, coded as Elias-gamma run lengths or, per
candidate value, enumeratively, whichever is shorter) travels at the head of the same
slot's bit stream, as in the classic schemes: the extractor reads a slot's bits without the
map, then uses the map to undo the move. Each slot stream also records how many slots right
before it could not carry even their own map (those are left untouched).

Bit stream: the slot embedded *last* is read first and holds the number of slots used. It is
channel 0 / colour 1 unless that slot is too full (then the next one of the cycle, and so
on; the extractor tries them in the same order and keeps the first whose checksum holds).
The hidden message is a 4-bit version, a CRC-32 of the original image ``x`` (so any
tampering, or a wrong key, is reported as :class:`RDHError` instead of returning a wrong
image), and the perturbation code: the positions of the non-zero values of ``d`` as
Rice-coded gaps, their signs, and their magnitudes (fixed width or unary, whichever is
shorter), scrambled by the key if there is one.

Capacity is what makes this baseline weak: a 32x32 CIFAR image carries a few hundred bits
per layer, far fewer than a dense 3072-value perturbation needs. The perturbation is
therefore sparsified: only the values with the largest accumulated surrogate gradient are
kept, as many as fit, and PGD is rerun on that support alone. ``stats`` reports the kept
fraction, payload and capacity.

Images that cannot carry even an empty perturbation (heavily textured, saturated ones;
about 0.25 % of CIFAR-10) get only the message without a perturbation, hidden with wide bins
(``FALLBACK_THRESHOLD``, up to 16 levels per layer). Images that cannot carry that either
(noise, 0/255 checkerboards, images of a few pixels) are stored unchanged; recovery
recognises them because they still cannot carry it. Recovery is therefore never lossy.

Tamper evidence (the decision this module makes): recovery never returns a wrong image for
a normally protected image. Any altered value that touches the hidden message or the cover
raises :class:`RDHError` (the CRC-32 of the original fails, or the hidden structure breaks;
up to CRC collisions, 2**-32);
an altered value that only flipped an unused padding bit restores the exact original. For
the rare fallback images and for images stored unchanged, an alteration may go unnoticed:
the altered image is then returned as it is (so it differs from the original).
"""

from __future__ import annotations

import functools
import math
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from raeg_pl.losses import label_permutation, targeted_labels
from raeg_pl.methods.base import ProtectionMethod, batches
from raeg_pl.methods.pgd import pgd_step_size
from raeg_pl.metrics import psnr_db

__all__ = [
    "FALLBACK_THRESHOLD",
    "HEADER_BITS",
    "RDHError",
    "ReversibleDataHidingMethod",
    "capacity_bits",
    "decode_perturbation",
    "embed_bits",
    "encode_perturbation",
    "extract_bits",
    "hide_perturbation",
    "perturbation_code_length",
    "recover_image",
    "reveal_perturbation",
]

#: Version field of the hidden message (4 bits).
FORMAT_VERSION = 1
_VERSION_BITS = 4
_CRC_BITS = 32
#: Message bits besides the perturbation code: version and CRC-32.
HEADER_BITS = _VERSION_BITS + _CRC_BITS
_RICE_BITS = 4
_MAX_THRESHOLD = 64
_MAX_LAYERS = 64
#: Threshold of the fallback for images that cannot carry even an empty perturbation at the
#: method's own threshold (saturated, heavily textured ones): the empty perturbation is
#: hidden with these wide bins (up to 16 levels per layer) instead. Only images that cannot
#: carry it either are stored unchanged, i.e. near-noise ones. A protected image, even a
#: damaged one, never looks like that (its prediction errors are a few levels wide), so
#: damage is still reported instead of the image being taken for an unchanged one.
FALLBACK_THRESHOLD = 16
_FALLBACK_LAYERS = 2
# Padding of unused slot capacity: fixed pseudo-random bits (any content would do; random
# bits keep the prediction-error histogram of a full slot like that of a real payload).
_PAD = np.random.default_rng(0x52444821).integers(0, 2, 1 << 16, dtype=np.uint8)


class RDHError(ValueError):
    """A protected image whose hidden data is damaged: tampered with, or a wrong key."""


# --------------------------------------------------------------------------- bit coding
def _uint_bits(values: np.ndarray | int, width: int) -> np.ndarray:
    """Big-endian ``width``-bit codes of non-negative integers, concatenated: (k * width,) 0/1."""
    values = np.atleast_1d(np.asarray(values, dtype=np.int64))
    if width == 0:
        return np.zeros(0, np.uint8)
    shifts = np.arange(width - 1, -1, -1, dtype=np.int64)
    return ((values[:, None] >> shifts) & 1).astype(np.uint8).ravel()


@functools.lru_cache(maxsize=4096)
def _gamma(m: int) -> np.ndarray:
    """Elias-gamma code of an integer ``m >= 1``: ``len - 1`` zeros, then ``m`` in binary."""
    n = int(m).bit_length()
    out = np.zeros(2 * n - 1, np.uint8)
    out[n - 1 :] = _uint_bits(m, n)
    out.flags.writeable = False  # cached and shared
    return out


def _gamma_len(m: int) -> int:
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


class _BitReader:
    """Sequential reader of a 0/1 ``uint8`` array; every overrun raises :class:`RDHError`."""

    def __init__(self, bits: np.ndarray) -> None:
        self.bits = bits
        self.pos = 0

    def take(self, n: int) -> np.ndarray:
        if n < 0 or self.pos + n > len(self.bits):
            raise RDHError("hidden bit stream ends early")
        out = self.bits[self.pos : self.pos + n]
        self.pos += n
        return out

    def uint(self, width: int) -> int:
        value = 0
        for b in self.take(width):
            value = (value << 1) | int(b)
        return value

    def uints(self, count: int, width: int) -> np.ndarray:
        if width == 0:
            return np.zeros(count, np.int64)
        block = self.take(count * width).reshape(count, width).astype(np.int64)
        return block @ (1 << np.arange(width - 1, -1, -1, dtype=np.int64))

    def gamma(self, limit: int = 1 << 40) -> int:
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
        if count == 0:
            return np.zeros(0, np.int64)
        zeros = np.flatnonzero(self.bits[self.pos :] == 0)[:count]
        if len(zeros) < count:
            raise RDHError("hidden bit stream ends early")
        q = np.diff(zeros, prepend=-1) - 1
        self.pos += int(zeros[-1]) + 1
        return q


# ---------------------------------------------------------------- perturbation coding
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
    n = _gamma_len(k + 1)
    if k == 0:
        return n
    m_max = int(magnitudes.max())
    gaps = np.diff(positions.astype(np.int64), prepend=-1) - 1
    fixed = k * (m_max - 1).bit_length()
    unary = int((m_max - magnitudes).sum()) + k
    return (
        n
        + _gamma_len(m_max)
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
    parts = [_gamma(k + 1)]
    if k:
        vals = d[pos].astype(np.int64)
        mags = np.abs(vals)
        m_max = int(mags.max())
        gaps = np.diff(pos.astype(np.int64), prepend=-1) - 1
        r = int(np.argmin(_rice_lengths(gaps)))
        width = (m_max - 1).bit_length()
        unary = int((m_max - mags).sum()) + k <= k * width
        parts += [
            _gamma(m_max),
            _uint_bits(r, _RICE_BITS),
            _unary(gaps >> r),
            _uint_bits(gaps & ((1 << r) - 1), r),
            (vals < 0).astype(np.uint8),
            np.array([unary], np.uint8),
            _unary(m_max - mags) if unary else _uint_bits(mags - 1, width),
        ]
    return np.concatenate(parts)


def decode_perturbation(reader: _BitReader | np.ndarray, n: int) -> np.ndarray:
    """Inverse of :func:`encode_perturbation`: (n,) int16 perturbation.

    Args:
        reader: the code (0/1 array) or a reader positioned at it.
        n: number of values of the flattened perturbation.

    Raises:
        RDHError: the code is malformed or does not fit ``n`` values.
    """
    if not isinstance(reader, _BitReader):
        reader = _BitReader(np.asarray(reader, np.uint8))
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


def _keystream(key: int | None, n: int) -> np.ndarray | None:
    if key is None or n == 0:
        return None
    return np.random.default_rng([int(key), 0x524448]).integers(0, 2, n, dtype=np.uint8)


def _message(x: np.ndarray, d: np.ndarray, key: int | None) -> np.ndarray:
    """Version, CRC-32 of the original ``x`` and the (key-scrambled) code of ``d``."""
    code = encode_perturbation(d)
    ks = _keystream(key, len(code))
    if ks is not None:
        code = code ^ ks
    crc = zlib.crc32(np.ascontiguousarray(x, np.uint8).tobytes())
    return np.concatenate([_uint_bits(FORMAT_VERSION, _VERSION_BITS), _uint_bits(crc, 32), code])


# ------------------------------------------------------------------- data hiding core
@dataclass(frozen=True)
class _Geometry:
    """Checkerboard slots of an (H, W) plane stored with a one-pixel zero border."""

    idx: tuple[np.ndarray, np.ndarray]  # flat padded indices of each colour (raster order)
    nbrs: tuple[np.ndarray, np.ndarray]  # (4, n) flat padded indices of their neighbours
    half: tuple[np.ndarray, np.ndarray]  # neighbour count // 2, for rounding (int32)
    scale: tuple[np.ndarray, np.ndarray]  # ceil(2**16 / neighbour count) (int32)


@functools.lru_cache(maxsize=32)
def _geometry(h: int, w: int) -> _Geometry:
    ii, jj = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    count = (ii > 0).astype(np.int32) + (ii < h - 1) + (jj > 0) + (jj < w - 1)
    idx, nbrs, half, scale = [], [], [], []
    for colour in (0, 1):
        # A pixel with no neighbour (a 1x1 plane) cannot be predicted: it carries nothing.
        sel = (((ii + jj) % 2) == colour) & (count > 0)
        flat = ((ii[sel] + 1) * (w + 2) + jj[sel] + 1).astype(np.intp)
        idx.append(flat)
        nbrs.append(np.stack([flat - (w + 2), flat + (w + 2), flat - 1, flat + 1]))
        half.append(count[sel] // 2)
        scale.append(-(-(1 << 16) // count[sel]))
    return _Geometry(tuple(idx), tuple(nbrs), tuple(half), tuple(scale))


def _slot_of(j: int, channels: int, start: int = 0) -> tuple[int, int]:
    """(channel, colour) of the slot at position ``j`` of the extraction order.

    The order cycles through channel 0 colour 1, channel 0 colour 0, channel 1 colour 1,
    ...; ``start`` shifts where it begins (the first slot must hold the slot count).
    """
    k = (start + j) % (2 * channels)
    return k // 2, 1 - (k % 2)


def _predict(flat: np.ndarray, geom: _Geometry, colour: int) -> np.ndarray:
    """Rounded mean of the in-image 4-neighbours (all of the other colour) of a slot.

    ``floor((s + n // 2) / n)`` for neighbour sum ``s <= 1020`` and count ``n`` in 1..4,
    computed as ``(s + n // 2) * ceil(2**16 / n) >> 16``, which is exact in that range.
    """
    s = flat[geom.nbrs[colour]].sum(axis=0, dtype=np.int32)
    return (((s + geom.half[colour]) * geom.scale[colour]) >> 16).astype(np.int16)


def _orientation(pred: np.ndarray) -> np.ndarray:
    """+1 or -1 per pixel: the prediction error is mirrored where the prediction is dark.

    The expanded bins ``[-T, T)`` are not symmetric; a pixel moved up off 0 in a black area
    has error ``+T`` and would never carry a bit, so dark pixels use ``-e`` (bins
    ``(-T, T]``), bright ones ``e``. The extractor sees the same predictions.
    """
    return np.where(pred < 128, -1, 1).astype(np.int16)


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
        return _gamma(k + 1)
    raw = np.unpackbits(np.frombuffer(rank.to_bytes((width + 7) // 8, "big"), np.uint8))
    return np.concatenate([_gamma(k + 1), raw[-width:]])


def _read_enumerative(reader: _BitReader, n: int) -> np.ndarray:
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


def _encode_map(flags: np.ndarray, values: np.ndarray) -> np.ndarray:
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
    enum = sum(_gamma_len(k + 1) + (math.comb(m, k) - 1).bit_length() for m, k in zip(sizes, ones))
    if rle <= enum:
        return np.concatenate([[1, 1], _gammas(runs)]).astype(np.uint8)
    parts = [_enumerative(grouped[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    return np.concatenate([[1, 0], *parts]).astype(np.uint8)


def _decode_map(reader: _BitReader, values: np.ndarray) -> np.ndarray:
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


def _candidates(moved: np.ndarray, t: int) -> np.ndarray | None:
    """Mask of values a move could have produced ([t, 2t) or (255 - 2t, 255 - t]), or None."""
    if moved.min(initial=255) >= 2 * t and moved.max(initial=0) <= 255 - 2 * t:
        return None  # the usual case: nothing near the ends
    return ((moved >= t) & (moved < 2 * t)) | ((moved > 255 - 2 * t) & (moved <= 255 - t))


def _premove(v: np.ndarray, t: int) -> tuple[np.ndarray, np.ndarray]:
    """Moves values within ``t`` of 0 or 255 inwards; returns (moved, location map bits)."""
    if v.min(initial=255) >= 2 * t and v.max(initial=0) <= 255 - 2 * t:
        return v, np.zeros(0, np.uint8)  # the usual case: nothing near the ends
    low, high = v < t, v > 255 - t
    moved = (v + t * low - t * high).astype(np.int16)
    cand = _candidates(moved, t)
    if cand is None:
        return moved, np.zeros(0, np.uint8)
    return moved, _encode_map((low | high)[cand], moved[cand])


def _embed_slots(
    cover: np.ndarray,
    message: np.ndarray,
    slots: int,
    t: int,
    start: int = 0,
    measure: bool = False,
) -> tuple[np.ndarray | None, int]:
    """Embeds ``message`` into the first ``slots`` slots (extraction order) of ``cover``.

    Slots are filled in embedding order (the reverse of extraction order); the last one
    filled (extraction position 0) also carries ``slots``. Returns ``(marked, spare)``:
    ``marked`` (C, H, W) uint8, or None when the message does not fit, and the number of
    spare bits (negative: the shortfall; None when the first extraction slot cannot hold
    even its head). With ``measure`` the message is ignored and ``spare`` is the capacity.
    """
    c, h, w = cover.shape
    geom = _geometry(h, w)
    img = np.zeros((c, h + 2, w + 2), np.int16)
    img[:, 1:-1, 1:-1] = cover
    flats = img.reshape(c, -1)
    pos, dead, total = 0, 0, 0
    for j in range(slots - 1, -1, -1):
        ch, colour = _slot_of(j, c, start)
        flat, idx = flats[ch], geom.idx[colour]
        pred = _predict(flat, geom, colour)
        moved, loc_map = _premove(flat[idx], t)
        sign = _orientation(pred)
        e = sign * (moved - pred)
        inner = (e >= -t) & (e < t)
        head = np.concatenate([_gamma(dead + 1), loc_map])
        if j == 0:
            head = np.concatenate([head, _gamma(slots)])
        room = int(np.count_nonzero(inner)) - len(head)
        if room < 0:
            if j == 0:  # the slot that must carry the slot count cannot: nothing fits
                return None, None
            dead += 1  # too small for its own map: left untouched, reported by the next one
            continue
        dead = 0
        total += room
        if measure:
            chunk = np.zeros(0, np.uint8)
        else:
            chunk = message[pos : pos + room]
            pos += len(chunk)
            if j == 0 and pos < len(message):
                return None, -(len(message) - pos)
        pad = room - len(chunk)
        if pad:
            fill = _PAD[:pad] if pad <= len(_PAD) else np.resize(_PAD, pad)
            chunk = np.concatenate([chunk, fill])
        bits = np.concatenate([head, chunk]).astype(np.int16)
        e2 = np.where(e >= t, e + t, e - t)
        e2[inner] = 2 * e[inner] + bits
        flat[idx] = pred + sign * e2
    marked = img[:, 1:-1, 1:-1].astype(np.uint8)
    return marked, total if measure else total - len(message)


def _slot_rooms(cover: np.ndarray, t: int) -> np.ndarray:
    """Rough data bits of each (channel, colour) slot of a first layer: (C, 2) int."""
    c, h, w = cover.shape
    geom = _geometry(h, w)
    img = np.zeros((c, h + 2, w + 2), np.int16)
    img[:, 1:-1, 1:-1] = cover
    rooms = np.zeros((c, 2), np.int64)
    for ch in range(c):
        flat = img[ch].ravel()
        for colour in (0, 1):
            moved, loc_map = _premove(flat[geom.idx[colour]], t)
            pred = _predict(flat, geom, colour)
            e = _orientation(pred) * (moved - pred)
            rooms[ch, colour] = np.count_nonzero((e >= -t) & (e < t)) - 1 - len(loc_map)
    return rooms


def capacity_bits(cover: np.ndarray, t: int = 1, max_layers: int = 4) -> int:
    """Message bits ``cover`` (C, H, W) uint8 can carry with all ``max_layers`` layers used.

    When the first extraction slot cannot hold the slot count after that many layers, the
    capacity with fewer layers, or with the next start slot, is reported instead (as
    :func:`embed_bits` would use them).
    """
    c = cover.shape[0]
    empty = np.zeros(0, np.uint8)
    for start in range(2 * c):
        for layers in range(max_layers, 0, -1):
            marked, cap = _embed_slots(cover, empty, 2 * c * layers, t, start, measure=True)
            if marked is not None:
                return cap
    return 0


def _embeddings(cover: np.ndarray, message: np.ndarray, t: int, max_layers: int):
    """Yields ``(marked, slots, start)`` for each start slot where ``message`` fits."""
    c = cover.shape[0]
    max_slots = 2 * c * max_layers
    rooms = np.maximum(_slot_rooms(cover, t), 0)
    need = len(message) + _gamma_len(max_slots)
    for start in range(2 * c):
        # Deeper layers hold less (their prediction errors are already spread): ~ x0.6.
        est = np.array(
            [rooms[_slot_of(j, c, start)] * 0.6 ** (j // (2 * c)) for j in range(max_slots)]
        )
        total = np.cumsum(est)
        slots = min(int(np.searchsorted(total, need)) + 1, max_slots)
        if need > 0.85 * total[-1]:
            slots = max_slots  # the estimate is rough: near capacity, try it all at once
        avg = max(1.0, 0.5 * float(est.mean()))
        tried = set()
        while True:
            tried.add(slots)
            marked, spare = _embed_slots(cover, message, slots, t, start)
            if marked is not None:
                yield marked, slots, start
                break
            if slots == max_slots:
                if spare is None:
                    # The first extraction slot could not hold its head after all the
                    # others; with fewer slots it is filled earlier: try those, most first.
                    for fewer in range(max_slots - 1, 0, -1):
                        if fewer in tried:
                            continue
                        marked, spare = _embed_slots(cover, message, fewer, t, start)
                        if marked is not None:
                            yield marked, fewer, start
                        if marked is not None or spare is not None:
                            break  # done, or short of room: fewer slots hold even less
                break
            step = 1 if spare is None else max(1, math.ceil(-spare / avg))
            slots = min(max_slots, slots + step)


def embed_bits(
    cover: np.ndarray, message: np.ndarray, t: int = 1, max_layers: int = 4
) -> tuple[np.ndarray, int, int] | None:
    """Hides ``message`` reversibly in ``cover`` with as few slots as it needs.

    Args:
        cover: (C, H, W) uint8 image.
        message: (L,) 0/1 uint8 bits.
        t: prediction-error expansion threshold (1 = histogram shifting), 1..64.
        max_layers: at most this many passes over all slots.

    Returns:
        ``(marked, slots, start)``: the (C, H, W) uint8 marked image (every value within
        ``t * layers`` of ``cover``), the number of slots used and the start slot that
        :func:`extract_bits` needs; None when the message does not fit.
    """
    return next(_embeddings(cover, message, t, max_layers), None)


def extract_bits(marked: np.ndarray, t: int = 1, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`embed_bits`: the exact cover and the hidden bits (plus padding).

    Args:
        marked: (C, H, W) uint8 image produced by :func:`embed_bits`.
        t: the threshold it was embedded with.
        start: the start slot it reported.

    Returns:
        ``(cover, bits)``: (C, H, W) uint8 and a 0/1 uint8 array starting with the message.

    Raises:
        RDHError: ``marked`` does not hold a consistent embedding.
    """
    c, h, w = marked.shape
    geom = _geometry(h, w)
    img = np.zeros((c, h + 2, w + 2), np.int16)
    img[:, 1:-1, 1:-1] = marked
    flats = img.reshape(c, -1)
    chunks, j, slots = [], 0, None
    while slots is None or j < slots:
        ch, colour = _slot_of(j, c, start)
        flat, idx = flats[ch], geom.idx[colour]
        pred = _predict(flat, geom, colour)
        sign = _orientation(pred)
        e2 = sign * (flat[idx] - pred)
        inner = (e2 >= -2 * t) & (e2 < 2 * t)
        bits = (e2[inner] & 1).astype(np.uint8)
        e = np.where(e2 >= 2 * t, e2 - t, e2 + t)
        e[inner] = e2[inner] >> 1
        moved = pred + sign * e
        if moved.min(initial=t) < t or moved.max(initial=255 - t) > 255 - t:
            raise RDHError("pixel values inconsistent with an embedding")
        reader = _BitReader(bits)
        dead = reader.gamma(limit=2 * c * _MAX_LAYERS) - 1
        cand = _candidates(moved, t)
        if cand is not None:
            flags = np.zeros(len(moved), bool)
            flags[cand] = _decode_map(reader, moved[cand])
            moved[flags] += np.where(moved[flags] < 128, -t, t).astype(np.int16)
        flat[idx] = moved
        if j == 0:
            slots = reader.gamma(limit=2 * c * _MAX_LAYERS)
        chunks.append(bits[reader.pos :])
        j += 1 + dead
    if j != slots:
        raise RDHError("inconsistent slot count in hidden data")
    return img[:, 1:-1, 1:-1].astype(np.uint8), np.concatenate(chunks[::-1])


def _reveal_at(
    protected: np.ndarray, t: int, key: int | None, start: int
) -> tuple[np.ndarray, np.ndarray]:
    try:
        adv, bits = extract_bits(protected, t, start)
        reader = _BitReader(bits)
        version = reader.uint(_VERSION_BITS)
        if version != FORMAT_VERSION:
            raise RDHError(f"unknown hidden data version {version}")
        crc = reader.uint(_CRC_BITS)
        rest = reader.bits[reader.pos :]
        ks = _keystream(key, len(rest))
        if ks is not None:
            rest = rest ^ ks
        d = decode_perturbation(rest, adv.size).reshape(adv.shape)
    except RDHError:
        raise
    except (IndexError, ValueError, OverflowError) as err:  # garbage read as structure
        raise RDHError(f"malformed hidden data: {err}") from err
    x = adv.astype(np.int16) - d
    if x.min() < 0 or x.max() > 255:
        raise RDHError("hidden perturbation does not match the image")
    x = x.astype(np.uint8)
    if zlib.crc32(x.tobytes()) != crc:
        raise RDHError("checksum mismatch: the protected image was altered or the key is wrong")
    return x, d


def reveal_perturbation(
    protected: np.ndarray, t: int = 1, key: int | None = None, with_perturbation: bool = False
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Restores the original (C, H, W) uint8 image from ``protected`` alone, bit for bit.

    Tries the start slots in order; the first whose hidden data passes the CRC-32 of the
    original wins (:func:`hide_perturbation` made sure that is the right one).

    Args:
        protected: (C, H, W) uint8 from :func:`hide_perturbation`.
        t: the threshold it was embedded with.
        key: the key it was embedded with.
        with_perturbation: also return the hidden (C, H, W) int16 perturbation ``d``.

    Returns:
        The original, or ``(original, d)``.

    Raises:
        RDHError: the hidden data is damaged (tampering, a wrong key or threshold, or an
            image that was never embedded).
    """
    first = None
    for start in range(2 * protected.shape[0]):
        try:
            x, d = _reveal_at(protected, t, key, start)
            return (x, d) if with_perturbation else x
        except RDHError as err:
            first = first or err
    raise first


def _thresholds(t: int) -> tuple[int, ...]:
    """Thresholds :func:`recover_image` tries, in order: the method's, then the fallback."""
    return (t,) if t == FALLBACK_THRESHOLD else (t, FALLBACK_THRESHOLD)


def _reveal_first(protected: np.ndarray, ts: tuple[int, ...], key: int | None) -> np.ndarray:
    first = None
    for t in ts:
        try:
            return reveal_perturbation(protected, t, key)
        except RDHError as err:
            first = first or err
    raise first


def hide_perturbation(
    x: np.ndarray,
    d: np.ndarray,
    t: int = 1,
    max_layers: int = 4,
    key: int | None = None,
    recover_t: int | None = None,
) -> tuple[np.ndarray, int, int] | None:
    """Embeds the perturbation ``d`` of ``x`` into ``A = x + d``.

    Every result is checked: :func:`recover_image` (with ``recover_t``) must return ``x``.

    Args:
        x: (C, H, W) uint8 original image.
        d: (C, H, W) integer perturbation with ``x + d`` in [0, 255].
        t, max_layers: see :func:`embed_bits`.
        key: optional seed scrambling the perturbation code (needed again to recover).
        recover_t: the threshold the recovering side will be given (default ``t``).

    Returns:
        ``(protected, message_bits, slots)`` or None when the message does not fit.
    """
    ts = _thresholds(t if recover_t is None else recover_t)
    adv = (x.astype(np.int16) + d).astype(np.uint8)
    message = _message(x, d.astype(np.int16), key)
    for marked, slots, _ in _embeddings(adv, message, t, max_layers):
        try:
            if np.array_equal(_reveal_first(marked, ts, key), x):
                return marked, len(message), slots
        except RDHError:
            continue
    return None


def _hide_empty(image: np.ndarray, t: int, key: int | None) -> tuple[np.ndarray, int, int] | None:
    """The fallback: an empty perturbation hidden with the wide threshold."""
    empty = np.zeros(image.shape, np.int16)
    return hide_perturbation(image, empty, FALLBACK_THRESHOLD, _FALLBACK_LAYERS, key, t)


def recover_image(protected: np.ndarray, t: int = 1, key: int | None = None) -> np.ndarray:
    """The original of one protected (C, H, W) uint8 image, bit for bit.

    Reads the hidden data with threshold ``t``, then with the fallback threshold; an image
    that cannot carry even the fallback's empty perturbation was stored unchanged and is
    returned as it is.

    Raises:
        RDHError: the image holds damaged hidden data (it was altered after protection),
            or ``t`` or ``key`` differ from protection.
    """
    try:
        return _reveal_first(protected, _thresholds(t), key)
    except RDHError:
        if _hide_empty(protected, t, key) is None:
            return protected.copy()
        raise


def _budget(capacity: int) -> int:
    """Perturbation-code bits to aim for in ``capacity``: the header and a small margin.

    Capacity is measured with padding bits; the real message moves later slots' prediction
    errors a little differently, so a code that fills the capacity exactly often misses.
    """
    return capacity - HEADER_BITS - 8 - capacity // 50


def _max_count(order: np.ndarray, flat: np.ndarray, budget: int, hi: int) -> int:
    """Largest ``k <= hi`` whose leading ``order`` values of ``flat`` code in ``budget`` bits.

    Returns -1 when not even the empty perturbation fits.
    """
    if perturbation_code_length(order[:0], order[:0]) > budget:
        return -1
    lo = 0
    while lo < hi:  # code length grows with k: bisect
        mid = (lo + hi + 1) // 2
        top = np.sort(order[:mid])
        if perturbation_code_length(top, np.abs(flat[top])) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


# ------------------------------------------------------------------------------ method
class ReversibleDataHidingMethod(ProtectionMethod):
    """Reversible adversarial examples: sparse PGD whose perturbation is hidden in the image.

    :meth:`protect`, per batch of images:

    1. L-inf PGD of ``steps`` signed steps on the surrogates' mean cross-entropy (away from
       the label, or toward ``perm[y]`` when ``targeted``), in 8-bit levels, rounded to an
       integer perturbation ``d`` with ``|d| <= floor(eps)``; the absolute gradients are
       summed over the steps as each value's saliency;
    2. per image, the ``k`` most salient non-zero values of ``d`` are kept, with ``k`` the
       largest whose code fits the hiding capacity of ``x + d_k`` (measured, iterated);
    3. PGD again from scratch for ``sparse_steps`` steps on that support only, then the
       kept perturbation is embedded (:func:`hide_perturbation`), dropping the least salient
       values until it fits.

    Protected images differ from ``x`` by at most ``floor(eps) + pee_threshold * layers``
    levels (fallback images, which carry no perturbation: ``FALLBACK_THRESHOLD * layers``).
    :meth:`recover` needs only the protected images (and ``key`` when one was used) and is
    exact, or raises :class:`RDHError` on damaged images: tamper evidence comes from the
    CRC-32 of the original carried in every image (see the module notes for its limits).

    Args:
        surrogates: frozen classifiers (logits from [0, 1] images); needed to protect.
        device: where the attack runs (hiding runs on the CPU with numpy).
        batch_size: images per attack batch.
        seed: seed of the random start and of the label permutation.
        eps: L-inf radius of the adversarial perturbation in 8-bit levels.
        steps: PGD steps of the dense attack (support selection).
        step_size: step in 8-bit levels; default ``2.5 * eps / steps``.
        sparse_steps: PGD steps on the kept support (default: ``steps``; 0 keeps the dense
            attack's values).
        targeted: push class ``c`` toward ``label_permutation(num_classes, seed)[c]``.
        num_classes: class count for ``targeted``; default the surrogates' ``num_classes``
            attribute, else the width of their logits.
        random_start: start the dense attack at a uniform point of the eps ball.
        pee_threshold: prediction-error expansion threshold ``T`` (1 = histogram shifting);
            larger holds more bits per layer at up to ``T`` levels of distortion per layer.
        max_layers: most passes of the data hiding over all slots.
        key: optional integer that scrambles the hidden perturbation; :meth:`recover` of a
            method with another key raises :class:`RDHError`.

    Attributes:
        stats: after :meth:`protect`, means over the images: ``kept_fraction`` (kept /
            non-zero values of the dense perturbation), ``kept_values``, ``payload_bits``
            (hidden message), ``capacity_bits`` (what the final image could carry with all
            layers), ``slots``, ``psnr_db``, ``linf``, and counts ``images``,
            ``fallback`` (message without perturbation, wide bins) and ``unembedded``
            (stored unchanged).
        per_image: per image (N,) tensors: ``kept_values``, ``dense_values``,
            ``kept_fraction``, ``payload_bits``, ``capacity_bits``, ``slots`` (float64),
            ``fallback`` and ``embedded`` (bool).
    """

    name = "rdh"
    reversible = True

    def __init__(
        self,
        surrogates: list[nn.Module] | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 256,
        seed: int = 0,
        eps: float = 6.0,
        steps: int = 10,
        step_size: float | None = None,
        sparse_steps: int | None = None,
        targeted: bool = False,
        num_classes: int | None = None,
        random_start: bool = False,
        pee_threshold: int = 2,
        max_layers: int = 2,
        key: int | None = None,
    ) -> None:
        super().__init__(surrogates=surrogates, device=device, batch_size=batch_size, seed=seed)
        step_size = pgd_step_size(eps, steps, step_size)
        if not 1 <= pee_threshold <= _MAX_THRESHOLD:
            raise ValueError(f"pee_threshold must be in [1, {_MAX_THRESHOLD}], got {pee_threshold}")
        if not 1 <= max_layers <= _MAX_LAYERS:
            raise ValueError(f"max_layers must be in [1, {_MAX_LAYERS}], got {max_layers}")
        self.eps = float(eps)
        self.steps = int(steps)
        self.step_size = step_size
        self.sparse_steps = self.steps if sparse_steps is None else int(sparse_steps)
        self.targeted = bool(targeted)
        self.random_start = bool(random_start)
        self.pee_threshold = int(pee_threshold)
        self.max_layers = int(max_layers)
        if key is not None and int(key) < 0:
            raise ValueError(f"key must be a non-negative integer, got {key}")
        self.key = None if key is None else int(key)
        self.num_classes = self.surrogate_num_classes(num_classes)
        self.stats: dict[str, float] = {}
        self.per_image: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ attack
    def _attack_labels(self, labels: torch.Tensor, models: list[nn.Module], probe) -> torch.Tensor:
        labels = labels.long()
        if not self.targeted:
            return labels
        if self.num_classes is None:
            with torch.no_grad():
                self.num_classes = int(models[0](probe[:1]).shape[1])
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"{self.name}: labels must lie in [0, {self.num_classes})")
        return targeted_labels(labels, label_permutation(self.num_classes, self.seed))

    def _pgd(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        models: list[nn.Module],
        steps: int,
        mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """L-inf PGD in 8-bit levels on the device.

        Args:
            images: (B, C, H, W) uint8.
            labels: (B,) int64 true labels.
            models: the surrogates.
            steps: number of signed gradient steps.
            mask: optional (B, C, H, W) bool support; values outside stay 0.
            generator: CPU generator of the random start (None: start at 0).

        Returns:
            ``(d, saliency)``: (B, C, H, W) int16 integer perturbation on the CPU with
            ``|d| <= floor(eps)`` and ``x + d`` in [0, 255], and the summed absolute gradients.
        """
        x0 = images.to(self.device).float()
        keep = None if mask is None else mask.to(self.device).float()
        delta = torch.zeros_like(x0)
        if generator is not None and self.eps > 0:
            noise = torch.rand(x0.shape, generator=generator).mul_(2).sub_(1).mul_(self.eps)
            delta = (x0 + noise.to(self.device)).clamp_(0, 255) - x0
        if keep is not None:
            delta = delta * keep
        x = x0 / 255.0
        y = self._attack_labels(labels, models, x).to(self.device)
        direction = -1.0 if self.targeted else 1.0
        saliency = torch.zeros_like(x0)
        for _ in range(steps):
            delta.requires_grad_(True)
            adv = (x0 + delta) / 255.0
            loss = sum(F.cross_entropy(m(adv).float(), y, reduction="sum") for m in models)
            (grad,) = torch.autograd.grad(loss / len(models), delta)
            with torch.no_grad():
                saliency += grad.abs()
                step = direction * self.step_size * grad.sign()
                delta = (delta + (step if keep is None else step * keep)).clamp_(
                    -self.eps, self.eps
                )
                delta = (x0 + delta).clamp_(0, 255) - x0
        levels = math.floor(self.eps + 1e-6)
        d = torch.round(delta.detach()).clamp_(-levels, levels)
        d = (x0 + d).clamp_(0, 255) - x0
        return d.to(torch.int16).cpu(), saliency.cpu()

    # ------------------------------------------------------------------ hiding
    def _fit_count(self, x: np.ndarray, d: np.ndarray, order: np.ndarray) -> tuple[int, int]:
        """Largest number of leading ``order`` values of ``d`` whose code fits ``x + d_k``.

        Capacity is measured on the image the code will live in; it falls as values are
        added (they spread the prediction errors), so measure, refit, and repeat.
        """
        flat = d.ravel()
        cap = self._capacity(x, flat, order, 0)
        k = _max_count(order, flat, _budget(cap), len(order))
        for _ in range(3):
            if k <= 0:
                break
            cap = self._capacity(x, flat, order, k)
            k_new = _max_count(order, flat, _budget(cap), k)
            if k_new >= k:
                break
            k = k_new
        return max(k, 0), cap

    def _capacity(self, x: np.ndarray, flat: np.ndarray, order: np.ndarray, k: int) -> int:
        """Hiding capacity of ``x`` plus the leading ``k`` values of ``order``."""
        sparse = np.zeros_like(flat)
        sparse[order[:k]] = flat[order[:k]]
        adv = (x.astype(np.int16) + sparse.reshape(x.shape)).astype(np.uint8)
        return capacity_bits(adv, self.pee_threshold, self.max_layers)

    def _hide(self, x: np.ndarray, d: np.ndarray, order: np.ndarray):
        """Embeds the leading values of ``order``, dropping the least salient until it fits.

        Returns ``(hide_perturbation result or None, values kept, fallback used)``.
        """
        flat = d.ravel()
        order = order[flat[order] != 0]
        k = len(order)
        while True:
            sparse = np.zeros_like(flat)
            sparse[order[:k]] = flat[order[:k]]
            out = hide_perturbation(
                x, sparse.reshape(x.shape), self.pee_threshold, self.max_layers, self.key
            )
            if out is not None:
                return out, k, False
            if k == 0:
                # Not even the empty perturbation fits: the fallback, or else unchanged.
                return _hide_empty(x, self.pee_threshold, self.key), 0, True
            # Refit to the capacity of the image as it is now, and always shrink.
            fit = _max_count(order, flat, _budget(self._capacity(x, flat, order, k)), k)
            k = max(0, min(fit, k - max(1, k // 20)))

    def protect(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Reversible adversarial copies of ``images``.

        Args:
            images: (N, C, H, W) uint8.
            labels: (N,) int64 true labels.

        Returns:
            (N, C, H, W) uint8 on the CPU; :meth:`recover` restores ``images`` exactly.
        """
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(
                f"expected (N, C, H, W) uint8 images, got {images.dtype} {tuple(images.shape)}"
            )
        if labels.dim() != 1 or len(labels) != len(images):
            raise ValueError(f"expected ({len(images)},) labels, got {tuple(labels.shape)}")
        models = self.frozen_surrogates() if len(images) else []
        generator = torch.Generator().manual_seed(self.seed) if self.random_start else None
        out = torch.empty_like(images, device="cpu")
        rec = {
            k: []
            for k in (
                "kept_values",
                "dense_values",
                "payload_bits",
                "capacity_bits",
                "slots",
                "fallback",
            )
        }
        for sl in batches(len(images), self.batch_size):
            x_b = images[sl].cpu()
            d_dense, saliency = self._pgd(x_b, labels[sl], models, self.steps, generator=generator)
            xs = x_b.numpy()
            masks = torch.zeros_like(x_b, dtype=torch.bool)
            orders, caps = [], []
            for i in range(len(xs)):
                di = d_dense[i].numpy()
                sal = saliency[i].numpy().ravel()
                nz = np.flatnonzero(di.ravel())
                order = nz[np.argsort(-sal[nz], kind="stable")]
                k, cap = self._fit_count(xs[i], di, order)
                masks[i].view(-1)[torch.from_numpy(order[:k])] = True
                orders.append(order)
                caps.append(cap)
                rec["dense_values"].append(len(nz))
            if self.sparse_steps > 0:
                d_sparse, _ = self._pgd(x_b, labels[sl], models, self.sparse_steps, mask=masks)
            else:
                d_sparse = torch.where(masks, d_dense, torch.zeros_like(d_dense))
            for i in range(len(xs)):
                di = d_sparse[i].numpy()
                support = orders[i][masks[i].view(-1).numpy()[orders[i]]]
                result, k, fallback = self._hide(xs[i], di, support)
                if result is None:
                    out[sl.start + i] = x_b[i]
                    self._check_unembeddable(xs[i])
                    bits, slots, k = 0, 0, 0
                else:
                    out[sl.start + i] = torch.from_numpy(result[0])
                    bits, slots = result[1], result[2]
                rec["kept_values"].append(k)
                rec["payload_bits"].append(bits)
                rec["capacity_bits"].append(caps[i])
                rec["slots"].append(slots)
                rec["fallback"].append(fallback and result is not None)
        self._record(images, out, rec)
        return out

    def _check_unembeddable(self, x: np.ndarray) -> None:
        """An unchanged image must not itself read as a valid protected image."""
        try:
            _reveal_first(x, _thresholds(self.pee_threshold), self.key)
        except RDHError:
            return
        raise RuntimeError(
            "an image that cannot carry hidden data reads as a protected image; "
            "it cannot be protected reversibly"
        )

    def _record(self, images: torch.Tensor, out: torch.Tensor, rec: dict[str, list]) -> None:
        per = {k: torch.tensor(v, dtype=torch.float64) for k, v in rec.items()}
        per["fallback"] = per["fallback"].bool()
        dense = per["dense_values"]
        per["kept_fraction"] = torch.where(dense > 0, per["kept_values"] / dense.clamp_min(1), 1.0)
        per["embedded"] = per["slots"] > 0
        self.per_image = per
        if len(images) == 0:
            self.stats = {"images": 0}
            return
        psnr = psnr_db(out, images).double()
        self.stats = {
            "images": len(images),
            "unembedded": int((~per["embedded"]).sum()),
            "fallback": int(per["fallback"].sum()),
            "kept_fraction": float(per["kept_fraction"].mean()),
            "kept_values": float(per["kept_values"].mean()),
            "dense_values": float(dense.mean()),
            "payload_bits": float(per["payload_bits"].mean()),
            "capacity_bits": float(per["capacity_bits"].mean()),
            "slots": float(per["slots"].mean()),
            "psnr_db": float(psnr.mean()),
            "linf": int((out.short() - images.short()).abs().max()),
        }

    # ------------------------------------------------------------------ recovery
    def recover(self, protected: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """The original images, bit for bit, from protected images alone.

        Needs the same ``pee_threshold`` and ``key`` as protection (:func:`recover_image`).
        An image that could not carry any hidden data was stored unchanged and is returned as
        it is. A damaged protected image raises (see the module notes for the rare cases
        where damage cannot be told from an image stored unchanged).

        Args:
            protected: (N, C, H, W) uint8 from :meth:`protect`.

        Returns:
            (N, C, H, W) uint8 originals.

        Raises:
            RDHError: an image was altered after protection, or the key differs.
        """
        if protected.dtype != torch.uint8 or protected.dim() != 4:
            raise ValueError(
                f"expected (N, C, H, W) uint8 images, got {protected.dtype} {tuple(protected.shape)}"
            )
        src = protected.cpu().numpy()
        out = np.empty_like(src)
        for i, p in enumerate(src):
            try:
                out[i] = recover_image(p, self.pee_threshold, self.key)
            except RDHError as err:
                raise RDHError(
                    f"image {i}: cannot recover: the protected image was altered, or the key "
                    f"or pee_threshold differ from protection ({err})"
                ) from err
        return torch.from_numpy(out)

    def config(self) -> dict[str, Any]:
        """Name, every parameter that determines the output, and the last ``stats``."""
        cfg = {
            "name": self.name,
            "eps": self.eps,
            "steps": self.steps,
            "step_size": self.step_size,
            "sparse_steps": self.sparse_steps,
            "targeted": self.targeted,
            "num_classes": self.num_classes,
            "random_start": self.random_start,
            "pee_threshold": self.pee_threshold,
            "max_layers": self.max_layers,
            "keyed": self.key is not None,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "num_surrogates": len(self.surrogates),
        }
        if self.stats:
            cfg["stats"] = dict(self.stats)
        return cfg
