"""Cases and manifests: which scans a run or a training reads, with their references and checksums.

A :class:`Case` is one scan (a file or a DICOM folder, optionally one series of it), its optional reference
labels, the sha256 of each file, and free extra fields. It travels from the manifest to the runner
(:mod:`medseg.workflow`) to the report, which names it by ``case_id`` only (never by patient name or ID).

Manifest formats (:func:`read_manifest`):

- JSON: ``{"root": "..", "cases": [{"case_id": ..., "image": ..., "label": ..., "series_uid": ...,
  "image_sha256": ..., "label_sha256": ..., <extra fields>}]}``, or a bare list of such objects;
- the Medical Segmentation Decathlon ``dataset.json`` as it is (``training``: ``{image, label}`` pairs, ``test``:
  image paths; case ids from the file names, the split kept in ``extra["split"]``);
- CSV with a header: ``image`` (required), ``case_id``, ``label``, ``series_uid``, ``image_sha256``,
  ``label_sha256``; other columns become extra fields.

Paths are relative to the manifest's **root**: its folder, or the folder named by ``"root"`` (itself relative to
the manifest). A path that resolves outside the root (``..``, an absolute path elsewhere, a symlink out) is
refused, so a manifest cannot reach files it was not given.

The sha256 of a file is computed in 1 MiB chunks; the sha256 of a DICOM folder is the sha256 of the sorted lines
``<file sha256>  <path relative to the folder>`` of its files (:func:`medseg.files.sha256_path`).
"""

from __future__ import annotations

import csv
import json
import logging
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from medseg.errors import ManifestError, MedsegError
from medseg.files import atomic_write_text, sha256_path

__all__ = [
    "Case",
    "Manifest",
    "ManifestCheck",
    "ManifestProblem",
    "case_id_problem",
    "check_manifest",
    "make_manifest",
    "read_manifest",
    "verify_case",
]

logger = logging.getLogger(__name__)

_CASE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")
_KNOWN = ("case_id", "image", "label", "series_uid", "image_sha256", "label_sha256")
_IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")
_REFERENCE_STEMS = ("labels", "label", "seg", "segmentation", "ref", "reference", "mask", "truth")
_REFERENCE_TAILS = ("_seg", "_label", "_labels", "_mask", "-seg", "-label", "-labels", "_seg-manual", "_gt")


def case_id_problem(case_id: str) -> str | None:
    """Why ``case_id`` cannot name a results folder, or None when it can (letters, digits, ``._+-``, ≤ 128)."""
    if not _CASE_ID.match(case_id):
        return (f"case_id {case_id!r} must start with a letter or digit and hold only letters, digits and . _ + - "
                "(at most 128 characters): it names the case's results folder")
    return None


@dataclass(frozen=True)
class Case:
    """One scan of a manifest, with its optional reference labels.

    Attributes
    ----------
    case_id : str
        Names the case everywhere (results folder, logs, records, reports). Never a patient name or ID.
    image : Path
        Absolute: an image file or a DICOM folder (or file).
    label : Path or None
        Absolute path of the reference label map, if any.
    series_uid : str or None
        For a DICOM folder holding several series: which one to read.
    sha256 : mapping
        ``{"image": hex, "label": hex}`` as the manifest records them (checked by :func:`verify_case`).
    extra : mapping
        Any other fields of the manifest entry (licence, split, site, ...), kept as they are.
    """

    case_id: str
    image: Path
    label: Path | None = None
    series_uid: str | None = None
    sha256: Mapping[str, str] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self, root: Path | None = None) -> dict[str, Any]:
        """The manifest entry (paths relative to ``root`` when given)."""
        def rel(p: Path) -> str:
            return p.relative_to(root).as_posix() if root is not None else str(p)

        out: dict[str, Any] = {"case_id": self.case_id, "image": rel(self.image)}
        if self.label is not None:
            out["label"] = rel(self.label)
        if self.series_uid:
            out["series_uid"] = self.series_uid
        for key, digest in sorted(self.sha256.items()):
            out[f"{key}_sha256"] = digest
        out.update(self.extra)
        return out


