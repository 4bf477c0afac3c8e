"""Manifests in the formats users have: folder listings, VideoMAE CSV, SSv2 JSON, Parquet, JSONL."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import storage
from pipeline.data.manifest import (
    ManifestError,
    parse_ssv2_json,
    parse_videomae_csv,
    read_label_map,
    read_manifest,
    resolve_path,
)


def test_videomae_csv_space_comma_and_unlabeled_lines():
    text = "a/x.mp4 3\n# comment\nb/with space.mp4 7\nc/y.mp4,12\n\nd/z.mp4\n"
    rows = parse_videomae_csv(text)
    assert [(r["path"], r["label"]) for r in rows] == [
        ("a/x.mp4", 3),
        ("b/with space.mp4", 7),
        ("c/y.mp4", 12),
        ("d/z.mp4", -1),
    ]
    with pytest.raises(ManifestError, match="line 1.*'x'"):
        parse_videomae_csv("a.mp4 x\n", "k400.csv")


def test_csv_with_header_reads_start_and_end():
    rows = parse_videomae_csv("path,label,start,end\nv.mp4,2,1.5,4\nw.mp4,0,,\n")
    assert rows[0] == {"path": "v.mp4", "label": 2, "start": 1.5, "end": 4.0}
    assert rows[1]["start"] == -1.0


def test_manifest_paths_resolve_against_the_data_root(tmp_path):
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "train.csv").write_text("videos/a.mp4 1\n/abs/elsewhere.mp4 2\n")
    rows = read_manifest(str(tmp_path / "lists" / "train.csv"))  # default root: the manifest's folder
    assert rows[0]["path"] == str(tmp_path / "lists" / "videos" / "a.mp4")
    assert rows[1]["path"] == "/abs/elsewhere.mp4"  # no data root given: absolute paths are kept
    (tmp_path / "lists" / "train.csv").write_text("videos/a.mp4 1\n")
    rows = read_manifest(str(tmp_path / "lists" / "train.csv"), data_root=str(tmp_path / "data"))
    assert rows[0]["path"] == str(tmp_path / "data" / "videos" / "a.mp4")


@pytest.mark.parametrize("bad", ["../secret.mp4", "videos/../../secret.mp4", "/etc/passwd"])
def test_paths_escaping_the_data_root_are_refused(tmp_path, bad):
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"ok.mp4 0\n{bad} 1\n")
    with pytest.raises(ManifestError, match="escapes the data root"):
        read_manifest(str(manifest), data_root=str(tmp_path))
    with pytest.raises(ManifestError, match="escapes"):
        resolve_path(bad if ".." in bad else "s3://other/x.mp4", "s3://bucket/root")


def test_ssv2_json_with_labels_file(tmp_path):
    labels = {"Putting something into something": "0", "Pushing something from left to right": "1"}
    (tmp_path / "labels.json").write_text(json.dumps(labels))
    annotations = [
        {
            "id": "78687",
            "label": "putting a pen into a cup",
            "template": "Putting [something] into [something]",
            "placeholders": ["a pen", "a cup"],
        },
        {
            "id": "42326",
            "label": "pushing x",
            "template": "Pushing [something] from left to right",
            "placeholders": ["x"],
        },
    ]
    (tmp_path / "train.json").write_text(json.dumps(annotations))
    rows = read_manifest(str(tmp_path / "train.json"), data_root=str(tmp_path / "videos"))
    assert [(r["path"], r["label"]) for r in rows] == [
        (str(tmp_path / "videos" / "78687.webm"), 0),
        (str(tmp_path / "videos" / "42326.webm"), 1),
    ]
    assert read_label_map(str(tmp_path / "labels.json")) == {k: int(v) for k, v in labels.items()}
    unlabeled = parse_ssv2_json(json.dumps([{"id": "1"}]), label_map=None, video_ext=".mp4")
    assert unlabeled == [{"path": "1.mp4", "label": -1, "start": -1.0, "end": -1.0}]
    with pytest.raises(ManifestError, match="not in the label map"):
        parse_ssv2_json(json.dumps([{"id": "1", "template": "Unknown [x]"}]), labels)


def test_parquet_keeps_only_ok_rows_and_jsonl(tmp_path):
    table = pa.table(
        {
            "path": ["a.mp4", "b.mp4", "c.mp4"],
            "label": [0, 1, 2],
            "start": [0.0, None, 2.0],
            "end": [1.0, None, 3.0],
            "status": ["ok", "error", "ok"],
        }
    )
    pq.write_table(table, tmp_path / "clips.parquet")
    rows = read_manifest(str(tmp_path / "clips.parquet"))
    assert [(r["path"].rsplit("/", 1)[1], r["label"], r["start"], r["end"]) for r in rows] == [
        ("a.mp4", 0, 0.0, 1.0),
        ("c.mp4", 2, 2.0, 3.0),
    ]
    (tmp_path / "clips.jsonl").write_text('{"path": "a.mp4", "label": 4}\n{"path": "b.mp4"}\n')
    rows = read_manifest(str(tmp_path / "clips.jsonl"))
    assert [(r["label"], r["start"]) for r in rows] == [(4, -1.0), (-1, -1.0)]
    pq.write_table(pa.table({"video": ["a.mp4"]}), tmp_path / "bad.parquet")
    with pytest.raises(ManifestError, match="no 'path' column"):
        read_manifest(str(tmp_path / "bad.parquet"))


def test_a_split_column_selects_the_requested_split(tmp_path):
    table = pa.table({"path": ["a.mp4", "b.mp4", "c.mp4", "d.mp4"], "label": [0, 1, 0, 1],
                      "status": ["ok", "ok", "decode_error", "ok"], "split": ["train", "val", "train", None]})
    pq.write_table(table, tmp_path / "m.parquet")

    def names(split):
        return [r["path"].rsplit("/", 1)[1] for r in read_manifest(str(tmp_path / "m.parquet"), split=split)]

    assert names("train") == ["a.mp4"] and names("val") == ["b.mp4"]
    assert names(None) == ["a.mp4", "b.mp4", "d.mp4"]  # no split asked: every ok row
    with pytest.raises(ManifestError, match=r"no rows of split 'test' \(splits: \['train', 'val'\]\)"):
        read_manifest(str(tmp_path / "m.parquet"), split="test")
    (tmp_path / "u.jsonl").write_text('{"path": "a.mp4", "split": null}\n{"path": "b.mp4"}\n')
    assert len(read_manifest(str(tmp_path / "u.jsonl"), split="train")) == 2  # no split known: all rows


def test_folder_listing_and_split_manifest(sample_videos, tmp_path):
    rows = read_manifest(str(sample_videos / "videos"))
    assert len(rows) == 24 and all(r["label"] == -1 and r["path"].endswith(".mp4") for r in rows)
    train = read_manifest(str(sample_videos), split="train")
    assert len(train) == 8 and {r["label"] for r in train} == set(range(8))
    assert all(r["path"].startswith(str(sample_videos) + "/videos/") for r in train)
    with pytest.raises(ManifestError, match="no video files"):
        read_manifest(str(tmp_path))
    with pytest.raises(ManifestError, match="cannot read manifest"):
        read_manifest(str(tmp_path / "missing.csv"))


@pytest.mark.integration
def test_s3_prefix_listing_and_manifest(s3_bucket, sample_videos):
    for p in sorted((sample_videos / "videos").rglob("*.mp4"))[:3]:
        storage.upload_file(str(p), f"{s3_bucket}/data/videos/{p.name}")
    storage.write_bytes(f"{s3_bucket}/data/videos/notes.txt", b"not a video")
    rows = read_manifest(f"{s3_bucket}/data/videos")
    assert len(rows) == 3 and all(r["path"].startswith(f"{s3_bucket}/data/videos/") for r in rows)
    names = [r["path"].rsplit("/", 1)[1] for r in rows]
    storage.write_text(f"{s3_bucket}/data/train.csv", "".join(f"videos/{n} 5\n" for n in names))
    labeled = read_manifest(f"{s3_bucket}/data/train.csv")
    assert [r["path"] for r in labeled] == [r["path"] for r in rows] and {r["label"] for r in labeled} == {5}
    storage.write_text(f"{s3_bucket}/data/evil.csv", "../../other-bucket/x.mp4 1\n")
    with pytest.raises(ManifestError, match="escapes"):
        read_manifest(f"{s3_bucket}/data/evil.csv")
