"""Checkpoint integrity: a SHA-256 manifest written last into the checkpoint folder, checked on load.

A truncated or emptied file fails to parse, but one flipped byte inside the weights or the
optimizer state still parses and would be trained on. ``save`` therefore writes
``manifest.json`` after every other file (inside the temporary folder, so the rename that
publishes a checkpoint publishes its manifest with it)::

    {"adaptnet_manifest": 1, "algorithm": "sha256",
     "files": {"model.safetensors": {"bytes": 1234, "sha256": "..."}, ...},
     "manifest_sha256": "..."}

``files`` lists every regular file of the folder at save time; ``manifest_sha256`` is the
digest of ``files`` itself (canonical JSON), so a damaged manifest is named as such instead of
blaming the file whose digest it garbled. Files not listed are ignored. A checkpoint without a
manifest (written before manifests existed) loads with a warning: it cannot be verified.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adaptnet.errors import CheckpointError

logger = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
FORMAT = 1
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Integrity:
    """What ``verify`` found: the files whose SHA-256 matched, or no manifest at all."""

    files: tuple[str, ...]
    has_manifest: bool

    def describe(self) -> str:
        """One line for people, such as ``verified (3 files, SHA-256)``."""
        if not self.has_manifest:
            return f"not verified (no {MANIFEST_FILE}: saved before checkpoints had one)"
        return f"verified ({len(self.files)} file{'s' * (len(self.files) != 1)}, SHA-256)"


def sha256_file(file: Path) -> str:
    """The hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _canonical(files: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(files, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_manifest(folder: Path) -> Path:
    """Hash every regular file of ``folder`` (but the manifest) into ``folder/manifest.json``, fsynced.

    Call it last, once the other files are complete: what it records is what ``verify`` expects.
    """
    files = {
        p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != MANIFEST_FILE
    }
    manifest = {"adaptnet_manifest": FORMAT, "algorithm": "sha256", "files": files,
                "manifest_sha256": _canonical(files)}
    path = folder / MANIFEST_FILE
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(manifest, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return path


def _read_manifest(file: Path) -> dict[str, dict[str, Any]]:
    """The ``files`` mapping of a manifest, after checking the manifest's own digest."""
    damaged = f"{file}: the checkpoint's manifest is damaged"
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{damaged}: cannot read it as JSON ({err})") from err
    if not isinstance(data, dict) or data.get("adaptnet_manifest") != FORMAT or data.get("algorithm") != "sha256":
        raise CheckpointError(f"{damaged} or of an unknown format (expected adaptnet_manifest {FORMAT}, sha256)")
    files = data.get("files")
    if not isinstance(files, dict) or data.get("manifest_sha256") != _canonical(files):
        raise CheckpointError(f"{damaged}: its own digest does not match its contents")
    for name, entry in files.items():  # the digest matched: a bad entry was written so, not damaged
        if not (isinstance(entry, dict) and isinstance(entry.get("bytes"), int)
                and isinstance(entry.get("sha256"), str)):
            raise CheckpointError(f"{file}: unknown entry for {name!r}: {entry!r}")
    return files


def verify(folder: Path) -> Integrity | None:
    """Check every file the manifest of ``folder`` lists; None when ``folder`` is not a folder.

    Raises:
        CheckpointError: a listed file is missing, has another size or another SHA-256, or the
            manifest itself is damaged; the message names the file.
    """
    if not folder.is_dir():
        return None  # the loader reports a missing folder or a file in its own words
    manifest = folder / MANIFEST_FILE
    if not manifest.is_file():
        return Integrity((), has_manifest=False)
    files = _read_manifest(manifest)
    for name, entry in files.items():
        file = folder / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing; the checkpoint is incomplete (its {MANIFEST_FILE} lists it)")
        size = file.stat().st_size
        if size != entry["bytes"]:
            raise CheckpointError(f"{file}: {size} bytes, but {MANIFEST_FILE} recorded {entry['bytes']} when it "
                                  "was saved: the file is truncated or damaged")
        if sha256_file(file) != entry["sha256"]:
            raise CheckpointError(f"{file}: its SHA-256 does not match {MANIFEST_FILE}: the file was damaged or "
                                  "changed after it was saved")
    return Integrity(tuple(files), has_manifest=True)


def check(folder: Path) -> None:
    """``verify`` for ``load``: raise on damage; warn once per load when there is no manifest."""
    found = verify(folder)
    if found is not None and not found.has_manifest and (folder / "spec.json").is_file():
        logger.warning("%s has no %s (saved by an older adaptnet): its files cannot be verified", folder,
                       MANIFEST_FILE)
