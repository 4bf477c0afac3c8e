"""Labels and splits from the annotation formats video datasets ship with, matched to video files.

Formats (``--annotation-format``):

- ``videomae-csv``: VideoMAE's lists, one ``path label`` per line (space separated, integer label);
  the split is taken from the file name (``train.csv`` -> train, ``val.csv`` -> val, ...).
- ``kinetics-csv``: the Kinetics CSVs, ``label,youtube_id,time_start,time_end,split``; the video
  file is ``{youtube_id}_{start:06d}_{end:06d}.<ext>`` (the layout of the common download scripts),
  labels are indices of the sorted class names, the test CSV has no label column.
- ``ssv2-json``: Something-Something V2 ``train/validation/test`` JSON lists (``id``, ``template``);
  the class index comes from ``labels.json`` (``--labels``) keyed by the template without brackets;
  videos are ``{id}.webm``.
- ``ucf101``: the ``ucfTrainTestlist`` folder: ``classInd.txt`` (1-based) + ``trainlist0N.txt`` /
  ``testlist0N.txt`` for split N (``--split-index``); labels become 0-based.
- ``hmdb51``: the ``testTrainMulti_7030_splits`` folder: ``{class}_test_splitN.txt`` with lines
  ``video.avi flag``, flag 1 = train, 2 = test, 0 = not in this split; labels are indices of the
  sorted class names.

Matching is by path: an annotation's path (absolute, relative or bare name, extension ignored)
matches the video whose relative path is its longest trailing part; a bare name matches a file stem
when that stem is unique.
"""

from __future__ import annotations

import csv
import io
import json
import posixpath
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from pipeline import storage
from pipeline.data import manifest

FORMATS = ("auto", "videomae-csv", "kinetics-csv", "ssv2-json", "ucf101", "hmdb51")
_SPLIT_WORDS = {
    "train": "train",
    "training": "train",
    "val": "val",
    "validation": "val",
    "valid": "val",
    "test": "test",
    "testing": "test",
}


class AnnotationError(ValueError):
    """An annotation file that cannot be parsed; the message names the file and the line."""


@dataclass(frozen=True)
class Annotation:
    key: str  # path or name of the video as the annotation file spells it
    label: int | None = None
    label_name: str | None = None
    split: str | None = None


@dataclass
class Matched:
    """Annotations joined to videos, with what did not join counted for the report."""

    by_video: dict[str, Annotation] = field(default_factory=dict)  # relative video path -> annotation
    unmatched: list[Annotation] = field(default_factory=list)  # annotation rows naming no video
    duplicates: int = 0  # annotation rows for a video already annotated (first one wins)
    videos_without: list[str] = field(default_factory=list)  # videos no annotation names


def split_from_name(name: str) -> str | None:
    """``train.csv`` -> ``train``, ``something-something-v2-validation.json`` -> ``val``."""
    for word in re.split(r"[^a-z]+", posixpath.basename(name).lower()):
        if word in _SPLIT_WORDS:
            return _SPLIT_WORDS[word]
    return None


def _strip_ext(path: str) -> str:
    root, ext = posixpath.splitext(path)
    return root if ext and len(ext) <= 5 else path


def parse_videomae_csv(text: str, source: str) -> list[Annotation]:
    """VideoMAE ``path label`` lists, read by the training manifest reader; split from the file name."""
    try:
        rows = manifest.parse_videomae_csv(text, source)
    except manifest.ManifestError as e:
        raise AnnotationError(str(e)) from e
    split = split_from_name(source)
    return [Annotation(r["path"], r["label"] if r["label"] >= 0 else None, None, split) for r in rows]


def kinetics_name(youtube_id: str, start: float, end: float) -> str:
    return f"{youtube_id}_{int(float(start)):06d}_{int(float(end)):06d}"


def parse_kinetics_csv(text: str, source: str, classes: Sequence[str] | None = None) -> list[Annotation]:
    """``classes`` fixes the label indices (the train CSV's sorted names); default: this file's names."""
    reader = csv.DictReader(io.StringIO(text))
    need = {"youtube_id", "time_start", "time_end"}
    if not reader.fieldnames or not need <= set(reader.fieldnames):
        raise AnnotationError(
            f"{source}: a Kinetics CSV needs columns {sorted(need)}, got {reader.fieldnames}"
        )
    rows = list(reader)
    names = sorted({r["label"] for r in rows if r.get("label")}) if classes is None else list(classes)
    index = {name: i for i, name in enumerate(names)}
    out = []
    for n, r in enumerate(rows, 2):
        try:
            key = kinetics_name(r["youtube_id"], float(r["time_start"]), float(r["time_end"]))
        except (TypeError, ValueError) as e:
            raise AnnotationError(f"{source}:{n}: bad time_start/time_end in {r}") from e
        name = r.get("label") or None
        split = _SPLIT_WORDS.get((r.get("split") or "").lower()) or split_from_name(source)
        out.append(Annotation(key, index.get(name) if name else None, name, split))
    return out


def parse_ssv2_json(text: str, source: str, labels: dict[str, int] | None) -> list[Annotation]:
    """SSv2 lists through the training manifest reader (``<id>.webm``), plus the class name."""
    try:
        entries = json.loads(text)
        rows = manifest.parse_ssv2_json(text, labels, source=source)
    except (json.JSONDecodeError, KeyError, TypeError, manifest.ManifestError) as e:
        raise AnnotationError(f"{source}: not a Something-Something V2 list ({type(e).__name__}: {e})") from e
    split = split_from_name(source)
    return [
        Annotation(r["path"], r["label"] if r["label"] >= 0 else None,
                   manifest.ssv2_label_key(e["template"]) if "template" in e else None, split)
        for r, e in zip(rows, entries, strict=True)
    ]  # fmt: skip


