"""The lossless sidecar's residual codec: what restore needs, beyond the protected image,
to give back the original 8-bit pixels bit for bit.

Restore computes ``values`` = 255 * clamp(G^-1(protected)) and rounds them; the residual
``original - quantised(values)`` is almost always 0 or +-1 for a protector that changes
images by a few levels, and larger where protection clipped at 0 or 255.

Rounding is only reproducible if restore gets exactly the same floats; on other hardware or
library versions they may differ in the last bits, which flips the rounding of values that
sit almost exactly on a ``k + 0.5`` boundary. So values within ``margin`` of a boundary are
listed by position and quantised with ``floor`` instead (which cannot flip there); every
other value is rounded, which cannot flip either as long as the floats differ by less than
``margin``. This floor rule is why the codec quantises with its own numpy rounding
(:func:`quantize_values`) instead of :mod:`raeg_pl.utils.quantize`: away from the listed
positions it is the same round-half-to-even of the same floats.

Format 2 (written now, magic ``RRS2``)::

    "RRS2"  codec (u8)  C H W  floor_count  escape_count  (uvarints)  margin (f32 LE)
    codec 2, WebP lossless: uvarint image length, the residual + 128 as an (H, W, C) 8-bit
             WebP lossless image (which predicts each pixel from its neighbours and
             decorrelates the channels), then a raw LZMA stream of the side data;
    codec 3, LZMA: one raw LZMA stream (lc=0) of the zigzag-coded residual as (C, H, W)
             bytes, then the side data.

The side data are uvarints: the floor positions as deltas of their flat (C, H, W) indices,
then the escapes (residuals outside the 8-bit image's range) as index deltas and zigzag
values. Each file keeps whichever codec is smaller. Format 1 (``RRS1``: a 29-byte header, then zlib
or bz2 of the zigzag residual as two byte planes and the floor positions as uint32 deltas;
raeg_pl 0.1 before format 2) is still decoded, and written on request (``codecs=(0, 1)``)
to compare sizes.
"""

from __future__ import annotations

import bz2
import io
import lzma
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, features

__all__ = [
    "LOSSLESS_MARGIN",
    "SIDECAR_INDEX",
    "SIDECAR_SUFFIX",
    "default_sidecar_dir",
    "SIDECAR_CODECS",
    "decode_residual",
    "encode_residual",
    "quantize_values",
    "residual_codec",
]

# Half-width, in 8-bit levels, of the band around each rounding boundary inside which the
# coder does not trust rounding to be reproducible.
LOSSLESS_MARGIN = 1.0 / 1024
SIDECAR_INDEX = "sidecar.json"
SIDECAR_SUFFIX = ".res"
SIDECAR_CODECS = {0: "zlib (format 1)", 1: "bz2 (format 1)", 2: "webp-lossless", 3: "lzma"}
_V1_MAGIC, _V2_MAGIC = b"RRS1", b"RRS2"
_V1_HEADER = struct.Struct("<4sBIIIdI")
_V1_CODECS = {0: zlib.decompress, 1: bz2.decompress}
_V1_COMPRESS = {0: lambda b: zlib.compress(b, 9), 1: lambda b: bz2.compress(b, 9)}
# lc=0: the literal coder's context is not the previous byte (the residual is near-white
# noise); a 1 MiB dictionary, as the residual has no long-range repeats and preset 9's
# 64 MiB costs ~0.1 s per call to set up. dict_size, lc, lp and pb are part of the format
# (decoding needs them); the preset only decides how hard the encoder searches.
_LZMA_FORMAT = {"id": lzma.FILTER_LZMA1, "dict_size": 1 << 20, "lc": 0, "lp": 0, "pb": 0}
# Above this many pixels the encoders' slow settings cost seconds per photo: WebP method 1
# and LZMA preset 0 instead of method 4 and preset 9e (on a 1536x1024 photo, ~3 s instead
# of ~10 s).
_LARGE_PIXELS = 1 << 18
_WEBP_MAX_SIDE = 16383


