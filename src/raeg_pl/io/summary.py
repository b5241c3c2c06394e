"""The outcome of an owner command (protect, restore, verify), as data and as a report."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["FolderSummary"]


@dataclass
class FolderSummary:
    """Outcome of one protect / restore / verify call.

    Paths are relative to the folder named in ``input_dir`` (inputs, and for restore and
    verify the protected or checked files).
    """

    kind: str
    input_dir: str
    output_dir: str | None = None
    sidecar_dir: str | None = None
    total: int = 0
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    ok_files: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    modified: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    tampered: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    removed_temp_files: int = 0
    exact: int | None = None
    sidecar_bytes: int | None = None
    sidecar_bits_per_pixel: float | None = None
    seconds: float = 0.0
    images_per_s: float = 0.0
    manifest: str | None = None

    @property
    def ok(self) -> bool:
        """True when nothing failed, and no file was missing, modified, extra or tampered."""
        return not (self.failed or self.missing or self.modified or self.extra or self.tampered)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}

    def report(self, limit: int = 50) -> str:
        """Human-readable summary; lists are cut at ``limit`` names each."""
        lines = [
            f"{self.kind}: {self.input_dir}" + (f" -> {self.output_dir}" if self.output_dir else "")
        ]
        counts = [f"{self.total} images"]
        if self.kind in ("protect", "restore"):
            counts += [f"{len(self.written)} written", f"{len(self.skipped)} already done"]
        else:
            counts.append(f"{len(self.ok_files)} ok")
        counts += [
            f"{len(self.failed)} failed",
            f"{len(self.missing)} missing",
            f"{len(self.modified)} modified",
            f"{len(self.extra)} extra",
        ]
        if self.tampered:
            counts.append(f"{len(self.tampered)} tampered")
        lines.append("  " + ", ".join(counts))
        if self.written:
            lines.append(f"  {self.images_per_s:.1f} img/s ({self.seconds:.1f} s)")
        if self.exact is not None:
            lines.append(f"  {self.exact} restored bit-exact (pixel hash = source pixel hash)")
        if self.sidecar_bits_per_pixel is not None:
            lines.append(
                f"  lossless sidecar: {self.sidecar_bytes} bytes, "
                f"{self.sidecar_bits_per_pixel:.3f} bits/pixel ({self.sidecar_dir})"
            )
        for note in self.notes:
            lines.append(f"  note: {note}")
        if self.ignored:
            lines.append(f"  {len(self.ignored)} non-image files ignored")
        if self.removed_temp_files:
            lines.append(f"  removed {self.removed_temp_files} temporary files of an earlier run")

        def block(title: str, names: list[str], reasons: dict[str, str] | None = None) -> None:
            if not names:
                return
            lines.append(f"  {title}:")
            for name in names[:limit]:
                lines.append(f"    {name}" + (f": {reasons[name]}" if reasons else ""))
            if len(names) > limit:
                lines.append(f"    ... and {len(names) - limit} more")

        block("TAMPERED (label or place changed)", sorted(self.tampered), self.tampered)
        block("FAILED", sorted(self.failed), self.failed)
        block("MISSING", self.missing)
        block("MODIFIED (hash mismatch)", self.modified)
        block("EXTRA (not in manifest)", self.extra)
        lines.append("  OK" if self.ok else "  NOT OK")
        return "\n".join(lines)
