"""Protector key files: the trained generator as one standalone file.

A key file is what a dataset owner keeps (and gives to authorised users) to protect and
restore image folders. It holds the network (and, for a label-conditioned protector, the
class names in training index order) and nothing else, so it loads without Lightning, the
training config or the surrogate classifier::

    torch.save({
        "format": "raeg-key",
        "version": 1,                      # 2 for a label-conditioned protector
        "config": net.config,              # InvertibleProtector(**config) rebuilds it
        "state_dict": net.state_dict(),
        "fingerprint": net.fingerprint(),  # SHA-256 of config + every tensor
        "classes": ["airplane", ...],      # version 2 only: label i is classes[i]
    })

Unconditioned keys stay version 1, so raeg_pl releases that predate conditioned keys keep
reading them; those releases refuse a version-2 key by its version instead of misusing it.

:func:`load_key` reads it with ``torch.load(weights_only=True)`` (no arbitrary pickles) and
checks the stored fingerprint against the rebuilt network, so a damaged or edited key is
refused instead of silently producing different images.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from raeg_pl.models.encdec import EncoderDecoderProtector, protector_from_config
from raeg_pl.models.protector import InvertibleProtector
from raeg_pl.utils.files import write_atomic

__all__ = [
    "KEY_FORMAT",
    "KEY_VERSION",
    "KEY_VERSION_CONDITIONED",
    "KeyFileError",
    "ProtectorKey",
    "export_key",
    "load_key",
    "read_key",
    "save_key",
]

KEY_FORMAT = "raeg-key"
KEY_VERSION = 1
KEY_VERSION_CONDITIONED = 2


class KeyFileError(ValueError):
    """A file is not a usable key file (or checkpoint); the message names the file."""


@dataclass(frozen=True)
class ProtectorKey:
    """A loaded key: the protector and, when it is label-conditioned, its class names.

    Attributes:
        net: the protector, eval mode, on CPU.
        classes: class names in label index order (``classes[i]`` is label ``i``); empty
            for an unconditioned protector.
        path: the key file it was read from.
    """

    net: InvertibleProtector
    classes: tuple[str, ...]
    path: Path

    @property
    def conditional(self) -> bool:
        """Whether the protector needs each image's class label."""
        return self.net.conditional

    @property
    def fingerprint(self) -> str:
        """The protector's fingerprint (SHA-256 of its config and weights)."""
        return self.net.fingerprint()


def _check_classes(net: InvertibleProtector, classes: Any, where: str) -> tuple[str, ...]:
    """The class names a key of ``net`` stores, checked against its label count."""
    if not net.conditional:
        return ()
    if classes is None:
        raise KeyFileError(
            f"{where}: the protector is conditioned on {net.num_classes} class labels but no "
            "class names were given (pass classes=[...] / --classes, in the training label "
            "order); a key must name its classes so folders can be labelled"
        )
    if isinstance(classes, str) or not isinstance(classes, Sequence):
        raise KeyFileError(f"{where}: classes must be a list of names, got {type(classes)}")
    names = tuple(str(c) for c in classes)
    if len(names) != net.num_classes:
        raise KeyFileError(
            f"{where}: the protector has {net.num_classes} classes but {len(names)} class "
            f"names were given ({list(names)[:12]})"
        )
    bad = [c for c in names if not c or c != c.strip() or "/" in c or "\\" in c]
    if bad or len(set(names)) != len(names):
        raise KeyFileError(
            f"{where}: class names must be distinct, non-empty folder names without slashes "
            f"or surrounding spaces, got {list(names)}"
        )
    return names


def key_blob(net: InvertibleProtector, classes: Sequence[str] | None = None) -> dict[str, Any]:
    """The key-file dict of a protector (tensors moved to CPU).

    A conditioned protector's key is version 2 and carries ``classes``; pass them here
    (a conditioned ``net`` without them gives a version-2 dict without classes, which
    :func:`load_key` refuses).
    """
    blob = {
        "format": KEY_FORMAT,
        "version": KEY_VERSION_CONDITIONED if net.conditional else KEY_VERSION,
        "config": net.config,
        "state_dict": {k: v.detach().cpu().clone() for k, v in net.state_dict().items()},
        "fingerprint": net.fingerprint(),
    }
    if net.conditional and classes is not None:
        blob["classes"] = [str(c) for c in classes]
    return blob


