"""The run's key file: written after training, kept while it holds the protector, skipped
(with the reason) for the encoder-decoder protector that keys cannot hold."""

from __future__ import annotations

from pathlib import Path

import torch

from raeg_pl.io.keyfile import read_key
from raeg_pl.models.encdec import create_protector
from raeg_pl.stages.protector import KEY_FILE, write_owner_key

CLASSES = ["cat", "dog", "ship"]


def _checkpoint(path: Path, generator: str = "invertible", seed: int = 0) -> dict:
    """A protector checkpoint as the protector stage saves it, and that stage's results."""
    torch.manual_seed(seed)
    net = create_protector(generator, 3, 1, 1, 8, num_classes=len(CLASSES))
    with torch.no_grad():  # off the identity, so two seeds give two protectors
        for p in net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    torch.save(
        {
            "protector_config": net.config,
            "protector_fingerprint": net.fingerprint(),
            "state_dict": {f"protector.{k}": v for k, v in net.state_dict().items()},
        },
        path,
    )
    return {"protector_config": net.config, "protector_fingerprint": net.fingerprint()}


def test_key_is_written_kept_and_rewritten(tmp_path):
    results = _checkpoint(tmp_path / "a.ckpt")
    lines: list[str] = []
    rec = write_owner_key(tmp_path, tmp_path / "a.ckpt", results, CLASSES, say=lines.append)
    key = tmp_path / KEY_FILE
    assert rec == {
        "key_file": str(key),
        "key_fingerprint": results["protector_fingerprint"],
        "key_skipped": None,
    }
    loaded = read_key(key)
    assert loaded.fingerprint == results["protector_fingerprint"]
    assert list(loaded.classes) == CLASSES
    # The same protector again: the file is kept as it is.
    stamp = key.stat().st_mtime_ns
    assert write_owner_key(tmp_path, tmp_path / "a.ckpt", results, CLASSES, lines.append) == rec
    assert key.stat().st_mtime_ns == stamp and "kept" in lines[-1]
    # Another protector (or other class names) replaces it.
    other = _checkpoint(tmp_path / "b.ckpt", seed=1)
    assert other["protector_fingerprint"] != results["protector_fingerprint"]
    write_owner_key(tmp_path, tmp_path / "b.ckpt", other, CLASSES, lines.append)
    assert read_key(key).fingerprint == other["protector_fingerprint"]
    renamed = ["cat", "dog", "plane"]
    write_owner_key(tmp_path, tmp_path / "b.ckpt", other, renamed, lines.append)
    assert list(read_key(key).classes) == renamed


def test_encoder_decoder_protector_is_skipped_with_its_reason(tmp_path):
    results = _checkpoint(tmp_path / "e.ckpt", generator="encdec")
    lines: list[str] = []
    rec = write_owner_key(tmp_path, tmp_path / "e.ckpt", results, CLASSES, lines.append)
    assert rec["key_file"] is None and "not invertible" in rec["key_skipped"]
    assert not (tmp_path / KEY_FILE).exists()
    assert "not written" in lines[-1]