@dataclass(frozen=True)
class Manifest:
    """The cases of a manifest file (or of a folder, for :func:`make_manifest`).

    Attributes
    ----------
    cases : tuple of Case
    root : Path
        Absolute; every case path lies inside it.
    path : Path or None
        The manifest file read, if any.
    description : str
    """

    cases: tuple[Case, ...]
    root: Path
    path: Path | None = None
    description: str = ""

    def __len__(self) -> int:
        return len(self.cases)

    def labelled(self) -> tuple[Case, ...]:
        """The cases that have reference labels."""
        return tuple(c for c in self.cases if c.label is not None)

    def to_json(self, *, root: str = ".") -> dict[str, Any]:
        """JSON-ready manifest; ``root`` is written as given and paths are relative to :attr:`root`."""
        out: dict[str, Any] = {}
        if self.description:
            out["description"] = self.description
        out["root"] = root
        out["cases"] = [c.to_json(self.root) for c in self.cases]
        return out

    def save(self, path: str | Path) -> Path:
        """Write the manifest as JSON (atomically), with ``root`` relative to the file's folder.

        Raises
        ------
        ManifestError
            If the file's folder does not exist or cannot hold a path to :attr:`root`.
        """
        import os

        p = Path(path)
        if not p.parent.is_dir():
            raise ManifestError(f"{p}: folder {p.parent} does not exist; create it first.")
        root = Path(os.path.relpath(self.root, p.parent.resolve())).as_posix()
        return atomic_write_text(p, json.dumps(self.to_json(root=root), indent=2) + "\n")


# ---- reading ---------------------------------------------------------------------------------------------------
def _rows(path: Path) -> tuple[list[Any], Path, str, bool]:
    """(entries, root, description, is_msd)."""
    root = path.parent
    try:
        if path.suffix.lower() == ".csv":
            with open(path, newline="", encoding="utf-8-sig") as f:
                reader = csv.DictReader(f)
                if reader.fieldnames is None or "image" not in reader.fieldnames:
                    raise ManifestError(f"{path}: a CSV manifest needs a header row with an 'image' column "
                                        f"(and optionally {', '.join(k for k in _KNOWN if k != 'image')}); "
                                        f"found {reader.fieldnames}.")
                return [{k: v for k, v in row.items() if v not in (None, "")} for row in reader], root, "", False
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, csv.Error) as exc:
        raise ManifestError(f"{path}: cannot read the manifest ({exc}).") from None
    if isinstance(data, list):
        return data, root, "", False
    if not isinstance(data, Mapping):
        raise ManifestError(f"{path}: expected a JSON object with 'cases' (or an MSD dataset.json), got "
                            f"{type(data).__name__}.")
    if data.get("root") is not None:
        root = path.parent / str(data["root"])
    description = str(data.get("description", "") or "")
    if "cases" in data:
        return list(data["cases"] or []), root, description, False
    if "training" in data or "test" in data:  # Medical Segmentation Decathlon dataset.json
        rows: list[Any] = []
        for item in data.get("training") or []:
            rows.append({**item, "split": "training"} if isinstance(item, Mapping) else item)
        for item in data.get("test") or []:
            rows.append({"image": item, "split": "test"} if isinstance(item, str) else item)
        return rows, root, description or str(data.get("name", "") or ""), True
    raise ManifestError(f"{path}: no 'cases' list (nor MSD 'training'/'test'); expected "
                        '{"root": ".", "cases": [{"case_id": ..., "image": ...}]}.')


def _inside(root: Path, value: Any, where: str, path: Path) -> Path:
    if not isinstance(value, str) or not value:
        raise ManifestError(f"{path}: {where}: expected a path (string), got {value!r}.")
    p = (root / value).resolve()
    if not p.is_relative_to(root):
        raise ManifestError(
            f"{path}: {where}: path {value!r} leaves the manifest's root {root}; manifests may only name files inside "
            "their root (set \"root\" in a JSON manifest, or move the manifest)."
        )
    return p