def default_sidecar_dir(output_dir: Path) -> Path:
    """Where protect puts a folder's sidecar by default: ``<output>.sidecar`` beside it."""
    return output_dir.with_name(output_dir.name + ".sidecar")


def quantize_values(values: np.ndarray, floor_at: np.ndarray | None = None) -> np.ndarray:
    """Rounds restore values to int16, with ``floor`` at the flat indices ``floor_at``."""
    q = np.round(values)
    if floor_at is not None and floor_at.size:
        flat = q.reshape(-1)
        flat[floor_at] = np.floor(values.reshape(-1)[floor_at])
    return q.astype(np.int16)


# ---------------------------------------------------------------------------- uvarints
def _uvarints(numbers: np.ndarray | list[int]) -> bytes:
    out = bytearray()
    for n in (int(v) for v in numbers):
        if n < 0:
            raise ValueError("uvarint of a negative number")
        while n >= 0x80:
            out.append((n & 0x7F) | 0x80)
            n >>= 7
        out.append(n)
    return bytes(out)


def _read_uvarints(data: bytes, count: int, pos: int = 0) -> tuple[list[int], int]:
    numbers = []
    for _ in range(count):
        n = shift = 0
        while True:
            if pos >= len(data):
                raise ValueError("residual side data cut short")
            b = data[pos]
            pos += 1
            n |= (b & 0x7F) << shift
            if b < 0x80:
                break
            shift += 7
        numbers.append(n)
    return numbers, pos


def _zigzag(r: np.ndarray) -> np.ndarray:
    r = r.astype(np.int32)
    return ((r << 1) ^ (r >> 31)).astype(np.int64)


def _unzigzag(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.int64)
    return (z >> 1) ^ -(z & 1)


def _side_data(floor_at: np.ndarray, esc_at: np.ndarray, esc_values: np.ndarray) -> bytes:
    return (
        _uvarints(np.diff(floor_at, prepend=0))
        + _uvarints(np.diff(esc_at, prepend=0))
        + _uvarints(_zigzag(esc_values))
    )


