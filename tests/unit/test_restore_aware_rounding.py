"""Restore-aware rounding: protected images whose restore lies closer to the originals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from raeg_pl.config import export_settings, load_grid_config, load_pipeline_config
from raeg_pl.io.apply import apply_protector, restore_aware_rounding
from raeg_pl.io.commands import main as commands_main
from raeg_pl.io.keyfile import save_key
from raeg_pl.io.manifest import read_manifest
from raeg_pl.io.protect import protect_folder
from raeg_pl.io.restore import restore_folder
from raeg_pl.models.protector import InvertibleProtector


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _protector(conditioned: bool = True, scale: float = 0.002) -> InvertibleProtector:
    """A non-identity protector whose restore after 8-bit storage is not exact."""
    torch.manual_seed(0)
    net = InvertibleProtector(3, 2, 2, 16, num_classes=3 if conditioned else 0).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return net


def _images(n: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    x[:, :, :8] = 0  # a saturated band, where clipping loses most
    return x


def _restore_mse(net, stored, x, labels) -> torch.Tensor:
    restored = apply_protector(net, stored, labels, inverse=True)
    return (restored.float() - x.float()).square().flatten(1).mean(1)


def test_zero_steps_is_plain_rounding_bit_for_bit() -> None:
    net, x, labels = _protector(), _images(), torch.tensor([0, 1, 2, 0, 1, 2])
    plain = apply_protector(net, x, labels)
    assert torch.equal(apply_protector(net, x, labels, refine_steps=0), plain)
    # The function itself, with 0 steps, is the 8-bit storage of the forward pass.
    with torch.no_grad():
        xf = x.float() / 255
        direct = restore_aware_rounding(lambda v: net(v, labels), None, xf, 0)
    assert torch.equal((direct * 255).round().to(torch.uint8), plain)


@pytest.mark.parametrize("conditioned", [True, False])
def test_no_image_restores_worse_and_the_mean_error_falls(conditioned) -> None:
    # Restores about 33-35 dB from the stored images: errors that clipping makes large.
    net, x = _protector(conditioned, 0.002 if conditioned else 0.004), _images()
    labels = torch.tensor([0, 1, 2, 0, 1, 2]) if conditioned else None
    plain = apply_protector(net, x, labels)
    refined = apply_protector(net, x, labels, refine_steps=5)
    assert refined.dtype == torch.uint8 and refined.shape == x.shape
    assert not torch.equal(refined, plain)
    before, after = _restore_mse(net, plain, x, labels), _restore_mse(net, refined, x, labels)
    assert (after <= before).all(), (before, after)
    assert after.mean() < 0.995 * before.mean(), (before, after)
    # The stored images stay as close to the originals as plain rounding's (within 2%).
    fid = [(s.float() - x.float()).square().mean() for s in (plain, refined)]
    assert abs(fid[1] - fid[0]) < 0.02 * fid[0]


def test_tiles_are_refined_as_their_own_bijections() -> None:
    net, labels = _protector(), torch.tensor([0, 1])
    x = _images(2)
    tiled = apply_protector(net, x, labels, refine_steps=3, tile=16)
    parts = torch.empty_like(x)
    for i in (0, 16):
        for j in (0, 16):
            part = x[..., i : i + 16, j : j + 16].contiguous()
            parts[..., i : i + 16, j : j + 16] = apply_protector(net, part, labels, refine_steps=3)
    assert torch.equal(tiled, parts)


def test_bad_requests_are_refused() -> None:
    net, x, labels = _protector(), _images(2), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="refine_steps must be >= 0"):
        apply_protector(net, x, labels, refine_steps=-1)
    with pytest.raises(ValueError, match="not to restoring"):
        apply_protector(net, x, labels, inverse=True, refine_steps=2)
    with pytest.raises(ValueError, match="needs a protector with an inverse"):
        apply_protector(lambda v: v, x, refine_steps=2)
    with pytest.raises(ValueError, match="labels"):
        apply_protector(net, x, None, refine_steps=2)


def test_protect_folder_records_the_setting_rewrites_on_change_and_stays_lossless(
    tmp_path,
) -> None:
    net = _protector()
    key = tmp_path / "k.raegkey"
    save_key(net, key, classes=["a", "b", "c"])
    src = tmp_path / "in"
    x = _images(6).numpy()
    for i, img in enumerate(x):
        (src / "abc"[i % 3]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.transpose(1, 2, 0)).save(src / "abc"[i % 3] / f"{i}.png")
    out = tmp_path / "out"
    plain = protect_folder(key, src, out, progress=False)
    assert plain.ok and len(plain.written) == 6
    first = {k: e["sha256"] for k, e in read_manifest(out)["files"].items()}
    refined = protect_folder(key, src, out, progress=False, refine_steps=4, lossless=True)
    # A different setting is not "already done": every file is written again.
    assert refined.ok and len(refined.written) == 6 and not refined.skipped
    files = read_manifest(out)["files"]
    assert {e["refine_steps"] for e in files.values()} == {4}
    assert any(first[k] != e["sha256"] for k, e in files.items())
    again = protect_folder(key, src, out, progress=False, refine_steps=4, lossless=True)
    assert len(again.skipped) == 6 and not again.written
    restored = restore_folder(key, out, tmp_path / "rest", progress=False)
    assert restored.ok and restored.exact == 6
    for i in range(6):
        back = np.asarray(Image.open(tmp_path / "rest" / "abc"[i % 3] / f"{i}.png"))
        assert np.array_equal(back.transpose(2, 0, 1), x[i])


def test_cli_refuses_a_negative_refine(tmp_path, capsys) -> None:
    save_key(_protector(False), tmp_path / "k.raegkey")
    (tmp_path / "in").mkdir()
    rc = commands_main(
        ["protect", "--key", str(tmp_path / "k.raegkey"), "--input", str(tmp_path / "in")]
        + ["--output", str(tmp_path / "o"), "--refine", "-2", "--no-progress"]
    )
    assert rc == 2
    assert "--refine must be >= 0" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_the_pipeline_export_section_is_checked_at_load(tmp_path) -> None:
    assert export_settings({}) == {"refine_steps": 0}
    assert export_settings({"export": {"refine_steps": 20}}) == {"refine_steps": 20}
    cfg = tmp_path / "p.yaml"
    for section, message in (
        ({"refine_steps": -1}, "export.refine_steps: expected an integer >= 0"),
        ({"refine_steps": 2.5}, "export.refine_steps: expected an integer >= 0"),
        ({"refine": 3}, r"export: unknown keys \['refine'\]"),
    ):
        cfg.write_text(json.dumps({"seed": 0, "export": section}))
        with pytest.raises(ValueError, match=message) as err:
            load_pipeline_config(cfg)
        assert str(cfg) in str(err.value)
    cfg.write_text(json.dumps({"seed": 0, "export": {"refine_steps": 3}}))
    assert load_pipeline_config(cfg)["export"] == {"refine_steps": 3}
    # A grid sets it per RAEG row instead.
    with pytest.raises(ValueError, match="refine_steps on its RAEG rows"):
        load_grid_config(cfg)


def test_the_raeg_method_refines_its_protected_images(tmp_path) -> None:
    from raeg_pl.methods import create_method

    net = _protector()
    key = tmp_path / "p.ckpt"  # the protector part of a ProtectorLitModule checkpoint
    torch.save(
        {
            "protector_config": net.config,
            "protector_fingerprint": net.fingerprint(),
            "state_dict": {f"protector.{k}": v for k, v in net.state_dict().items()},
        },
        key,
    )
    x, labels = _images(), torch.tensor([0, 1, 2, 0, 1, 2])
    plain = create_method({"kind": "raeg", "checkpoint": str(key)}, [], device="cpu")
    refined = create_method(
        {"kind": "raeg", "checkpoint": str(key), "refine_steps": 4}, [], device="cpu"
    )
    assert refined.config()["refine_steps"] == 4 and "refine_steps" not in plain.config()
    p, r = plain.protect(x, labels), refined.protect(x, labels)
    assert not torch.equal(p, r)
    err = [
        (m.recover(s, labels).float() - x.float()).square().mean()
        for m, s in ((plain, p), (refined, r))
    ]
    assert err[1] < err[0]
    with pytest.raises(ValueError, match="refine_steps must be >= 0"):
        create_method(
            {"kind": "raeg", "checkpoint": str(key), "refine_steps": -1}, [], device="cpu"
        )
