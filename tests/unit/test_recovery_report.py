"""Where a recovery's error sits (saturated pixels or the rest) and the report's authorised gap."""

from __future__ import annotations

import json
import math

import pytest
import torch

from raeg_pl.metrics.saturation import saturation_error
from raeg_pl.stages.report import authorized_gap, write_report


def test_saturation_error_splits_saturated_from_other_pixels() -> None:
    clean = torch.tensor([[[[0, 0, 255, 100], [0, 50, 200, 255]]]], dtype=torch.uint8)
    rec = clean.clone()
    rec[0, 0, 0, 0] = 4  # a saturated pixel 4 levels off
    rec[0, 0, 1, 0] = 2  # another, 2 levels off
    rec[0, 0, 1, 1] = 51  # an unsaturated one, 1 level off
    out = saturation_error(clean, rec)
    # 5 saturated pixels (0, 0, 255, 0, 255), 3 others.
    assert out["saturated_fraction"] == pytest.approx(5 / 8)
    assert out["mae_saturated"] == pytest.approx(6 / 5)
    assert out["mae_unsaturated"] == pytest.approx(1 / 3)
    assert out["mae_all"] == pytest.approx(7 / 8)
    mse = (16 + 4 + 1) / 8 / 255**2
    assert out["psnr_recovered"] == pytest.approx(10 * math.log10(1 / mse), rel=1e-5)
    mid = torch.full((1, 1, 2, 2), 128, dtype=torch.uint8)
    assert math.isnan(saturation_error(mid, mid)["mae_saturated"])
    with pytest.raises(ValueError, match="uint8"):
        saturation_error(clean.float(), rec)
    with pytest.raises(ValueError, match="one shape"):
        saturation_error(clean, rec[..., :2])


def test_authorized_gap() -> None:
    assert authorized_gap({"authorized_acc": 0.654, "clean_acc": 0.873}) == pytest.approx(-0.219)
    assert authorized_gap({"authorized_acc": 0.9, "clean_acc": 0.85}) == pytest.approx(0.05)
    assert authorized_gap({"authorized_acc": 0.9}) is None
    assert authorized_gap({"clean_acc": 0.9, "authorized_acc": None}) is None


def _results(authorized: float) -> dict:
    return {
        "profile": "quick",
        "adv_mode": "targeted",
        "psnr_protected": 33.0,
        "ssim_protected": 0.9,
        "linf_protected": 30.0,
        "psnr_recovered": 46.78,
        "exact_pixel_rate_recovered": 0.5,
        "surrogate_acc_clean": 0.9,
        "surrogate_acc_clean_train": 0.95,
        "surrogate_acc_protected_train": 0.1,
        "surrogate_acc_protected_by_defense": {"none": 0.1},
        "clean_acc": 0.873,
        "clean_acc_by_defense": {"none": 0.873},
        "pirate_acc_by_defense": {"none": 0.455},
        "pirate_acc_peak_by_defense": {"none": 0.5},
        "authorized_acc": authorized,
        "splits": {"test": 359, "protected_train": 1238},
        "curves": {"clean_none": [0.5, 0.873]},
    }


def test_report_states_the_authorised_gap_first(tmp_path) -> None:
    (tmp_path / "protector").mkdir()
    (tmp_path / "protector" / "results.json").write_text(json.dumps({"history": []}))
    report = write_report(tmp_path, _results(0.654)).read_text()
    headline = report.split("| metric |")[0]
    assert "Authorised gap: -21.9 points" in headline
    assert "65.4% against the clean-trained 87.3%" in headline and "46.78 dB" in headline
    assert "| authorised gap: authorised minus clean-trained (points) | -21.9 |" in report
