"""Annotation formats -> labels and splits joined to video paths, with unmatched rows counted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.preprocess.annotations import (
    Annotation,
    AnnotationError,
    detect_format,
    kinetics_name,
    load_annotations,
    match,
    parse_hmdb51,
    parse_kinetics_csv,
    parse_ucf101,
    split_from_name,
)


def test_split_from_file_names():
    assert split_from_name("lists/train.csv") == "train"
    assert split_from_name("something-something-v2-validation.json") == "val"
    assert split_from_name("kinetics400_test.csv") == "test"
    assert split_from_name("labels.csv") is None


def test_videomae_csv_uses_the_training_reader_and_takes_the_split_from_the_name(tmp_path: Path):
    f = tmp_path / "val.csv"
    f.write_text("/data/k400/val/abseiling/a b.mp4 0\nvideos/zumba/x.mp4 399\n")
    anns = load_annotations([str(f)], "videomae-csv")
    assert anns == [Annotation("/data/k400/val/abseiling/a b.mp4", 0, None, "val"),
                    Annotation("videos/zumba/x.mp4", 399, None, "val")]  # fmt: skip
    f.write_text("videos/a.mp4 zero\n")
    with pytest.raises(AnnotationError, match="val.csv line 1"):
        load_annotations([str(f)], "videomae-csv")


def test_kinetics_csv_maps_to_file_names_and_sorted_class_indices():
    train = ("label,youtube_id,time_start,time_end,split\n"
             "zumba,z1,5,15,train\nabseiling,-a_b,0.0,10.0,train\n")  # fmt: skip
    anns = parse_kinetics_csv(train, "kinetics400/train.csv")
    assert anns == [Annotation("z1_000005_000015", 1, "zumba", "train"),
                    Annotation("-a_b_000000_000010", 0, "abseiling", "train")]  # fmt: skip
    # the test CSV has no labels; the val CSV takes the train CSV's class indices
    assert parse_kinetics_csv("youtube_id,time_start,time_end,split\nq,1,11,test\n", "test.csv") == [
        Annotation("q_000001_000011", None, None, "test")
    ]
    val = parse_kinetics_csv(
        "label,youtube_id,time_start,time_end,split\nzumba,v,0,10,val\n", "v.csv", ["abseiling", "zumba"]
    )
    assert val[0].label == 1 and kinetics_name("v", 0, 10) == "v_000000_000010"
    with pytest.raises(AnnotationError, match="youtube_id"):
        parse_kinetics_csv("label,path\nx,y\n", "bad.csv")


def test_kinetics_class_indices_come_from_the_train_file_whatever_the_order(tmp_path: Path):
    (tmp_path / "val.csv").write_text("label,youtube_id,time_start,time_end,split\nzumba,v,0,10,val\n")
    (tmp_path / "train.csv").write_text(
        "label,youtube_id,time_start,time_end,split\nabseiling,a,0,10,train\nbowling,b,0,10,train\nzumba,z,0,10,train\n"
    )
    anns = load_annotations([str(tmp_path / "val.csv"), str(tmp_path / "train.csv")])
    assert {a.key: a.label for a in anns} == {"v_000000_000010": 2, "a_000000_000010": 0,
                                              "b_000000_000010": 1, "z_000000_000010": 2}  # fmt: skip


def test_ssv2_json_with_labels_file(tmp_path: Path):
    labels = {"Pushing something from left to right": "0", "Holding something next to something": "1"}
    (tmp_path / "labels.json").write_text(json.dumps(labels))
    (tmp_path / "something-something-v2-train.json").write_text(json.dumps([
        {"id": "78687", "label": "holding a cup next to a pen",
         "template": "Holding [something] next to [something]", "placeholders": ["a cup", "a pen"]},
        {"id": "42", "template": "Pushing [something] from left to right"},
    ]))  # fmt: skip
    (tmp_path / "something-something-v2-test.json").write_text(json.dumps([{"id": "7"}]))
    anns = load_annotations(
        [
            str(tmp_path / "something-something-v2-train.json"),
            str(tmp_path / "something-something-v2-test.json"),
        ],
        labels=str(tmp_path / "labels.json"),
    )
    assert anns == [
        Annotation("78687.webm", 1, "Holding something next to something", "train"),
        Annotation("42.webm", 0, "Pushing something from left to right", "train"),
        Annotation("7.webm", None, None, "test"),
    ]
    (tmp_path / "bad-train.json").write_text(json.dumps([{"id": "1", "template": "Unknown [something]"}]))
    with pytest.raises(AnnotationError, match="not in the label map"):
        load_annotations([str(tmp_path / "bad-train.json")], labels=str(tmp_path / "labels.json"))


def test_ucf101_split_files():
    files = {
        "classInd.txt": "1 ApplyEyeMakeup\n2 YoYo\n",
        "trainlist01.txt": "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1\nYoYo/v_YoYo_g09_c02.avi 2\n",
        "testlist01.txt": "YoYo/v_YoYo_g01_c01.avi\n",
    }
    assert parse_ucf101(files, 1) == [
        Annotation("ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi", 0, "ApplyEyeMakeup", "train"),
        Annotation("YoYo/v_YoYo_g09_c02.avi", 1, "YoYo", "train"),
        Annotation("YoYo/v_YoYo_g01_c01.avi", 1, "YoYo", "test"),
    ]
    with pytest.raises(AnnotationError, match="trainlist02"):
        parse_ucf101(files, 2)


def test_hmdb51_split_flags():
    files = {
        "brush_hair_test_split1.txt": "April_09_brush_hair_u_nm_np1_ba_goo_0.avi 1 \nb.avi 2\nc.avi 0\n",
        "climb_stairs_test_split1.txt": "d.avi 2\n",
        "brush_hair_test_split2.txt": "April_09_brush_hair_u_nm_np1_ba_goo_0.avi 2\n",
    }
    assert parse_hmdb51(files, 1) == [
        Annotation("brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_0.avi", 0, "brush_hair", "train"),
        Annotation("brush_hair/b.avi", 0, "brush_hair", "test"),  # flag 0 (c.avi) is not in split 1
        Annotation("climb_stairs/d.avi", 1, "climb_stairs", "test"),
    ]
    with pytest.raises(AnnotationError, match="expected 'video flag'"):
        parse_hmdb51({"x_test_split1.txt": "a.avi 7\n"}, 1)


def test_detect_format(tmp_path: Path):
    (tmp_path / "ucf").mkdir()
    (tmp_path / "ucf/classInd.txt").write_text("1 A\n")
    (tmp_path / "hmdb").mkdir()
    (tmp_path / "hmdb/run_test_split1.txt").write_text("a.avi 1\n")
    (tmp_path / "k.csv").write_text("label,youtube_id,time_start,time_end,split\n")
    (tmp_path / "train.csv").write_text("a.mp4 1\n")
    (tmp_path / "x.json").write_text("[]")
    assert [detect_format(str(tmp_path / n)) for n in ("ucf", "hmdb", "k.csv", "train.csv", "x.json")] == [
        "ucf101", "hmdb51", "kinetics-csv", "videomae-csv", "ssv2-json"]  # fmt: skip
    with pytest.raises(AnnotationError, match="unknown annotation format"):
        load_annotations([str(tmp_path / "k.csv")], "csv")


def test_match_by_trailing_path_then_unique_stem_and_counts_the_rest():
    videos = ["train/abseiling/a_000000_000010.mp4", "train/zumba/z_000005_000015.mp4",
              "UCF101/YoYo/v_YoYo_g01_c01.avi", "dup/x.mp4", "dup2/x.mp4", "lonely.mp4"]  # fmt: skip
    anns = [
        Annotation("a_000000_000010", 0),  # bare Kinetics name -> unique stem
        Annotation("/mnt/k400/train/zumba/z_000005_000015.mp4", 1),  # absolute path, trailing part matches
        Annotation("YoYo/v_YoYo_g01_c01.avi", 2),  # UCF relative path below the class folder
        Annotation("x", 3),  # ambiguous stem: not guessed
        Annotation("gone_000000_000010", 4),  # names no video
        Annotation("YoYo/v_YoYo_g01_c01", 5),  # duplicate of an annotated video
    ]
    m = match(videos, anns)
    assert {v: a.label for v, a in m.by_video.items()} == {videos[0]: 0, videos[1]: 1, videos[2]: 2}
    assert [a.key for a in m.unmatched] == ["x", "gone_000000_000010"]
    assert m.duplicates == 1
    assert m.videos_without == ["dup/x.mp4", "dup2/x.mp4", "lonely.mp4"]
