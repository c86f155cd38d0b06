"""The cell manifest: one CSV row per cell volume, validated in full before any work starts.

Line numbers are those a spreadsheet shows: the header is line 1, the first cell line 2.
"""

from __future__ import annotations

import csv
import math
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from leuko.data.io import SUPPORTED_SUFFIXES, volume_suffix
from leuko.data.optics import DEFAULT_CLASSES
from leuko.errors import LeukoError

REQUIRED_COLUMNS = (
    "cell_id",
    "path",
    "label",
    "patient_id",
    "sample_type",
    "voxel_size_z",
    "voxel_size_y",
    "voxel_size_x",
)
OPTIONAL_COLUMNS = ("modality", "split")
SPLITS = ("train", "val", "test")
# ri: absolute refractive index; hhg: THG/SHG intensities; generic: any other intensities (e.g. MedMNIST),
# scaled per volume like hhg but never re-centred on a detected cell.
MODALITIES = ("ri", "hhg", "generic")
DEFAULT_MODALITY = "ri"
VOXEL_SIZE_COLUMNS = ("voxel_size_z", "voxel_size_y", "voxel_size_x")
_ADDED_COLUMNS = ("line", "abs_path", "read_problem")  # added by read_manifest_table, not in the file


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a manifest. line is None for problems of the whole file."""

    line: int | None
    cell_id: str | None
    message: str

    @property
    def is_row(self) -> bool:
        """True when leaving out this one cell (prepare --skip-bad) would remove the problem."""
        return self.line is not None and self.line >= 2

    def __str__(self) -> str:
        where = "manifest" if self.line is None else f"line {self.line}"
        if self.cell_id:
            where += f" (cell_id {self.cell_id})"
        return f"{where}: {self.message}"


class ManifestError(LeukoError, ValueError):
    """Every problem found in a manifest at once; .problems holds one line of text per problem."""

    def __init__(self, path: str | Path, problems: Sequence[Problem | str], hint: str | None = None) -> None:
        self.path = Path(path)
        self.details = [p if isinstance(p, Problem) else Problem(None, None, str(p)) for p in problems]
        self.problems = [str(p) for p in self.details]
        n = len(self.problems)
        hint = hint or f"Fix {'these' if n > 1 else 'this'} in {self.path} and run again."
        lines = [f"{self.path}: {n} problem{'s' if n != 1 else ''}:"]
        lines += [f"  {p}" for p in self.problems]
        lines.append(hint)
        super().__init__("\n".join(lines))


def read_manifest(
    path: str | Path, *, classes: Sequence[str] | None = DEFAULT_CLASSES, check_files: bool = True
) -> pd.DataFrame:
    """Read and validate a manifest; raise one ManifestError listing every problem.

    classes=None accepts any label. Returns every column as text, the voxel sizes as floats,
    plus "line" (the CSV line) and "abs_path" (path resolved against the manifest's folder).
    A manifest without a modality column gets modality "ri".
    """
    path = Path(path)
    df = read_manifest_table(path)
    problems = validate_manifest(df, path.parent, classes, check_files=check_files)
    if problems:
        raise ManifestError(path, problems)
    return finalise_manifest(df)


def read_manifest_table(path: str | Path) -> pd.DataFrame:
    """Read a manifest without validating its values: all columns as stripped text plus
    "line", "abs_path" and "read_problem" (a row with the wrong number of fields).
    Raises ManifestError only when the file itself cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(path, ["file not found"], hint="Check the --manifest path.")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            rows, lines, read_problems = [], [], []
            for row in reader:
                if not any(cell.strip() for cell in row):
                    continue  # blank line
                read_problems.append(
                    "" if len(row) == len(header) else f"has {len(row)} fields but the header has {len(header)}"
                )
                rows.append([cell.strip() for cell in (row + [""] * len(header))[: len(header)]])
                lines.append(reader.line_num)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise ManifestError(path, [f"is not a readable UTF-8 CSV file: {exc}"]) from exc
    if header is None:
        raise ManifestError(path, ["file is empty"], hint=f"Write a header line: {','.join(REQUIRED_COLUMNS)}")
    columns = [c.strip() for c in header]
    df = pd.DataFrame(rows, columns=columns, dtype=object)
    if df.columns.duplicated().any():
        dup = sorted(set(df.columns[df.columns.duplicated()]))
        raise ManifestError(path, [Problem(1, None, f"duplicate column name(s) {', '.join(dup)}")])
    df["line"] = pd.Series(lines, dtype="int64")
    df["read_problem"] = pd.Series(read_problems, dtype=object)
    root = Path(os.path.abspath(path.parent))
    if "path" in df.columns:
        df["abs_path"] = pd.Series([resolve_path(p, root) if p else "" for p in df["path"]], dtype=object)
    return df


def resolve_path(value: str, root: Path) -> str:
    """A manifest path as an absolute path; relative paths start at the manifest's folder."""
    return os.path.normpath(os.path.join(root, os.path.expanduser(value)))


def validate_manifest(
    df: pd.DataFrame, root: str | Path, classes: Sequence[str] | None, *, check_files: bool = True
) -> list[Problem]:
    """Every problem in a manifest table from read_manifest_table, ordered by line."""
    root = Path(os.path.abspath(root))
    problems: list[Problem] = []
    columns = [c for c in df.columns if c not in _ADDED_COLUMNS]
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        problems.append(
            Problem(
                1,
                None,
                f"missing required column(s) {', '.join(missing)}; found {', '.join(columns) or 'none'}"
                f" (required: {', '.join(REQUIRED_COLUMNS)}; optional: {', '.join(OPTIONAL_COLUMNS)})",
            )
        )
    if len(df) == 0:
        problems.append(Problem(None, None, "has no cell rows below the header"))
        return problems
    lines = df["line"].tolist() if "line" in df.columns else list(range(2, len(df) + 2))
    ids = df["cell_id"].tolist() if "cell_id" in df.columns else [None] * len(df)

    def add(i: int, message: str) -> None:
        problems.append(Problem(lines[i], ids[i] or None, message))

    if "read_problem" in df.columns:
        for i, message in enumerate(df["read_problem"]):
            if message:
                add(i, message)
    if "cell_id" in df.columns:
        _check_ids(ids, lines, add)
    if "path" in df.columns:
        _check_paths(df, root, check_files, add)
    if "label" in df.columns:
        _check_labels(df["label"], classes, add)
    _check_values(df, add)
    if "modality" in df.columns:
        mixed = _check_modalities(df["modality"], lines, add)
        if mixed:
            problems.append(mixed)
    return sorted(problems, key=lambda p: p.line if p.line is not None else 0)


def _check_ids(ids: list, lines: list[int], add) -> None:
    seen: dict[str, int] = {}
    for i, cell_id in enumerate(ids):
        if not cell_id:
            add(i, "empty cell_id")
        elif cell_id in seen:
            add(i, f"duplicate cell_id {cell_id!r}, first used on line {seen[cell_id]}; cell_ids must be unique")
        else:
            seen[cell_id] = lines[i]


def _check_paths(df: pd.DataFrame, root: Path, check_files: bool, add) -> None:
    abs_paths = df["abs_path"] if "abs_path" in df.columns else [resolve_path(p, root) for p in df["path"]]
    for i, (value, full) in enumerate(zip(df["path"], abs_paths)):
        if not value:
            add(i, "empty path")
        elif volume_suffix(value) not in SUPPORTED_SUFFIXES:
            add(i, f"unsupported file type in path {value!r}; use one of {', '.join(SUPPORTED_SUFFIXES)}")
        elif check_files and not os.path.isfile(full):
            add(i, f"file not found: {full} (relative paths start at the manifest's folder {root})")


def _check_labels(labels: pd.Series, classes: Sequence[str] | None, add) -> None:
    allowed = None if classes is None else list(classes)
    lowered = {c.lower(): c for c in allowed or []}
    for i, label in enumerate(labels):
        if not label:
            add(i, "empty label")
        elif allowed is not None and label not in allowed:
            guess = lowered.get(label.lower())
            hint = f" (did you mean {guess!r}?)" if guess else ""
            add(
                i,
                f"label {label!r} is not one of {', '.join(allowed)}{hint};"
                " fix the label or change the class list with --classes",
            )


def _check_values(df: pd.DataFrame, add) -> None:
    """patient_id and sample_type present, voxel sizes positive numbers, split a known one."""
    for column, example in (("patient_id", "the patient or donor"), ("sample_type", "e.g. blood or BALF")):
        if column in df.columns:
            for i, value in enumerate(df[column]):
                if not value:
                    add(i, f"empty {column} ({example})")
    for column in VOXEL_SIZE_COLUMNS:
        if column in df.columns:
            for i, value in enumerate(df[column]):
                size = _float_or_none(value)
                if size is None:
                    add(i, f"{column} {value!r} is not a number; give the voxel size in micrometres")
                elif not size > 0 or math.isinf(size):
                    add(i, f"{column} {value!r} must be a positive number of micrometres")
    if "split" in df.columns:
        for i, value in enumerate(df["split"]):
            if value.lower() not in SPLITS:
                add(i, f"split {value!r} is not one of {', '.join(SPLITS)} (or drop the split column)")


def _check_modalities(modalities: pd.Series, lines: list[int], add) -> Problem | None:
    """Each row's modality known; a Problem for the whole file when the rows mix modalities."""
    by_modality: dict[str, list[int]] = defaultdict(list)
    for i, value in enumerate(modalities):
        if value.lower() not in MODALITIES:
            add(i, f"modality {value!r} is not one of {', '.join(MODALITIES)}")
        else:
            by_modality[value.lower()].append(lines[i])
    if len(by_modality) > 1:
        found = "; ".join(f"{m} on {line_list(ls)}" for m, ls in sorted(by_modality.items()))
        return Problem(None, None, f"mixes modalities ({found}); prepare one modality per manifest")
    return None


def finalise_manifest(df: pd.DataFrame) -> pd.DataFrame:
    """A validated table with float voxel sizes, lower-case modality/split and a modality column."""
    df = df.copy()
    for column in VOXEL_SIZE_COLUMNS:
        df[column] = df[column].astype(float)
    if "modality" not in df.columns:
        df["modality"] = DEFAULT_MODALITY
    df["modality"] = df["modality"].str.lower()
    if "split" in df.columns:
        df["split"] = df["split"].str.lower()
    return df.drop(columns=["read_problem"], errors="ignore").reset_index(drop=True)


def _float_or_none(value: str) -> float | None:
    try:
        number = float(value)
    except ValueError:
        return None
    return None if math.isnan(number) else number


def line_list(lines: list[int], limit: int = 5) -> str:
    """Rows for a message: "line 4", or "lines 2, 3, 4, 5, 6 and 7 more"."""
    shown = ", ".join(map(str, lines[:limit]))
    more = f" and {len(lines) - limit} more" if len(lines) > limit else ""
    return f"line{'s' if len(lines) > 1 else ''} {shown}{more}"