def save_key(
    net: InvertibleProtector,
    out_path: str | os.PathLike,
    classes: Sequence[str] | None = None,
) -> str:
    """Writes ``net`` as a key file, atomically (temporary file, then rename).

    Args:
        net: the protector to store.
        out_path: key file path (parent folders are created).
        classes: class names in label index order; required when ``net`` is
            label-conditioned (one per class), ignored otherwise.

    Returns:
        The network's fingerprint.

    Raises:
        KeyFileError: a conditioned ``net`` without matching class names.
    """
    names = _check_classes(net, classes, str(out_path))
    blob = key_blob(net, names or None)
    buf = io.BytesIO()
    torch.save(blob, buf)
    write_atomic(Path(out_path), buf.getvalue(), fsync=True)
    return blob["fingerprint"]


def _rebuild(config: Any, state_dict: Any, path: Path) -> InvertibleProtector:
    if not isinstance(config, dict) or not isinstance(state_dict, dict):
        raise KeyFileError(f"{path}: config or state_dict missing or malformed")
    try:
        net = InvertibleProtector(**config)
        net.load_state_dict(state_dict, strict=True)
    except (TypeError, ValueError, RuntimeError) as e:
        raise KeyFileError(f"{path}: the stored weights do not fit the stored config ({e})") from e
    return net.eval()