def parse_ucf101(files: dict[str, str], split_index: int) -> list[Annotation]:
    """``files``: name -> text of the split folder's files (classInd.txt, trainlist0N, testlist0N)."""
    if "classInd.txt" not in files:
        raise AnnotationError("UCF101 split folder has no classInd.txt")
    classes = {}
    for line in files["classInd.txt"].splitlines():
        if line.strip():
            i, name = line.split()
            classes[name] = int(i) - 1
    out = []
    for split, fname in (
        ("train", f"trainlist{split_index:02d}.txt"),
        ("test", f"testlist{split_index:02d}.txt"),
    ):
        if fname not in files:
            raise AnnotationError(f"UCF101 split folder has no {fname}")
        for n, line in enumerate(files[fname].splitlines(), 1):
            if not line.strip():
                continue
            path = line.split()[0]
            name = path.split("/")[0]
            if name not in classes:
                raise AnnotationError(f"{fname}:{n}: class {name!r} is not in classInd.txt")
            out.append(Annotation(path, classes[name], name, split))
    return out


def parse_hmdb51(files: dict[str, str], split_index: int) -> list[Annotation]:
    pattern = re.compile(rf"^(.+)_test_split{split_index}\.txt$")
    per_class = {m.group(1): text for name, text in files.items() if (m := pattern.match(name))}
    if not per_class:
        raise AnnotationError(f"HMDB51 split folder has no *_test_split{split_index}.txt files")
    index = {name: i for i, name in enumerate(sorted(per_class))}
    out = []
    for name, text in sorted(per_class.items()):
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2 or parts[1] not in "012":
                raise AnnotationError(
                    f"{name}_test_split{split_index}.txt:{n}: expected 'video flag', got {line!r}"
                )
            if parts[1] != "0":
                split = "train" if parts[1] == "1" else "test"
                out.append(Annotation(f"{name}/{parts[0]}", index[name], name, split))
    return out


def _read_folder(uri: str) -> dict[str, str]:
    return {posixpath.basename(u): storage.read_text(u) for u, _ in storage.list_files(uri, (".txt",))}


def detect_format(uri: str) -> str:
    if storage.is_dir(uri):
        names = {posixpath.basename(u) for u, _ in storage.list_files(uri, (".txt",))}
        if "classInd.txt" in names:
            return "ucf101"
        if any(re.match(r".+_test_split\d\.txt$", n) for n in names):
            return "hmdb51"
        raise AnnotationError(f"{storage.redact(uri)}: folder is neither UCF101 nor HMDB51 split files")
    if uri.lower().endswith(".json"):
        return "ssv2-json"
    head = storage.read_text(uri).split("\n", 1)[0]
    return "kinetics-csv" if "youtube_id" in head else "videomae-csv"


def load_annotations(
    uris: Iterable[str], fmt: str = "auto", labels: str | None = None, split_index: int = 1
) -> list[Annotation]:
    """Every annotation row from ``uris`` (files, or the split folder for UCF101 / HMDB51)."""
    if fmt not in FORMATS:
        raise AnnotationError(f"unknown annotation format {fmt!r}; choose one of {', '.join(FORMATS)}")
    out: list[Annotation] = []
    kinetics_classes: list[str] | None = None
    ssv2_labels = None
    if labels:
        try:
            ssv2_labels = manifest.read_label_map(storage.read_text(labels))
        except ValueError as e:
            raise AnnotationError(f"{storage.redact(labels)}: not a label map ({e})") from e
    for uri in sorted(uris, key=lambda u: split_from_name(u) != "train"):  # train first: it fixes classes
        kind = detect_format(uri) if fmt == "auto" else fmt
        if kind == "ucf101":
            out += parse_ucf101(_read_folder(uri), split_index)
        elif kind == "hmdb51":
            out += parse_hmdb51(_read_folder(uri), split_index)
        elif kind == "ssv2-json":
            out += parse_ssv2_json(storage.read_text(uri), uri, ssv2_labels)
        elif kind == "kinetics-csv":
            rows = parse_kinetics_csv(storage.read_text(uri), uri, kinetics_classes)
            if kinetics_classes is None and any(r.label_name for r in rows):
                kinetics_classes = sorted({r.label_name for r in rows if r.label_name})
            out += rows
        else:
            out += parse_videomae_csv(storage.read_text(uri), uri)
    return out


def match(rel_paths: Sequence[str], annotations: Iterable[Annotation]) -> Matched:
    """Join annotations to videos given by their paths relative to the input root."""
    by_rel = {_strip_ext(p): p for p in rel_paths}
    by_stem: dict[str, list[str]] = defaultdict(list)
    for p in rel_paths:
        by_stem[posixpath.basename(_strip_ext(p))].append(p)
    result = Matched()
    for ann in annotations:
        parts = _strip_ext(ann.key.replace("\\", "/")).strip("/").split("/")
        video = next(
            (by_rel["/".join(parts[i:])] for i in range(len(parts)) if "/".join(parts[i:]) in by_rel), None
        )
        if video is None and len(by_stem.get(parts[-1], ())) == 1:
            video = by_stem[parts[-1]][0]
        if video is None:
            result.unmatched.append(ann)
        elif video in result.by_video:
            result.duplicates += 1
        else:
            result.by_video[video] = ann
    result.videos_without = [p for p in rel_paths if p not in result.by_video]
    return result
