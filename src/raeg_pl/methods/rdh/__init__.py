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

Tamper evidence (the decision this package makes): recovery never returns a wrong image for
a normally protected image. Any altered value that touches the hidden message or the cover
raises :class:`RDHError` (the CRC-32 of the original fails, or the hidden structure breaks;
up to CRC collisions, 2**-32);
an altered value that only flipped an unused padding bit restores the exact original. For
the rare fallback images and for images stored unchanged, an alteration may go unnoticed:
the altered image is then returned as it is (so it differs from the original).

Modules: :mod:`~raeg_pl.methods.rdh.coding` (bit streams, the perturbation code, the location
map), :mod:`~raeg_pl.methods.rdh.pee` (prediction-error expansion: embedding and extraction),
:mod:`~raeg_pl.methods.rdh.message` (the hidden message: hiding, revealing, recovery) and
:mod:`~raeg_pl.methods.rdh.method` (the protection method).
"""

from raeg_pl.methods.rdh.coding import (
    RDHError,
    decode_perturbation,
    encode_perturbation,
    perturbation_code_length,
)
from raeg_pl.methods.rdh.message import (
    FALLBACK_THRESHOLD,
    HEADER_BITS,
    hide_perturbation,
    recover_image,
    reveal_perturbation,
)
from raeg_pl.methods.rdh.method import ReversibleDataHidingMethod
from raeg_pl.methods.rdh.pee import capacity_bits, embed_bits, extract_bits

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
