"""Protection methods behind one interface: RAEG and the baselines it is compared with.

``create_method({"kind": "pgd", "eps": 6}, surrogates)`` builds one from a config mapping;
the kinds are listed in :data:`METHODS`.
"""

from __future__ import annotations

import importlib

from raeg_pl.methods.base import ProtectionMethod

# kind -> "module:Class"; imported on use so a table that needs one method loads only it.
METHODS = {
    "raeg": "raeg_pl.methods.raeg:RAEGMethod",
    "pgd": "raeg_pl.methods.pgd:PGDMethod",
    "poison": "raeg_pl.methods.pgd:TargetedPoisonMethod",
    "unlearnable": "raeg_pl.methods.unlearnable:ErrorMinimizingNoiseMethod",
    "rdh": "raeg_pl.methods.rdh:ReversibleDataHidingMethod",
    "classwise_noise": "raeg_pl.methods.controls:ClasswiseNoiseMethod",
    "samplewise_noise": "raeg_pl.methods.controls:SamplewiseNoiseMethod",
    "ops": "raeg_pl.methods.controls:OnePixelShortcutMethod",
}


def create_method(spec: dict, surrogates=None, **common) -> ProtectionMethod:
    """A method from ``{"kind": name, **params}``; ``common`` holds device/batch_size/seed."""
    spec = dict(spec)
    kind = spec.pop("kind", None)
    if kind not in METHODS:
        raise ValueError(f"unknown protection method {kind!r}; known: {sorted(METHODS)}")
    module, cls = METHODS[kind].split(":")
    return getattr(importlib.import_module(module), cls)(surrogates=surrogates, **common, **spec)


__all__ = ["METHODS", "ProtectionMethod", "create_method"]
