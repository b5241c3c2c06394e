"""Protector key files: the trained generator as one standalone file.

A key file is what a dataset owner keeps (and gives to authorised users) to protect and
restore image folders. It holds the network and nothing else, so it loads without Lightning,
the training config or the surrogate classifier::

    torch.save({
        "format": "raeg-key",
        "version": 1,
        "config": net.config,            # InvertibleProtector(**config) rebuilds it
        "state_dict": net.state_dict(),
        "fingerprint": net.fingerprint(),  # SHA-256 of config + every tensor
    })

:func:`load_key` reads it with ``torch.load(weights_only=True)`` (no arbitrary pickles) and
checks the stored fingerprint against the rebuilt network, so a damaged or edited key is
refused instead of silently producing different images.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import torch

from raeg_pl.models.encdec import EncoderDecoderProtector, protector_from_config
from raeg_pl.models.protector import InvertibleProtector
from raeg_pl.utils.files import write_atomic

__all__ = ["KEY_FORMAT", "KEY_VERSION", "KeyFileError", "export_key", "load_key", "save_key"]

KEY_FORMAT = "raeg-key"
KEY_VERSION = 1


class KeyFileError(ValueError):
    """A file is not a usable key file (or checkpoint); the message names the file."""


def key_blob(net: InvertibleProtector) -> dict[str, Any]:
    """The key-file dict of a protector (tensors moved to CPU)."""
    return {
        "format": KEY_FORMAT,
        "version": KEY_VERSION,
        "config": net.config,
        "state_dict": {k: v.detach().cpu().clone() for k, v in net.state_dict().items()},
        "fingerprint": net.fingerprint(),
    }


def save_key(net: InvertibleProtector, out_path: str | os.PathLike) -> str:
    """Writes ``net`` as a key file, atomically (temporary file, then rename).

    Args:
        net: the protector to store.
        out_path: key file path (parent folders are created).

    Returns:
        The network's fingerprint.
    """
    blob = key_blob(net)
    buf = io.BytesIO()
    torch.save(blob, buf)
    write_atomic(Path(out_path), buf.getvalue(), fsync=True)
    return blob["fingerprint"]


def _require_unconditioned(net: InvertibleProtector, path: Path) -> InvertibleProtector:
    if net.conditional:
        raise KeyFileError(
            f"{path}: this protector is conditioned on class labels; key files and the folder "
            "tools serve unlabelled folders and hold unconditioned protectors only (protect "
            "and restore a labelled dataset with the pipeline's export instead)"
        )
    return net


def _rebuild(config: Any, state_dict: Any, path: Path) -> InvertibleProtector:
    if not isinstance(config, dict) or not isinstance(state_dict, dict):
        raise KeyFileError(f"{path}: config or state_dict missing or malformed")
    try:
        net = InvertibleProtector(**config)
        net.load_state_dict(state_dict, strict=True)
    except (TypeError, ValueError, RuntimeError) as e:
        raise KeyFileError(f"{path}: the stored weights do not fit the stored config ({e})") from e
    return _require_unconditioned(net, path).eval()


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
        images in [0, 1] of any size.

    Raises:
        KeyFileError: the file is missing, is not a key file (a Lightning checkpoint, any
            other file), has an unknown version, or its fingerprint does not match its weights.
    """
    path = Path(path)
    blob = _torch_load(path, weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != KEY_FORMAT:
        hint = ""
        if isinstance(blob, dict) and "protector_config" in blob:
            hint = " (this is a training checkpoint: convert it with `raeg export-key`)"
        raise KeyFileError(f"{path}: not a RAEG key file{hint}")
    if blob.get("version") != KEY_VERSION:
        raise KeyFileError(
            f"{path}: key file version {blob.get('version')!r} is not supported "
            f"(this raeg_pl reads version {KEY_VERSION})"
        )
    net = _rebuild(blob.get("config"), blob.get("state_dict"), path)
    if net.fingerprint() != blob.get("fingerprint"):
        raise KeyFileError(
            f"{path}: fingerprint mismatch, the key file is damaged or was edited "
            f"(stored {str(blob.get('fingerprint'))[:16]}..., weights give "
            f"{net.fingerprint()[:16]}...)"
        )
    return net


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


def export_key(checkpoint_path: str | os.PathLike, out_path: str | os.PathLike) -> str:
    """Writes a standalone key file from a protector checkpoint.

    Args:
        checkpoint_path: a ProtectorLitModule Lightning checkpoint (``protector_config`` plus
            a ``state_dict`` whose protector weights are prefixed ``protector.``), or an
            existing key file (re-exported after verification).
        out_path: key file to write (atomically). Must differ from ``checkpoint_path``.

    Returns:
        The fingerprint of the exported network.

    Raises:
        KeyFileError: the input is neither a protector checkpoint nor a key file, or its
            stored fingerprint does not match its weights.
    """
    src, out = Path(checkpoint_path), Path(out_path)
    if out.resolve() == src.resolve():
        raise KeyFileError(f"{out}: refusing to overwrite the input checkpoint with the key")
    # The owner's own training checkpoint may hold pickled hyperparameters, which
    # weights_only loading refuses; key files are always read with weights_only=True.
    blob = _torch_load(src, weights_only=False)
    if isinstance(blob, dict) and blob.get("format") == KEY_FORMAT:
        net = load_key(src)
    elif isinstance(blob, dict) and "protector_config" in blob and "state_dict" in blob:
        net = _require_unconditioned(_protector_from_checkpoint_blob(blob, src), src)
    else:
        raise KeyFileError(
            f"{src}: neither a protector checkpoint (no 'protector_config') nor a RAEG key file"
        )
    return save_key(net, out)
