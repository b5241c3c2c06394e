"""Prediction-error expansion on a checkerboard predictor: the RDH baseline's data hiding.

:func:`embed_bits` hides a bit string reversibly in a (C, H, W) uint8 image, slot by slot
(one checkerboard colour of one channel per slot), moving every pixel by at most ``t``
levels per layer; :func:`extract_bits` returns the exact cover and the bits. See
:mod:`raeg_pl.methods.rdh` for the scheme, its overflow handling and slot order.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from raeg_pl.methods.rdh.coding import (
    BitReader,
    RDHError,
    decode_location_map,
    encode_location_map,
    gamma_code,
    gamma_length,
)

#: Largest prediction-error expansion threshold (levels).
MAX_THRESHOLD = 64
#: Most layers (passes over all slots) an embedding may use.
MAX_LAYERS = 64
# Padding of unused slot capacity: fixed pseudo-random bits (any content would do; random
# bits keep the prediction-error histogram of a full slot like that of a real payload).
_PAD = np.random.default_rng(0x52444821).integers(0, 2, 1 << 16, dtype=np.uint8)


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
    return moved, encode_location_map((low | high)[cand], moved[cand])


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
        head = np.concatenate([gamma_code(dead + 1), loc_map])
        if j == 0:
            head = np.concatenate([head, gamma_code(slots)])
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


def iter_embeddings(cover: np.ndarray, message: np.ndarray, t: int, max_layers: int):
    """Yields ``(marked, slots, start)`` for each start slot where ``message`` fits."""
    c = cover.shape[0]
    max_slots = 2 * c * max_layers
    rooms = np.maximum(_slot_rooms(cover, t), 0)
    need = len(message) + gamma_length(max_slots)
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
    return next(iter_embeddings(cover, message, t, max_layers), None)


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
        reader = BitReader(bits)
        dead = reader.gamma(limit=2 * c * MAX_LAYERS) - 1
        cand = _candidates(moved, t)
        if cand is not None:
            flags = np.zeros(len(moved), bool)
            flags[cand] = decode_location_map(reader, moved[cand])
            moved[flags] += np.where(moved[flags] < 128, -t, t).astype(np.int16)
        flat[idx] = moved
        if j == 0:
            slots = reader.gamma(limit=2 * c * MAX_LAYERS)
        chunks.append(bits[reader.pos :])
        j += 1 + dead
    if j != slots:
        raise RDHError("inconsistent slot count in hidden data")
    return img[:, 1:-1, 1:-1].astype(np.uint8), np.concatenate(chunks[::-1])
