"""Class labels of an owner's images, for label-conditioned keys, and their cross-checks.

A label-conditioned protector needs each image's class, by the key's class list. The owner
commands take it from the class folders of an ImageFolder input (``input/<class>/...``) or
from a CSV file for a flat folder (``relative_path,class`` lines; a class name or index).
Every label is recorded three ways, so that a change to one of them is caught:
the manifest entry's ``label``, the class folder the file lies in (ImageFolder inputs), and
a ``raeg:label`` text chunk inside the protected PNG (covered by its SHA-256).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from raeg_pl.io.manifest import FolderError

__all__ = ["LABELS_FROM_CSV", "LABELS_FROM_FOLDERS", "assign_labels", "label_problem"]

LABELS_FROM_FOLDERS = "class folders"
LABELS_FROM_CSV = "csv"
_SHOWN = 10


def _listing(names: Sequence[str]) -> str:
    more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more


def _class_name(value: Any, classes: Sequence[str], where: str) -> str:
    text = str(value).strip()
    if text in classes:
        return text
    if text.isdigit() and int(text) < len(classes):
        return classes[int(text)]
    raise FolderError(
        f"{where}: unknown class {text!r}; the key's classes are {list(classes)} "
        f"(or their indices 0..{len(classes) - 1})"
    )


def _read_csv(path: Path, classes: Sequence[str]) -> dict[str, str]:
    try:
        text = path.read_text()
    except OSError as e:
        raise FolderError(f"{path}: cannot read the labels file ({e})") from e
    table: dict[str, str] = {}
    for n, row in enumerate(csv.reader(text.splitlines()), start=1):
        if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
            continue
        if len(row) != 2:
            raise FolderError(f"{path}:{n}: expected 'relative_path,class', got {row}")
        rel, value = row[0].strip(), row[1].strip()
        if n == 1 and (rel, value) == ("relative_path", "class"):
            continue
        rel = PurePosixPath(rel.replace("\\", "/")).as_posix()
        name = _class_name(value, classes, f"{path}:{n}")
        if table.get(rel, name) != name:
            raise FolderError(f"{path}:{n}: {rel} is listed twice with different classes")
        table[rel] = name
    return table


def assign_labels(
    images: Sequence[str],
    classes: Sequence[str],
    labels: str | os.PathLike | Mapping[str, Any] | None,
    input_dir: Path,
) -> tuple[dict[str, str], str]:
    """Each input image's class name, for a label-conditioned key, or a refusal.

    Args:
        images: input images, relative POSIX paths.
        classes: the key's class names (label index order).
        labels: a CSV file of ``relative_path,class`` lines, a mapping of the same, or None
            to take the classes from the class folders (``<class>/...``).
        input_dir: the input folder (for messages).

    Returns:
        ({relative path: class name}, where the labels came from).

    Raises:
        FolderError: an image without a label (a flat folder without a labels file, a file
            missing from it), an unknown class or class folder, or a labels entry naming no
            input image; the message names them.
    """
    if labels is None:
        out, flat, unknown = {}, [], {}
        for rel in images:
            parts = PurePosixPath(rel).parts
            if len(parts) < 2:
                flat.append(rel)
            elif parts[0] not in classes:
                unknown.setdefault(parts[0], rel)
            else:
                out[rel] = parts[0]
        if unknown:
            raise FolderError(
                f"{input_dir}: unknown class folder(s) {sorted(unknown)} (e.g. "
                f"{_listing(sorted(unknown.values()))}); this key's classes are {list(classes)}"
            )
        if flat:
            raise FolderError(
                f"{input_dir}: this key is conditioned on class labels and "
                f"{len(flat)} image(s) lie outside any class folder ({_listing(flat)}); put them "
                "in <class>/ folders or pass --labels FILE.csv (relative_path,class lines)"
            )
        return out, LABELS_FROM_FOLDERS
    if isinstance(labels, Mapping):
        table = {
            PurePosixPath(str(k)).as_posix(): _class_name(v, classes, f"labels[{k!r}]")
            for k, v in labels.items()
        }
        where = "the labels given"
    else:
        table = _read_csv(Path(labels), classes)
        where = str(labels)
    missing = [rel for rel in images if rel not in table]
    if missing:
        raise FolderError(
            f"{where}: no label for {len(missing)} image(s) of {input_dir} ({_listing(missing)})"
        )
    stray = sorted(set(table) - set(images))
    if stray:
        raise FolderError(
            f"{where}: {len(stray)} labelled path(s) are not images of {input_dir} "
            f"({_listing(stray)})"
        )
    return {rel: table[rel] for rel in images}, LABELS_FROM_CSV


def label_problem(
    rel: str,
    entry: dict[str, Any],
    classes: Sequence[str],
    folder_level: int | None,
    embedded: str | None = None,
) -> str | None:
    """Why a file's label cannot be trusted (None when it can).

    Cross-checks the manifest entry's label against the key's classes, against the class
    folder ``rel`` lies in (its ``folder_level``-th path part, when the labels came from
    class folders) and against the label embedded in the file (when one was embedded).
    """
    label = entry.get("label")
    if label is None:
        return "the manifest gives no label for this file"
    if classes and label not in classes:
        return f"manifest label {label!r} is not one of the classes {list(classes)}"
    if folder_level is not None:
        parts = PurePosixPath(rel).parts
        folder = parts[folder_level] if len(parts) > folder_level + 1 else None
        if folder != label:
            return f"file lies in class folder {folder!r} but the manifest label is {label!r}"
    if entry.get("label_embedded") and embedded != label:
        return f"the label embedded in the file is {embedded!r}, the manifest says {label!r}"
    return None
