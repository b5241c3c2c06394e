"""The RDH baseline's hidden message: version, CRC-32 of the original and the (keyed)
perturbation code, hidden in the adversarial image and revealed from it alone.

:func:`hide_perturbation` embeds the perturbation ``d`` of ``x`` into ``x + d`` and checks
the result; :func:`recover_image` restores ``x`` bit for bit, or raises :class:`RDHError`
when the hidden data is damaged. Images that cannot carry the message at the method's
threshold use the wide-bin fallback (:data:`FALLBACK_THRESHOLD`).
"""

from __future__ import annotations

import zlib

import numpy as np

from raeg_pl.methods.rdh.coding import (
    BitReader,
    RDHError,
    decode_perturbation,
    encode_perturbation,
    uint_bits,
)
from raeg_pl.methods.rdh.pee import extract_bits, iter_embeddings

#: Version field of the hidden message (4 bits).
FORMAT_VERSION = 1
_VERSION_BITS = 4
_CRC_BITS = 32
#: Message bits besides the perturbation code: version and CRC-32.
HEADER_BITS = _VERSION_BITS + _CRC_BITS
#: Threshold of the fallback for images that cannot carry even an empty perturbation at the
#: method's own threshold (saturated, heavily textured ones): the empty perturbation is
#: hidden with these wide bins (up to 16 levels per layer) instead. Only images that cannot
#: carry it either are stored unchanged, i.e. near-noise ones. A protected image, even a
#: damaged one, never looks like that (its prediction errors are a few levels wide), so
#: damage is still reported instead of the image being taken for an unchanged one.
FALLBACK_THRESHOLD = 16
_FALLBACK_LAYERS = 2


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
    return np.concatenate([uint_bits(FORMAT_VERSION, _VERSION_BITS), uint_bits(crc, 32), code])


def _reveal_at(
    protected: np.ndarray, t: int, key: int | None, start: int
) -> tuple[np.ndarray, np.ndarray]:
    try:
        adv, bits = extract_bits(protected, t, start)
        reader = BitReader(bits)
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


def recovery_thresholds(t: int) -> tuple[int, ...]:
    """Thresholds :func:`recover_image` tries, in order: the method's, then the fallback."""
    return (t,) if t == FALLBACK_THRESHOLD else (t, FALLBACK_THRESHOLD)


def reveal_first(protected: np.ndarray, ts: tuple[int, ...], key: int | None) -> np.ndarray:
    """The original revealed with the first threshold of ``ts`` that works.

    Raises:
        RDHError: the first threshold's error, when none works.
    """
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
    ts = recovery_thresholds(t if recover_t is None else recover_t)
    adv = (x.astype(np.int16) + d).astype(np.uint8)
    message = _message(x, d.astype(np.int16), key)
    for marked, slots, _ in iter_embeddings(adv, message, t, max_layers):
        try:
            if np.array_equal(reveal_first(marked, ts, key), x):
                return marked, len(message), slots
        except RDHError:
            continue
    return None


def hide_fallback(image: np.ndarray, t: int, key: int | None) -> tuple[np.ndarray, int, int] | None:
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
        return reveal_first(protected, recovery_thresholds(t), key)
    except RDHError:
        if hide_fallback(protected, t, key) is None:
            return protected.copy()
        raise
