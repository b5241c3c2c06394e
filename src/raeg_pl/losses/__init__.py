"""Loss terms of the RAEG objective, as pure functions of tensors, and the PSNR controller."""

from raeg_pl.losses.adversarial import (
    class_margin,
    keep_classifiable_loss,
    label_permutation,
    targeted_adversarial_loss,
    targeted_labels,
    untargeted_adversarial_loss,
)
from raeg_pl.losses.controller import PSNRController
from raeg_pl.losses.fidelity import (
    RANGE_LOSSES,
    fidelity_loss,
    lost_to_storage,
    out_of_range_penalty,
    psnr,
    quantize_ste,
    range_hinge_penalty,
    range_penalty,
    recovery_loss,
)

__all__ = [
    "RANGE_LOSSES",
    "PSNRController",
    "class_margin",
    "fidelity_loss",
    "keep_classifiable_loss",
    "label_permutation",
    "lost_to_storage",
    "out_of_range_penalty",
    "psnr",
    "quantize_ste",
    "range_hinge_penalty",
    "range_penalty",
    "recovery_loss",
    "targeted_adversarial_loss",
    "targeted_labels",
    "untargeted_adversarial_loss",
]