def _torch_load(path: Path, weights_only: bool) -> Any:
    if not path.is_file():
        raise KeyFileError(f"{path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as e:  # torch raises many types for non-torch or foreign pickles
        raise KeyFileError(f"{path}: not a RAEG key file ({type(e).__name__}: {e})") from e


def load_key(path: str | os.PathLike) -> InvertibleProtector:
    """Loads a key file as an :class:`InvertibleProtector` in eval mode, on CPU.

    Args:
        path: a file written by :func:`export_key` or :func:`save_key`.

    Returns:
        The protector; ``forward`` protects and ``inverse`` restores (B, 3, H, W) float
        images in [0, 1] of any size (a conditioned one also takes (B,) labels; its class
        names are in :func:`read_key`'s result).

    Raises:
        KeyFileError: the file is missing, is not a key file (a Lightning checkpoint, any
            other file), has an unknown version, or its fingerprint does not match its weights.
    """
    return read_key(path).net


def read_key(path: str | os.PathLike) -> ProtectorKey:
    """Loads a key file: the protector (eval mode, CPU) and its class names.

    Raises:
        KeyFileError: as :func:`load_key`; also a conditioned protector without valid class
            names, or a version that does not match whether the protector is conditioned.
    """
    path = Path(path)
    blob = _torch_load(path, weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != KEY_FORMAT:
        hint = ""
        if isinstance(blob, dict) and "protector_config" in blob:
            hint = " (this is a training checkpoint: convert it with `raeg export-key`)"
        raise KeyFileError(f"{path}: not a RAEG key file{hint}")
    version = blob.get("version")
    if version not in (KEY_VERSION, KEY_VERSION_CONDITIONED):
        raise KeyFileError(
            f"{path}: key file version {version!r} is not supported "
            f"(this raeg_pl reads versions {KEY_VERSION} and {KEY_VERSION_CONDITIONED})"
        )
    net = _rebuild(blob.get("config"), blob.get("state_dict"), path)
    if net.fingerprint() != blob.get("fingerprint"):
        raise KeyFileError(
            f"{path}: fingerprint mismatch, the key file is damaged or was edited "
            f"(stored {str(blob.get('fingerprint'))[:16]}..., weights give "
            f"{net.fingerprint()[:16]}...)"
        )
    if net.conditional != (version == KEY_VERSION_CONDITIONED):
        raise KeyFileError(
            f"{path}: key file version {version} does not match its protector, which is "
            f"{'' if net.conditional else 'not '}conditioned on class labels"
        )
    if net.conditional and "classes" not in blob:
        raise KeyFileError(
            f"{path}: this protector is conditioned on class labels but the key names no "
            "classes; re-export it with export_key(..., classes=[...])"
        )
    return ProtectorKey(net, _check_classes(net, blob.get("classes"), str(path)), path)


def _rebuild_any_generator(
    config: Any, state_dict: Any, path: Path
) -> InvertibleProtector | EncoderDecoderProtector:
    """Like :func:`_rebuild`, for whichever generator the config names (missing: invertible)."""
    if not isinstance(config, dict) or not isinstance(state_dict, dict):
        raise KeyFileError(f"{path}: config or state_dict missing or malformed")
    try:
        net = protector_from_config(config)
        net.load_state_dict(state_dict, strict=True)
    except (TypeError, ValueError, RuntimeError) as e:
        raise KeyFileError(f"{path}: the stored weights do not fit the stored config ({e})") from e
    return net.eval()


def _protector_from_checkpoint_blob(
    blob: dict[str, Any], path: Path, any_generator: bool = False
) -> InvertibleProtector | EncoderDecoderProtector:
    """The checkpoint's protector; only an invertible one unless ``any_generator``.

    Key files hold invertible protectors only (:func:`load_key` rebuilds
    ``InvertibleProtector(**config)``), so :func:`export_key` must refuse the encoder-decoder
    ablation baseline instead of writing a key that cannot be loaded.
    """
    state = {
        k[len("protector.") :]: v
        for k, v in blob["state_dict"].items()
        if k.startswith("protector.")
    }
    if not state:
        raise KeyFileError(f"{path}: checkpoint has no 'protector.*' weights")
    config = blob["protector_config"]
    if any_generator:
        net = _rebuild_any_generator(config, state, path)
    else:
        generator = config.get("generator", "invertible") if isinstance(config, dict) else None
        if generator not in (None, "invertible"):
            raise KeyFileError(
                f"{path}: the checkpoint's protector is the {generator!r} generator; key files "
                "hold invertible protectors only (load it with load_protector_checkpoint)"
            )
        net = _rebuild(config, state, path)
    stored = blob.get("protector_fingerprint")
    if stored is not None and stored != net.fingerprint():
        raise KeyFileError(f"{path}: checkpoint's protector_fingerprint does not match its weights")
    return net


def load_protector_checkpoint(
    path: str | os.PathLike,
) -> InvertibleProtector | EncoderDecoderProtector:
    """The protector (eval mode, CPU) of a ProtectorLitModule Lightning checkpoint.

    The checkpoint's ``protector_config`` names the network: an
    :class:`InvertibleProtector` when it has no ``"generator"`` entry (every checkpoint
    written before the encoder-decoder baseline existed) or ``"generator": "invertible"``,
    an :class:`EncoderDecoderProtector` for ``"generator": "encdec"``.

    Raises:
        KeyFileError: the file is not a protector checkpoint, names an unknown generator, or
            its stored fingerprint does not match its weights.
    """
    path = Path(path)
    blob = _torch_load(path, weights_only=False)
    if not (isinstance(blob, dict) and "protector_config" in blob and "state_dict" in blob):
        raise KeyFileError(f"{path}: not a protector checkpoint (no 'protector_config')")
    return _protector_from_checkpoint_blob(blob, path, any_generator=True)


def _checkpoint_classes(blob: dict[str, Any]) -> list[str] | None:
    """Class names a checkpoint carries, if any (top level or its saved hyperparameters)."""
    for holder in (blob, blob.get("hyper_parameters"), blob.get("datamodule_hyper_parameters")):
        if isinstance(holder, dict):
            for name in ("classes", "class_names"):
                if isinstance(holder.get(name), list | tuple):
                    return list(holder[name])
    return None


def export_key(
    checkpoint_path: str | os.PathLike,
    out_path: str | os.PathLike,
    classes: Sequence[str] | None = None,
) -> str:
    """Writes a standalone key file from a protector checkpoint.

    Args:
        checkpoint_path: a ProtectorLitModule Lightning checkpoint (``protector_config`` plus
            a ``state_dict`` whose protector weights are prefixed ``protector.``), or an
            existing key file (re-exported after verification).
        out_path: key file to write (atomically). Must differ from ``checkpoint_path``.
        classes: for a label-conditioned protector, the training data's class names in label
            index order (the class-folder names, sorted as ImageFolder sorts them). When
            omitted, the names the checkpoint or key carries are used; a conditioned protector
            with neither is refused. Ignored for an unconditioned protector.

    Returns:
        The fingerprint of the exported network.

    Raises:
        KeyFileError: the input is neither a protector checkpoint nor a key file, its stored
            fingerprint does not match its weights, it holds a protector keys cannot store
            (the encoder-decoder baseline), or it is conditioned and no class names are known.
    """
    src, out = Path(checkpoint_path), Path(out_path)
    if out.resolve() == src.resolve():
        raise KeyFileError(f"{out}: refusing to overwrite the input checkpoint with the key")
    # The owner's own training checkpoint may hold pickled hyperparameters, which
    # weights_only loading refuses; key files are always read with weights_only=True.
    blob = _torch_load(src, weights_only=False)
    if isinstance(blob, dict) and blob.get("format") == KEY_FORMAT:
        key = read_key(src)
        net, stored = key.net, list(key.classes) or None
    elif isinstance(blob, dict) and "protector_config" in blob and "state_dict" in blob:
        net, stored = _protector_from_checkpoint_blob(blob, src), _checkpoint_classes(blob)
    else:
        raise KeyFileError(
            f"{src}: neither a protector checkpoint (no 'protector_config') nor a RAEG key file"
        )
    names = _check_classes(net, classes if classes is not None else stored, str(src))
    return save_key(net, out, names or None)