def _read_side_data(
    data: bytes, floor_count: int, esc_count: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    deltas, pos = _read_uvarints(data, floor_count)
    esc_deltas, pos = _read_uvarints(data, esc_count, pos)
    esc_z, pos = _read_uvarints(data, esc_count, pos)
    if pos != len(data):
        raise ValueError("residual side data has the wrong length")
    floor_at = np.cumsum(np.asarray(deltas, dtype=np.int64))
    esc_at = np.cumsum(np.asarray(esc_deltas, dtype=np.int64))
    return floor_at, esc_at, _unzigzag(np.asarray(esc_z, dtype=np.int64))


def _lzma(data: bytes, fast: bool = False) -> bytes:
    preset = 0 if fast else 9 | lzma.PRESET_EXTREME
    return lzma.compress(data, format=lzma.FORMAT_RAW, filters=[{**_LZMA_FORMAT, "preset": preset}])


def _unlzma(data: bytes) -> bytes:
    return lzma.decompress(data, format=lzma.FORMAT_RAW, filters=[_LZMA_FORMAT])


# ----------------------------------------------------------------------------- codecs
def _webp_body(residual: np.ndarray, side: bytes) -> bytes | None:
    c, h, w = residual.shape
    if c != 3 or max(h, w) > _WEBP_MAX_SIDE or not features.check("webp"):
        return None
    image = np.clip(residual + 128, 0, 255).astype(np.uint8).transpose(1, 2, 0)
    buf = io.BytesIO()
    # Method 4: on CIFAR-10 residuals method 6 is 4x slower for 0.1% smaller sidecars.
    method = 1 if h * w > _LARGE_PIXELS else 4
    Image.fromarray(np.ascontiguousarray(image), "RGB").save(
        buf, format="WEBP", lossless=True, quality=100, method=method, exact=True
    )
    packed = buf.getvalue()
    return _uvarints([len(packed)]) + packed + (_lzma(side) if side else b"")


def _lzma_body(residual: np.ndarray, side: bytes) -> bytes:
    planes = np.minimum(_zigzag(residual), 255).astype(np.uint8)
    return _lzma(planes.tobytes() + side, fast=residual[0].size > _LARGE_PIXELS)


def _encode_v1(
    residual: np.ndarray, floor_at: np.ndarray, margin: float, codecs: tuple[int, ...]
) -> bytes:
    """Format 1: zlib or bz2 of the zigzag residual's two byte planes and the floor deltas."""
    zigzag = ((residual << 1) ^ (residual >> 15)).view(np.uint16)
    deltas = np.diff(floor_at, prepend=0).astype("<u4")
    payload = (
        (zigzag & 0xFF).astype(np.uint8).tobytes()
        + (zigzag >> 8).astype(np.uint8).tobytes()
        + deltas.tobytes()
    )
    codec, packed = min(
        ((c, _V1_COMPRESS[c](payload)) for c in codecs), key=lambda item: len(item[1])
    )
    return _V1_HEADER.pack(_V1_MAGIC, codec, *residual.shape, margin, floor_at.size) + packed


def encode_residual(
    original: np.ndarray,
    values: np.ndarray,
    margin: float = LOSSLESS_MARGIN,
    codecs: tuple[int, ...] = (2, 3),
) -> bytes:
    """Codes the residual of ``original`` against its restore ``values`` (format 2).

    Args:
        original: (C, H, W) uint8 original pixels.
        values: (C, H, W) float32 restore values in [0, 255]
            (:func:`raeg_pl.io.apply.protector_values` of the protected image, inverse).
        margin: half-width of the untrusted band around rounding boundaries, in levels.
        codecs: the codec ids to try (2: WebP lossless, 3: LZMA; 0 and 1 write format 1
            with zlib or bz2, for comparisons); the smallest is kept.

    Returns:
        The sidecar file's bytes.
    """
    values = np.asarray(values, dtype=np.float32)
    original = np.asarray(original)
    if original.shape != values.shape or original.ndim != 3:
        raise ValueError(f"original {original.shape} and values {values.shape} differ")
    frac = values - np.floor(values)
    floor_at = np.flatnonzero(np.abs(frac - np.float32(0.5)) < margin).astype(np.int64)
    residual = original.astype(np.int16) - quantize_values(values, floor_at)
    if set(codecs) <= set(_V1_COMPRESS):
        return _encode_v1(residual, floor_at, margin, codecs)
    flat = residual.reshape(-1)
    bodies = []
    if 2 in codecs:
        esc_at = np.flatnonzero((flat < -128) | (flat > 127))
        body = _webp_body(residual, _side_data(floor_at, esc_at, flat[esc_at]))
        if body is not None:
            bodies.append((2, esc_at.size, body))
    if 3 in codecs or not bodies:  # LZMA is always available
        esc_at = np.flatnonzero(_zigzag(flat) >= 255)
        bodies.append(
            (3, esc_at.size, _lzma_body(residual, _side_data(floor_at, esc_at, flat[esc_at])))
        )
    codec, esc_count, body = min(bodies, key=lambda b: len(b[2]))
    header = (
        _V2_MAGIC
        + bytes([codec])
        + _uvarints([*original.shape, floor_at.size, esc_count])
        + struct.pack("<f", margin)
    )
    return header + body


def residual_codec(data: bytes) -> str:
    """The codec name of a sidecar file (for reports)."""
    if data.startswith(_V1_MAGIC) and len(data) >= _V1_HEADER.size:
        return SIDECAR_CODECS.get(data[4], f"unknown ({data[4]})")
    if data.startswith(_V2_MAGIC) and len(data) > 4:
        return SIDECAR_CODECS.get(data[4], f"unknown ({data[4]})")
    raise ValueError("not a RAEG residual file")


def _decode_v1(data: bytes, values: np.ndarray) -> np.ndarray:
    _, codec, c, h, w, _, floor_count = _V1_HEADER.unpack_from(data)
    shape = (c, h, w)
    if shape != tuple(values.shape):
        raise ValueError(f"residual is for shape {shape}, image is {tuple(values.shape)}")
    if codec not in _V1_CODECS:
        raise ValueError(f"unknown residual codec {codec}")
    payload = _V1_CODECS[codec](data[_V1_HEADER.size :])
    size = c * h * w
    if len(payload) != 2 * size + 4 * floor_count:
        raise ValueError("residual payload has the wrong length")
    planes = np.frombuffer(payload, np.uint8, count=2 * size)
    zigzag = planes[:size].astype(np.uint16) | (planes[size:].astype(np.uint16) << 8)
    residual = ((zigzag >> 1).astype(np.int16) ^ -(zigzag & 1).astype(np.int16)).reshape(shape)
    deltas = np.frombuffer(payload, "<u4", count=floor_count, offset=2 * size)
    floor_at = np.cumsum(deltas.astype(np.int64))
    return quantize_values(values, floor_at).astype(np.int32) + residual


def _decode_v2(data: bytes, values: np.ndarray) -> np.ndarray:
    codec = data[4]
    (c, h, w, floor_count, esc_count), pos = _read_uvarints(data, 5, 5)
    shape = (c, h, w)
    if shape != tuple(values.shape):
        raise ValueError(f"residual is for shape {shape}, image is {tuple(values.shape)}")
    pos += 4  # the margin: recorded for reference, the floor positions already carry it
    size = c * h * w
    if codec == 2:
        (length,), pos = _read_uvarints(data, 1, pos)
        with Image.open(io.BytesIO(data[pos : pos + length]), formats=["WEBP"]) as im:
            im.load()
            image = np.asarray(im.convert("RGB") if im.mode != "RGB" else im)
        if image.shape != (h, w, c):
            raise ValueError(f"residual image is {image.shape}, expected {(h, w, c)}")
        residual = image.transpose(2, 0, 1).astype(np.int32).reshape(-1) - 128
        tail = data[pos + length :]
        side = _unlzma(tail) if tail else b""
    elif codec == 3:
        payload = _unlzma(data[pos:])
        if len(payload) < size:
            raise ValueError("residual payload is too short")
        residual = _unzigzag(np.frombuffer(payload, np.uint8, count=size)).astype(np.int32)
        side = payload[size:]
    else:
        raise ValueError(f"unknown residual codec {codec}")
    floor_at, esc_at, esc_values = _read_side_data(side, floor_count, esc_count)
    if esc_at.size and (esc_at[-1] >= size or esc_at.min() < 0):
        raise ValueError("residual escape positions lie outside the image")
    residual[esc_at] = esc_values
    return quantize_values(values, floor_at).astype(np.int32) + residual.reshape(shape)


def decode_residual(data: bytes, values: np.ndarray) -> np.ndarray:
    """Inverse of :func:`encode_residual` (formats 1 and 2): the original uint8 pixels.

    Args:
        data: sidecar bytes.
        values: (C, H, W) float32 restore values of the protected image.

    Raises:
        ValueError: not a residual file, wrong shape, corrupt data, or a result outside
            0..255 (the values are not those the residual was made for).
    """
    values = np.asarray(values, dtype=np.float32)
    try:
        if data.startswith(_V1_MAGIC) and len(data) >= _V1_HEADER.size:
            out = _decode_v1(data, values)
        elif data.startswith(_V2_MAGIC) and len(data) > 9:
            out = _decode_v2(data, values)
        else:
            raise ValueError("not a RAEG residual file")
    except (lzma.LZMAError, zlib.error, OSError, EOFError, IndexError) as e:
        raise ValueError(f"corrupt residual file ({type(e).__name__}: {e})") from e
    if out.min() < 0 or out.max() > 255:
        raise ValueError("residual does not fit this image (restored values leave 0..255)")
    return out.astype(np.uint8)
