"""Image defences: what a pirate applies before training, and what the protector simulates.

Each defence is a named, parameterised transformation of (B, C, H, W) float images in [0, 1]
with a differentiable form (training) and a real 8-bit form (evaluation); see
:mod:`raeg_pl.defenses.registry` for spec strings such as ``"jpeg:q=10"`` and
:mod:`raeg_pl.defenses.ops` for the underlying pure functions.
"""

from raeg_pl.defenses import ops
from raeg_pl.defenses.ops import quantize_8bit, round_ste
from raeg_pl.defenses.registry import (
    Defense,
    DefenseCurriculum,
    DefenseInfo,
    Param,
    describe_defenses,
    get_defense,
    get_defense_info,
    list_defenses,
    parse_spec,
    register_defense,
    unregister_defense,
)

__all__ = [
    "Defense",
    "DefenseCurriculum",
    "DefenseInfo",
    "Param",
    "describe_defenses",
    "get_defense",
    "get_defense_info",
    "list_defenses",
    "ops",
    "parse_spec",
    "quantize_8bit",
    "register_defense",
    "round_ste",
    "unregister_defense",
]
