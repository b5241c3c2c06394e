"""Writes the legacy image-store fixtures of this folder (run once, kept as a record).

The files here were written by the raeg_pl of commit 8b5ddda, before the image store was
unified, with ``python tests/data/legacy/make_legacy_fixtures.py``; that commit's
``raeg_pl.io.protected.write_image_folder`` (pipeline exports, manifest without a
``format`` field) and ``raeg_pl.io.folder.protect_folder`` (owner folders,
``raeg-folder`` format version 1, zlib/bz2 residual sidecar). Later releases must keep
reading, verifying and restoring them bit for bit (``tests/unit/test_image_store.py``).
The script uses the API of that commit and is not expected to run against later code.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from raeg_pl.io.folder import protect_folder, restore_folder
from raeg_pl.io.keyfile import save_key
from raeg_pl.io.protected import load_export, write_image_folder
from raeg_pl.models.protector import InvertibleProtector

HERE = Path(__file__).resolve().parent


def main() -> None:
    torch.manual_seed(0)
    net = InvertibleProtector(levels=1, blocks_per_level=1, hidden_channels=4)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape) * 0.02)  # a few levels of change, like a trained key
    net.eval()
    for name in ("key.raegkey", "source", "owner_v1", "owner_v1.sidecar", "owner_v1_restored"):
        target = HERE / name
        if target.is_dir():
            shutil.rmtree(target)
        target.unlink(missing_ok=True)
    for name in ("pipeline_v0_protected", "pipeline_v0_recovered"):
        shutil.rmtree(HERE / name, ignore_errors=True)
    save_key(net, HERE / "key.raegkey")

    rng = np.random.default_rng(0)
    # Smooth images (a gradient plus a little noise), like photos rather than white noise.
    ramp = np.linspace(0, 200, 16)[None, :, None] + np.linspace(0, 40, 16)[:, None, None]
    arrays = [
        np.clip(ramp + rng.normal(0, 6, (16, 16, 3)) + 10 * k, 0, 255).astype(np.uint8)
        for k in range(3)
    ]
    src = HERE / "source"
    (src / "cat").mkdir(parents=True)
    (src / "dog").mkdir(parents=True)
    buf = io.BytesIO()
    Image.fromarray(arrays[0]).save(buf, format="JPEG", quality=90)
    (src / "cat" / "a.jpg").write_bytes(buf.getvalue())
    Image.fromarray(arrays[1]).save(src / "dog" / "b.png")
    alpha = rng.integers(0, 256, (16, 16), dtype=np.uint8)
    Image.fromarray(np.dstack([arrays[2], alpha])).save(src / "dog" / "c.png")

    protect_folder(net, src, HERE / "owner_v1", lossless=True, progress=False, batch_size=2)
    restore_folder(
        net,
        HERE / "owner_v1",
        HERE / "owner_v1_restored",
        sidecar_dir=HERE / "owner_v1.sidecar",
        progress=False,
    )

    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    labels = torch.tensor([0, 1, 1])
    classes, files = ["cat", "dog"], ["cat/a.jpg", "dog/b.png", "dog/c.png"]
    extra = {"protector_fingerprint": net.fingerprint(), "method": {"name": "raeg"}}
    write_image_folder(
        HERE / "pipeline_v0_protected",
        images,
        labels,
        classes,
        files,
        "protected",
        transform=net.forward,
        extra=extra,
        batch_size=2,
    )
    p_images, p_labels, _, rels, _ = load_export(HERE / "pipeline_v0_protected")
    write_image_folder(
        HERE / "pipeline_v0_recovered",
        p_images,
        p_labels,
        classes,
        [Path(r).relative_to("train").as_posix() for r in rels],
        "recovered",
        transform=net.inverse,
        extra=extra,
        batch_size=2,
    )


if __name__ == "__main__":
    main()
