"""Loading surrogates: each call its own frozen network; a rewritten checkpoint is reread."""

from __future__ import annotations

import os

import pytest
import torch

from raeg_pl.lit.protector import load_surrogate
from raeg_pl.stages.check import build_classifier, save_classifier_checkpoint


def _save(path, seed: int):
    torch.manual_seed(seed)
    lit = build_classifier({"arch": "resnet_tiny_cifar"}, classes=3, channels=3)
    save_classifier_checkpoint(lit, path)
    return lit.model.state_dict()


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_each_load_is_a_frozen_copy_of_the_checkpoint(tmp_path):
    path = tmp_path / "surrogate.ckpt"
    saved = _save(path, seed=0)
    first, second = load_surrogate(path), load_surrogate(path)
    assert first is not second
    for net in (first, second):
        assert _equal(net.state_dict(), saved)
        assert not net.training and net.num_classes == 3
        assert not any(p.requires_grad for p in net.parameters())
    # A caller that changes its network changes nobody else's.
    with torch.no_grad():
        next(first.parameters()).add_(1.0)
    assert _equal(second.state_dict(), saved)
    assert _equal(load_surrogate(path).state_dict(), saved)


def test_a_rewritten_checkpoint_is_read_again(tmp_path):
    path = tmp_path / "surrogate.ckpt"
    _save(path, seed=0)
    before = load_surrogate(path)
    stat = path.stat()
    rewritten = _save(path, seed=1)
    # Same size; a modification time that differs from the first file's by 1 ns suffices.
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    after = load_surrogate(path)
    assert _equal(after.state_dict(), rewritten)
    assert not _equal(after.state_dict(), before.state_dict())


def test_a_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.ckpt: surrogate checkpoint not found"):
        load_surrogate(tmp_path / "missing.ckpt")