def _stem(p: Path) -> str:
    name = p.name
    for s in _IMAGE_SUFFIXES:
        if name.lower().endswith(s):
            return name[: -len(s)]
    return name


def _case(row: Any, n: int, root: Path, path: Path) -> Case:
    """One manifest entry as a Case (``root`` absolute)."""
    if isinstance(row, str):
        row = {"image": row}
    if not isinstance(row, Mapping) or not row.get("image"):
        raise ManifestError(f"{path}: case {n} needs an 'image' path, got {row!r}.")
    image = _inside(root, row["image"], f"case {n}: image", path)
    label = _inside(root, row["label"], f"case {n}: label", path) if row.get("label") else None
    case_id = str(row.get("case_id") or "") or _stem(image)
    problem = case_id_problem(case_id)
    if problem:
        raise ManifestError(f"{path}: case {n}: {problem}.")
    sha = {k: str(row[f"{k}_sha256"]).lower() for k in ("image", "label") if row.get(f"{k}_sha256")}
    extra = {str(k): v for k, v in row.items() if k not in _KNOWN}
    series_uid = row.get("series_uid")
    return Case(case_id, image, label, str(series_uid) if series_uid else None, sha, extra)


def read_manifest(path: str | Path, *, check_files: bool = True) -> Manifest:
    """Read a JSON, CSV or MSD ``dataset.json`` manifest (see the module docstring).

    Parameters
    ----------
    path : path
    check_files : bool
        Also check that every file exists and matches its recorded sha256 (training does; the batch runner
        checks per case with :func:`verify_case` so that one bad case does not stop the run).

    Returns
    -------
    Manifest

    Raises
    ------
    ManifestError
        If the file cannot be read, lists no cases, an entry has no image, a path leaves the root, two cases share
        a case id, a case id cannot name a folder, or (``check_files``) a file is missing or its sha256 differs.

    Examples
    --------
    >>> import json, tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> _ = (folder / "a.nii.gz").write_bytes(b"not read here")
    >>> _ = (folder / "m.json").write_text(json.dumps({"cases": [{"case_id": "a", "image": "a.nii.gz"}]}))
    >>> m = read_manifest(folder / "m.json")
    >>> [(c.case_id, c.image.name, c.label) for c in m.cases]
    [('a', 'a.nii.gz', None)]
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found. Give a JSON or CSV file listing image (and label) paths, "
                            "or make one with `medseg manifest make FOLDER --out manifest.json`.")
    rows, root, description, msd = _rows(path)
    root = root.resolve()
    cases = [_case(row, n, root, path) for n, row in enumerate(rows)]
    if not cases:
        raise ManifestError(f"{path}: the manifest lists no cases; expected a list of {{case_id, image, label}} "
                            "entries.")
    dupes = sorted(k for k, v in Counter(c.case_id for c in cases).items() if v > 1)
    if dupes:
        raise ManifestError(f"{path}: case id(s) {dupes} appear more than once; each case needs its own case_id "
                            "(it names the results folder).")
    manifest = Manifest(tuple(cases), root, path, description)
    if check_files:
        for n, case in enumerate(cases):
            try:
                verify_case(case)
            except ManifestError as exc:
                raise ManifestError(f"{path}: case {n}: {exc}") from None
    if msd:
        logger.debug("%s: read as an MSD dataset.json (%d cases)", path, len(cases))
    return manifest


def verify_case(case: Case) -> dict[str, str]:
    """Check that a case's files exist and match their recorded sha256; return the actual digests.

    Returns
    -------
    dict
        ``{"image": hex, "label": hex}`` (label only when the case has one), computed in chunks.

    Raises
    ------
    ManifestError
        If a file is missing or its sha256 differs from the manifest's (the message names both digests).
    """
    digests: dict[str, str] = {}
    for key, p in (("image", case.image), ("label", case.label)):
        if p is None:
            continue
        if not p.exists():
            raise ManifestError(f"{key} file {p} does not exist; fix the manifest or restore the file.")
        digest = sha256_path(p)
        expected = case.sha256.get(key)
        if expected and digest != expected:
            raise ManifestError(
                f"{key} file {p} has sha256 {digest}, the manifest records {expected}; the file changed since the "
                "manifest was written. Restore it, or rewrite the manifest with `medseg manifest make`."
            )
        digests[key] = digest
    return digests


# ---- making ----------------------------------------------------------------------------------------------------
def _is_image_file(p: Path) -> bool:
    return p.is_file() and not p.name.startswith(".") and any(p.name.lower().endswith(s) for s in _IMAGE_SUFFIXES[:-1])


def _is_reference(p: Path) -> bool:
    stem = _stem(p).lower()
    if stem.endswith(".labels"):
        return False
    return stem in _REFERENCE_STEMS or stem.endswith(_REFERENCE_TAILS)


def _study_cases(folder: Path, case_id: str) -> list[Case]:
    """The cases of one study folder: its DICOM series and its image files, paired with one reference file."""
    from medseg.io import list_series

    files = sorted(p for p in folder.iterdir() if _is_image_file(p))
    refs = [p for p in files if _is_reference(p)]
    images = [p for p in files if not _is_reference(p)]
    dicom_dirs = [folder] if any(p.is_file() and not _is_image_file(p) and not p.name.startswith(".")
                                 and p.suffix.lower() not in (".json", ".txt", ".csv", ".md")
                                 for p in folder.iterdir()) else []
    dicom_dirs += sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    entries: list[tuple[Path, str | None, str]] = []  # (image, series_uid, id suffix)
    for d in dicom_dirs:
        series = list_series(d) if d != folder else [s for s in list_series(d)
                                                     if all(Path(f).parent == folder for f in s.files)]
        for n, s in enumerate(series):
            uid = s.key if len(series) > 1 else None
            entries.append((d, uid, "" if len(series) == 1 else f"-s{n + 1}"))
    entries += [(p, None, "") for p in images]
    out = []
    label = refs[0] if (len(refs) == 1 and len(entries) == 1) else None
    if refs and label is None:
        logger.warning("%s: %d reference file(s) for %d image(s); not pairing them", case_id, len(refs), len(entries))
    for n, (image, uid, suffix) in enumerate(entries):
        cid = case_id if len(entries) == 1 else f"{case_id}-{_stem(image) if image.is_file() else image.name}{suffix}"
        out.append(Case(cid, image, label, uid))
    return out


def make_manifest(folder: str | Path, *, checksums: bool = True, description: str = "") -> Manifest:
    """One case per image series or image file found in ``folder``, with sha256.

    Layout read: one level of study folders (``FOLDER/<study>/`` holding a DICOM series, possibly in sub-folders,
    or image files), or image files directly in ``FOLDER``. Case ids come from the study folder names (or the file
    names); a study with several series or images gets ``<study>-<name>`` ids. A single reference file in a study
    (``labels.*``, ``seg.*``, ``*_seg.*``, ``ref.*``, ...) becomes the label of its single image.

    Parameters
    ----------
    folder : path
    checksums : bool
        Compute each file's sha256 (in chunks).
    description : str

    Returns
    -------
    Manifest
        Rooted at ``folder``; write it with :meth:`Manifest.save`.

    Raises
    ------
    ManifestError
        If ``folder`` is not a folder, holds no image, or two cases would get the same id.
    """
    from medseg.io import list_series

    root = Path(folder).resolve()
    if not root.is_dir():
        raise ManifestError(f"{folder}: not a folder. Give a folder of study folders or image files.")
    cases: list[Case] = []
    for p in sorted(root.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_dir():
            cases.extend(_study_cases(p, p.name))
        elif _is_image_file(p) and not _is_reference(p):
            cases.append(Case(_stem(p), p))
    loose_dicom = [f for f in root.iterdir() if f.is_file() and not _is_image_file(f)
                   and f.suffix.lower() not in (".json", ".csv", ".txt", ".md") and not f.name.startswith(".")]
    if loose_dicom:
        for s in list_series(root):
            if all(Path(f).parent == root for f in s.files):
                cases.append(Case(root.name if not cases else f"{root.name}-{s.key[-8:]}", root, None, s.key))
    if not cases:
        raise ManifestError(f"{folder}: found no image series or image files (NIfTI, NRRD, MHA, DICOM) in it or in "
                            "its study folders.")
    fixed = []
    for c in cases:
        cid = re.sub(r"[^A-Za-z0-9._+-]", "_", c.case_id).lstrip("._+-") or "case"
        fixed.append(replace(c, case_id=cid))
    dupes = sorted(k for k, v in Counter(c.case_id for c in fixed).items() if v > 1)
    if dupes:
        raise ManifestError(f"{folder}: several images would get the case id(s) {dupes}; rename the study folders "
                            "or files so that each case has its own name.")
    if checksums:
        fixed = [replace(c, sha256=verify_case(c)) for c in fixed]
    return Manifest(tuple(fixed), root, None, description)


# ---- checking --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ManifestProblem:
    """One problem found by :func:`check_manifest`: the case (or ``None`` for the whole manifest) and why."""

    case_id: str | None
    kind: Literal["unreadable-manifest", "missing-file", "duplicate-id", "checksum", "unreadable-image",
                  "not-3d", "bad-entry"]
    message: str


@dataclass(frozen=True)
class ManifestCheck:
    """What :func:`check_manifest` found: the number of cases and every problem (not just the first)."""

    path: Path
    n_cases: int
    problems: tuple[ManifestProblem, ...]

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {"manifest": str(self.path), "cases": self.n_cases, "ok": self.ok,
                "problems": [{"case_id": p.case_id, "kind": p.kind, "message": p.message} for p in self.problems]}


def check_manifest(path: str | Path, *, load_images: bool = True) -> ManifestCheck:
    """List every problem of a manifest: missing files, duplicate ids, checksum mismatches, unreadable or non-3D
    images (each image is loaded when ``load_images``).

    Returns
    -------
    ManifestCheck
        Never raises for problems in the cases; a manifest that cannot be read at all is one problem.
    """
    from medseg.io import load_volume

    path = Path(path)
    problems: list[ManifestProblem] = []
    try:
        if not path.is_file():
            raise ManifestError(f"{path}: manifest not found.")
        rows, root, _, _ = _rows(path)
    except ManifestError as exc:
        return ManifestCheck(path, 0, (ManifestProblem(None, "unreadable-manifest", str(exc)),))
    root = root.resolve()
    cases: list[Case] = []
    ids: Counter[str] = Counter()
    for n, row in enumerate(rows):
        try:
            case = _case(row, n, root, path)
        except ManifestError as exc:
            problems.append(ManifestProblem(None, "bad-entry", str(exc).removeprefix(f"{path}: ")))
            continue
        cases.append(case)
        ids[case.case_id] += 1
    for cid, count in sorted(ids.items()):
        if count > 1:
            problems.append(ManifestProblem(cid, "duplicate-id", f"case id {cid!r} appears {count} times"))
    for case in cases:
        try:
            verify_case(case)
        except ManifestError as exc:
            kind: Literal["missing-file", "checksum"] = "checksum" if "sha256" in str(exc) else "missing-file"
            problems.append(ManifestProblem(case.case_id, kind, str(exc)))
            continue
        if not load_images:
            continue
        for key, p in (("image", case.image), ("label", case.label)):
            if p is None:
                continue
            try:
                volume = load_volume(p, series_uid=case.series_uid if key == "image" else None)
            except MedsegError as exc:
                problems.append(ManifestProblem(case.case_id, "unreadable-image", f"{key}: {exc}"))
                continue
            if volume.array.ndim != 3 or min(volume.array.shape) < 2:
                problems.append(ManifestProblem(case.case_id, "not-3d", f"{key} {p} has shape "
                                                f"{tuple(volume.array.shape)}; a 3D volume is expected"))
    return ManifestCheck(path, len(rows), tuple(problems))
