"""One implementation each of 8-bit rounding and PGD: the source tree holds no other copy.

The 8-bit storage step lives in :mod:`raeg_pl.utils.quantize` and the L-inf PGD loop in
:mod:`raeg_pl.attacks.pgd`. These tests parse every module of ``src/raeg_pl`` (so comments
and docstrings do not count) and fail on a new copy, naming the file and line.
"""

from __future__ import annotations

import ast
from fnmatch import fnmatch
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "raeg_pl"
QUANTIZE = "utils/quantize.py"
PGD = "attacks/pgd.py"
ROUNDING_CALLS = {"round", "round_", "rint", "around", "round_ste"}
NEAR = 2  # lines: ``v = x * 255`` then ``v.round()`` is still a copy

#: (file pattern relative to src/raeg_pl, text of the flagged line, why it is not a copy).
ROUNDING_ALLOWED = [
    (
        "defenses/ops.py",
        "return round_ste(out).clamp(0.0, 255.0)",
        "JPEG's own maths: the decoder rounds each 8x8 plane in [0, 255] levels (libjpeg)",
    ),
    (
        "defenses/ops.py",
        "coef = round_ste(coef / qt) * qt",
        "JPEG's quantisation of DCT coefficients by the table's steps, not of pixel levels",
    ),
    (
        "defenses/ops.py",
        "out = round_ste(out).clamp(0.0, 255.0)[..., :h, :w] / 255.0",
        "JPEG's own maths: libjpeg rounds its YCbCr -> RGB conversion, straight-through here",
    ),
    (
        "methods/rdh/method.py",
        "d = torch.round(delta.detach()).clamp_(-levels, levels)",
        "rounds a perturbation already in 8-bit levels to whole levels (the RDH code stores"
        " integers), ties to even on the perturbation, not on the pixel value",
    ),
    (
        "io/*.py",
        "grey = ((arr.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)",
        "16-bit to 8-bit conversion in the image reader: round(v * 255 / 65535) in integers",
    ),
]


def _is_255(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and type(node.value) in (int, float) and node.value == 255


def _call_name(node: ast.Call) -> str | None:
    f = node.func
    return f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None


def _is_uint8_cast(node: ast.Call) -> bool:
    """``.byte()``, or ``.to(...)`` / ``.astype(...)`` / ``.type(...)`` naming uint8."""
    name = _call_name(node)
    if name == "byte":
        return True
    args = [*node.args, *(k.value for k in node.keywords)]
    return name in ("to", "astype", "type") and any("uint8" in ast.unparse(a) for a in args)


def rounding_copies(source: str, filename: str = "<src>") -> list[int]:
    """Lines of ``source`` that round to 8 bits by hand.

    A rounding call (``round``, ``.round()``, ``np.rint``, ``round_ste``, ...) with the
    constant 255 in or within :data:`NEAR` lines of it, or a uint8 cast with a
    multiplication by 255 that near.
    """
    tree = ast.parse(source, filename)
    rounds, casts, consts, mults = [], [], [], []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            span = (node.lineno, node.end_lineno or node.lineno)
            if _call_name(node) in ROUNDING_CALLS:
                rounds.append(span)
            if _is_uint8_cast(node):
                casts.append(span)
        elif _is_255(node):
            consts.append(node.lineno)
        is_mult = isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult)
        if is_mult and (_is_255(node.left) or _is_255(node.right)):
            mults.append(node.lineno)

    def near(spans, lines):
        return {a for a, b in spans if any(a - NEAR <= ln <= b + NEAR for ln in lines)}

    return sorted(near(rounds, consts) | near(casts, mults))


def sign_calls(source: str, filename: str = "<src>") -> list[int]:
    """Lines of ``source`` calling ``.sign()`` / ``torch.sign`` (a PGD step, in this code)."""
    tree = ast.parse(source, filename)
    return sorted(
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and _call_name(node) in ("sign", "sgn")
    )


def modules() -> list[tuple[str, str]]:
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 20, f"found only {len(files)} modules under {SRC}"
    return [(p.relative_to(SRC).as_posix(), p.read_text()) for p in files]


def test_the_detectors_find_hand_written_copies():
    copies = [
        "q = torch.round(x.clamp(0, 1) * 255).to(torch.uint8)",
        "q = (x * 255.0).round() / 255.0",
        "v = x.clamp(0.0, 1.0) * 255\nmore = 1\nq = v.round_()",
        "q = np.rint(a * 255).astype(np.uint8)",
        "q = (x * 255 + 0.5).to(dtype=torch.uint8)",
        "q = (255 * x).byte()",
    ]
    for code in copies:
        assert rounding_copies(code), code
    fine = [
        "x = images.float() / 255",
        "n = round(h * factor)",
        "q = quantize_8bit(x)\ny = x.round()\n\n\n\nz = 255",
        '"""round(x * 255) in a docstring"""',
    ]
    for code in fine:
        assert not rounding_copies(code), code
    assert sign_calls("x = x + step * grad.sign()") == [1]
    assert sign_calls("s = torch.sign(g)") == [1]
    assert not sign_calls("sign = orientation(pred)")


def test_no_8bit_rounding_outside_the_quantize_module():
    assert all(len(reason) > 20 for _, _, reason in ROUNDING_ALLOWED), "give each a reason"
    found = []
    for rel, source in modules():
        if rel == QUANTIZE:
            assert rounding_copies(source, rel), "the detector must see the reference itself"
            continue
        lines = source.splitlines()
        for ln in rounding_copies(source, rel):
            text = lines[ln - 1].strip()
            if not any(fnmatch(rel, pat) and text == line for pat, line, _ in ROUNDING_ALLOWED):
                found.append(f"src/raeg_pl/{rel}:{ln}: {text}")
    assert not found, (
        "8-bit rounding written by hand; use raeg_pl.utils.quantize (to_uint8, quantize_8bit,"
        " quantize_ste, round_ste) or allow-list it with a reason:\n" + "\n".join(found)
    )


def test_one_pgd_loop():
    found = [
        f"src/raeg_pl/{rel}:{ln}: {source.splitlines()[ln - 1].strip()}"
        for rel, source in modules()
        if rel != PGD
        for ln in sign_calls(source, rel)
    ]
    assert not found, (
        "a signed-gradient step outside raeg_pl/attacks/pgd.py; call"
        " raeg_pl.attacks.pgd_linf instead:\n" + "\n".join(found)
    )
    assert sign_calls((SRC / PGD).read_text()), "pgd_linf must take the gradient's sign"
