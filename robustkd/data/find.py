"""Finding a dataset's files among its search folders, for the splits a caller needs.

A folder qualifies when it holds every file of the asked splits: an evaluation asks only for the test
split, so a folder holding just the test files serves it. When training asks for both and a folder holds
only the test files, :func:`only_test_message` names that folder and the train files it lacks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# split -> key -> file names to try in order (e.g. the .gz first, then the plain file)
Names = dict[str, dict[str, tuple[str, ...]]]


def files_in(folder: Path, names: Names, splits: Sequence[str]) -> dict[str, Path] | None:
    """Key -> file for every key of ``splits`` in ``folder``, or None when one is missing."""
    found: dict[str, Path] = {}
    for split in splits:
        for key, candidates in names[split].items():
            path = next((folder / c for c in candidates if (folder / c).is_file()), None)
            if path is None:
                return None
            found[key] = path
    return found


def find_files(bases: Sequence[Path], names: Names, splits: Sequence[str]) -> dict[str, Path] | None:
    """The files of ``splits`` from the first folder of ``bases`` that holds them all."""
    return next((f for f in (files_in(b, names, splits) for b in bases) if f is not None), None)


def only_test_message(what: str, bases: Sequence[Path], names: Names, train_files: str) -> str | None:
    """For a training run: one line naming the first folder that holds the test files but not ``train_files``."""
    holder = next((b for b in bases if files_in(b, names, ("test",)) is not None), None)
    if holder is None:
        return None
    return (
        f"{what}: {holder} holds the test files but not {train_files}; training needs them (an evaluation "
        "reads only the test files). Put them there, or point --data.root at a folder that holds them"
    )


@dataclass(frozen=True)
class Layout:
    """One way a release can sit in a search folder: an archive file, or a folder of files per split."""

    kind: str  # the decoder's name: "binary" or "python"
    entry: str  # the archive's or the folder's name
    files: dict[str, tuple[str, ...]] | None = None  # split -> file names, for a folder


def _status(path: Path, layout: Layout, splits: Sequence[str]) -> str:
    """'full' when ``path`` serves ``splits``, 'partial' when it holds only some of the release's files."""
    if layout.files is None:
        return "full" if path.is_file() else ""
    if not path.is_dir():
        return ""
    if all((path / n).is_file() for s in splits for n in layout.files[s]):
        return "full"
    return "partial" if any((path / n).is_file() for names in layout.files.values() for n in names) else ""


def find_release(bases: Sequence[Path], layouts: Sequence[Layout], splits: Sequence[str]) -> tuple[str, Path] | None:
    """(kind, path) of the first layout found that serves ``splits``, searching ``bases`` in order.

    A base that is itself the release folder counts too. When none serves them, the first folder holding
    part of a release is returned, so that its reader names the files it lacks.
    """
    partial: tuple[str, Path] | None = None
    for base in bases:
        for layout in layouts:
            for path in (base / layout.entry, base) if base.name == layout.entry else (base / layout.entry,):
                status = _status(path, layout, splits)
                if status == "full":
                    return layout.kind, path
                if status == "partial" and partial is None:
                    partial = layout.kind, path
    return partial
