"""COCO data tools of cnclip_vision.detection: the Chinese name table and OV-COCO split, validation of every
kind of bad input, the dataset, LSJ augmentation, the OV-COCO conversion and the two CLI commands."""

from __future__ import annotations

import copy
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from cnclip_vision.cli import main
from cnclip_vision.detection import coco_names as cn
from cnclip_vision.detection.coco import (
    CocoDetection,
    CocoFormatError,
    collate_detection,
    convert_ovcoco,
    eval_transforms,
    lsj_transforms,
    validate_coco,
)
from cnclip_vision.errors import CNClipError
from cnclip_vision.toy import world as toyworld


def _coco() -> dict:
    """A small valid COCO dict: 3 images (the third unannotated), 2 categories with non-contiguous ids."""
    return {
        "images": [
            {"id": 1, "file_name": "a.png", "width": 100, "height": 80},
            {"id": 2, "file_name": "b.png", "width": 60, "height": 60},
            {"id": 7, "file_name": "c.png", "width": 50, "height": 50},
        ],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 90, "bbox": [10, 10, 20, 30], "area": 600, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 5, "bbox": [50, 20, 10, 10], "area": 100, "iscrowd": 0},
            {"id": 3, "image_id": 2, "category_id": 5, "bbox": [0, 0, 30, 30], "area": 900, "iscrowd": 0},
        ],
        "categories": [{"id": 90, "name": "toothbrush"}, {"id": 5, "name": "airplane"}],
    }


def _write_images(root, data: dict, rng_seed: int = 0) -> None:
    rng = np.random.default_rng(rng_seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    for img in data["images"]:
        array = rng.integers(0, 256, (img["height"], img["width"], 3), dtype=np.uint8)
        Image.fromarray(array).save(root / "images" / img["file_name"])


def _write(path, data: dict):
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------- the name table
def test_name_table_and_split() -> None:
    assert len(cn.COCO_CATEGORIES) == 80 and len({c.id for c in cn.COCO_CATEGORIES}) == 80
    names = [n for c in cn.COCO_CATEGORIES for n in c.names]
    assert len(names) == len(set(names)), "a Chinese name or synonym belongs to two categories"
    assert len(cn.OVCOCO_BASE_IDS) == 48 and len(cn.OVCOCO_NOVEL_IDS) == 17 and len(cn.OVCOCO_EXCLUDED_IDS) == 15
    assert not set(cn.OVCOCO_BASE_IDS) & set(cn.OVCOCO_NOVEL_IDS)
    novel = {cn.get_coco_category(i).english_name for i in cn.OVCOCO_NOVEL_IDS}
    assert novel == {
        "airplane",
        "bus",
        "cat",
        "dog",
        "cow",
        "elephant",
        "umbrella",
        "tie",
        "snowboard",
        "skateboard",
        "cup",
        "knife",
        "cake",
        "couch",
        "keyboard",
        "sink",
        "scissors",
    }
    excluded = {cn.get_coco_category(i).english_name for i in cn.OVCOCO_EXCLUDED_IDS}
    assert {"traffic light", "hot dog", "dining table", "hair drier"} <= excluded
    assert cn.chinese_name(28) == "雨伞" and "伞" in cn.get_coco_category("umbrella").synonyms
    assert cn.chinese_name("suitcase") == "手提箱" and cn.get_coco_category("行李箱").id == 33
    assert cn.chinese_name("tv") == "电视" and cn.get_coco_category("电视机").english_name == "tv"
    assert cn.chinese_name(1) == "人" and cn.get_coco_category("行人").id == 1
    assert cn.chinese_name("Person") == "人" and cn.chinese_name("72") == "电视"
    assert cn.ovcoco_split(5) == "novel" and cn.ovcoco_split(1) == "base" and cn.ovcoco_split(10) == "excluded"
    for bad in (12, 0, "unicorn", "独角兽"):
        with pytest.raises(cn.UnknownCategoryError, match="unknown COCO category"):
            cn.chinese_name(bad)
    with pytest.raises(TypeError):
        cn.chinese_name(True)


def test_read_name_map(tmp_path) -> None:
    tsv = tmp_path / "names.tsv"
    tsv.write_text("english\tchinese\n# comment\n\numbrella\t雨伞\nsuitcase\t行李箱\n", encoding="utf-8")
    assert cn.read_name_map(tsv) == {"umbrella": "雨伞", "suitcase": "行李箱"}
    js = tmp_path / "names.json"
    js.write_text(json.dumps({"umbrella": "雨伞"}, ensure_ascii=False), encoding="utf-8")
    assert cn.read_name_map(js) == {"umbrella": "雨伞"}
    bad = tmp_path / "bad.tsv"
    bad.write_text("umbrella\t雨伞\nsuitcase 行李箱\n", encoding="utf-8")
    with pytest.raises(cn.NameMapError, match=r"bad\.tsv:2: expected two tab-separated columns"):
        cn.read_name_map(bad)
    twice = tmp_path / "twice.tsv"
    twice.write_text("umbrella\t雨伞\numbrella\t伞\n", encoding="utf-8")
    with pytest.raises(cn.NameMapError, match=r"twice\.tsv:2: 'umbrella' is mapped twice"):
        cn.read_name_map(twice)
    broken = tmp_path / "broken.json"
    broken.write_text('{\n"umbrella": 雨伞}', encoding="utf-8")
    with pytest.raises(cn.NameMapError, match=r"broken\.json:2: invalid JSON"):
        cn.read_name_map(broken)
    wrong = tmp_path / "wrong.json"
    wrong.write_text('{"umbrella": 3}', encoding="utf-8")
    with pytest.raises(cn.NameMapError, match=r"wrong\.json: the value of 'umbrella'"):
        cn.read_name_map(wrong)
    (tmp_path / "empty.tsv").write_text("\n", encoding="utf-8")
    with pytest.raises(cn.NameMapError, match="empty"):
        cn.read_name_map(tmp_path / "empty.tsv")
    with pytest.raises(FileNotFoundError, match="missing.tsv"):
        cn.read_name_map(tmp_path / "missing.tsv")


# ---------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("section", ["images", "annotations", "categories"])
def test_missing_top_level_key(section) -> None:
    data = _coco()
    del data[section]
    with pytest.raises(CocoFormatError, match=rf"gt\.json: missing top-level key '{section}'"):
        validate_coco(data, source="gt.json")


@pytest.mark.parametrize(
    ("section", "index", "key"),
    [
        ("images", 1, "id"),
        ("images", 0, "file_name"),
        ("images", 2, "width"),
        ("images", 0, "height"),
        ("annotations", 2, "id"),
        ("annotations", 1, "image_id"),
        ("annotations", 0, "category_id"),
        ("annotations", 1, "bbox"),
        ("categories", 1, "id"),
        ("categories", 0, "name"),
    ],
)
def test_missing_record_key(section, index, key) -> None:
    data = _coco()
    del data[section][index][key]
    with pytest.raises(CocoFormatError, match=rf"gt\.json: {section}\[{index}\] has no '{key}'"):
        validate_coco(data, source="gt.json")


@pytest.mark.parametrize(
    ("section", "index", "key", "value", "expected"),
    [
        ("images", 0, "id", "1", "an integer"),
        ("images", 1, "width", 0, "a positive number"),
        ("images", 1, "height", None, "a positive number"),
        ("annotations", 1, "bbox", [1, 2, 3], "4 finite numbers"),
        ("annotations", 2, "bbox", [1, 2, float("nan"), 4], "4 finite numbers"),
        ("annotations", 0, "category_id", True, "an integer"),
        ("annotations", 0, "iscrowd", 2, "0 or 1"),
        ("categories", 0, "name", "", "a non-empty string"),
    ],
)
def test_wrong_types(section, index, key, value, expected) -> None:
    data = _coco()
    data[section][index][key] = value
    with pytest.raises(CocoFormatError, match=rf"gt\.json: {section}\[{index}\].*{key}.*{expected}"):
        validate_coco(data, source="gt.json")


def test_not_a_list_or_object() -> None:
    with pytest.raises(CocoFormatError, match="'images' must be a list"):
        validate_coco({**_coco(), "images": {}}, source="gt.json")
    with pytest.raises(CocoFormatError, match=r"annotations\[1\] must be an object"):
        validate_coco({**_coco(), "annotations": [_coco()["annotations"][0], 5]}, source="gt.json")
    with pytest.raises(CocoFormatError, match="expected a JSON object"):
        validate_coco([], source="gt.json")  # type: ignore[arg-type]


@pytest.mark.parametrize("section", ["images", "annotations", "categories"])
def test_duplicate_ids(section) -> None:
    data = _coco()
    data[section].append(dict(data[section][0]))
    last = len(data[section]) - 1
    with pytest.raises(CocoFormatError, match=rf"duplicate {section} id .*{section}\[0\] and {section}\[{last}\]"):
        validate_coco(data, source="gt.json")


def test_cleaning_counts_and_warns_once(caplog) -> None:
    data = _coco()
    extra = [
        {"id": 10, "image_id": 1, "category_id": 5, "bbox": [5, 5, 0, 10]},  # zero width
        {"id": 11, "image_id": 1, "category_id": 5, "bbox": [5, 5, 10, -3]},  # negative height
        {"id": 12, "image_id": 1, "category_id": 5, "bbox": [90, 70, 20, 20]},  # clipped to 10 x 10
        {"id": 13, "image_id": 1, "category_id": 5, "bbox": [-5, -5, 10, 10]},  # clipped to 5 x 5
        {"id": 14, "image_id": 1, "category_id": 5, "bbox": [120, 10, 10, 10]},  # entirely outside
        {"id": 15, "image_id": 99, "category_id": 5, "bbox": [1, 1, 5, 5]},  # unknown image
        {"id": 16, "image_id": 1, "category_id": 3, "bbox": [1, 1, 5, 5]},  # unknown category
    ]
    data["annotations"] += extra
    original = copy.deepcopy(data)
    with caplog.at_level(logging.WARNING, logger="cnclip_vision.detection.coco"):
        cleaned, report = validate_coco(data, source="gt.json")
    assert data == original, "the input must not be modified"
    assert report == {
        "boxes_degenerate": 2,
        "boxes_clipped": 2,
        "boxes_outside_image": 1,
        "annotations_unknown_image": 1,
        "annotations_unknown_category": 1,
        "images_without_annotations": 1,
    }
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert (
        len(warnings) == 1 and "gt.json" in warnings[0].getMessage() and "boxes_clipped 2" in warnings[0].getMessage()
    )
    boxes = {a["id"]: a["bbox"] for a in cleaned["annotations"]}
    assert sorted(boxes) == [1, 2, 3, 12, 13]
    assert boxes[12] == [90, 70, 10, 10] and boxes[13] == [0, 0, 5, 5]
    assert [img["id"] for img in cleaned["images"]] == [1, 2, 7], "images without annotations are kept"
    assert all("area" in a and "iscrowd" in a for a in cleaned["annotations"])


def test_clean_file_has_an_empty_report(caplog) -> None:
    data = toyworld.detection_set(5, seed=0)
    with caplog.at_level(logging.WARNING):
        cleaned, report = validate_coco(data, source="toy")
    assert not report and not caplog.records
    assert cleaned["annotations"] == data["annotations"]


# ------------------------------------------------------------------------------------------- dataset
@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy_det")
    path = toyworld.write_detection_set(root, 12, seed=3, image_size=96)
    return root, path


def test_dataset_items_match_the_files(toy_root) -> None:
    root, path = toy_root
    data = json.loads(path.read_text(encoding="utf-8"))
    ds = CocoDetection(path)
    assert ds.image_root == root / "images" and len(ds) == 12
    assert ds.category_ids == list(range(1, 65)) and ds.category_names[0] == "红色圆形"
    assert ds.image_ids == [img["id"] for img in data["images"]] and not ds.report
    for i in (0, 5, 11):
        image, target = ds[i]
        assert isinstance(image, tv_tensors.Image) and image.dtype == torch.uint8 and image.shape == (3, 96, 96)
        png = np.array(Image.open(root / "images" / data["images"][i]["file_name"]).convert("RGB"))
        assert torch.equal(image, torch.from_numpy(png).permute(2, 0, 1))
        anns = [a for a in data["annotations"] if a["image_id"] == target["image_id"]]
        assert target["image_id"] == data["images"][i]["id"]
        boxes = target["boxes"]
        assert isinstance(boxes, tv_tensors.BoundingBoxes) and boxes.dtype == torch.float32
        assert boxes.format == tv_tensors.BoundingBoxFormat.XYXY and tuple(boxes.canvas_size) == (96, 96)
        expected = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]
        assert boxes.tolist() == expected
        assert target["labels"].dtype == torch.int64
        assert [ds.category_ids[k] for k in target["labels"].tolist()] == [a["category_id"] for a in anns]


def test_non_contiguous_ids_crowd_and_empty_images(tmp_path) -> None:
    data = _coco()
    data["annotations"].append({"id": 4, "image_id": 2, "category_id": 90, "bbox": [5, 5, 20, 20], "iscrowd": 1})
    _write_images(tmp_path, data)
    path = _write(tmp_path / "gt.json", data)
    ds = CocoDetection(path, name_map={"airplane": "飞机", "toothbrush": "牙刷"})
    assert ds.category_ids == [5, 90] and ds.category_names == ["飞机", "牙刷"]
    assert ds.report == {"crowd": 1, "images_without_annotations": 1}
    _, t1 = ds[0]
    assert t1["labels"].tolist() == [1, 0]  # toothbrush (id 90) -> label 1, airplane (id 5) -> label 0
    _, t2 = ds[1]
    assert t2["labels"].tolist() == [0] and t2["iscrowd"].tolist() == [0]
    _, t3 = ds[2]
    assert t3["boxes"].shape == (0, 4) and t3["labels"].shape == (0,) and t3["image_id"] == 7
    with_crowd = CocoDetection(path, skip_crowd=False)
    _, t2 = with_crowd[1]
    assert t2["labels"].tolist() == [0, 1] and t2["iscrowd"].tolist() == [0, 1]
    assert "crowd" not in with_crowd.report


def test_category_selection_and_name_map_file(tmp_path) -> None:
    data = _coco()
    _write_images(tmp_path, data)
    path = _write(tmp_path / "gt.json", data)
    names = tmp_path / "names.tsv"
    names.write_text("airplane\t飞机\ntoothbrush\t牙刷\n", encoding="utf-8")
    for keep in (["飞机"], [5], ["airplane"]):
        ds = CocoDetection(path, categories=keep, name_map=names)
        assert ds.category_ids == [5] and ds.category_names == ["飞机"]
        assert ds.report["annotations_other_categories"] == 1
        _, target = ds[0]
        assert target["labels"].tolist() == [0] and target["boxes"].tolist() == [[50, 20, 60, 30]]
    with pytest.raises(CocoFormatError, match=r"gt\.json: unknown categories \['猫'\]"):
        CocoDetection(path, categories=["猫"], name_map=names)
    with pytest.raises(TypeError, match="single string"):
        CocoDetection(path, categories="飞机")


def test_partial_name_map_warns(tmp_path, caplog) -> None:
    data = _coco()
    path = _write(tmp_path / "gt.json", data)
    with caplog.at_level(logging.WARNING):
        ds = CocoDetection(path, name_map={"airplane": "飞机"})
    assert ds.category_names == ["飞机", "toothbrush"]
    assert "toothbrush" in caplog.text
    assert ds.image_root == tmp_path  # no images/ folder beside the file


def test_bad_images_give_none_and_collate_drops_them(tmp_path, caplog) -> None:
    data = _coco()
    _write_images(tmp_path, data)
    (tmp_path / "images" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (tmp_path / "images" / "c.png").unlink()
    ds = CocoDetection(_write(tmp_path / "gt.json", data))
    with caplog.at_level(logging.WARNING, logger="cnclip_vision.detection.coco"):
        items = [ds[i] for i in range(3)]
    assert items[0] is not None and items[1] is None and items[2] is None
    assert "b.png" in caplog.text and "c.png" in caplog.text
    loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=collate_detection)
    images, targets = next(iter(loader))
    assert len(images) == len(targets) == 1 and targets[0]["image_id"] == 1
    assert collate_detection([None, None]) == ([], [])


def test_any_image_mode_and_exif(tmp_path, caplog) -> None:
    data = {
        "images": [
            {"id": 1, "file_name": "gray.png", "width": 30, "height": 20},
            {"id": 2, "file_name": "rgba.png", "width": 30, "height": 20},
            {"id": 3, "file_name": "rotated.jpg", "width": 20, "height": 30},
        ],  # as displayed
        "annotations": [{"id": 1, "image_id": 3, "category_id": 1, "bbox": [2, 3, 10, 20]}],
        "categories": [{"id": 1, "name": "人"}],
    }
    (tmp_path / "images").mkdir()
    Image.new("L", (30, 20), 128).save(tmp_path / "images" / "gray.png")
    Image.new("RGBA", (30, 20), (10, 20, 30, 0)).save(tmp_path / "images" / "rgba.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 30 x 20, shown rotated by 90 degrees: 20 x 30
    Image.new("RGB", (30, 20), (200, 0, 0)).save(tmp_path / "images" / "rotated.jpg", exif=exif)
    ds = CocoDetection(_write(tmp_path / "gt.json", data))
    with caplog.at_level(logging.WARNING):
        gray, rgba, (rotated, target) = ds[0][0], ds[1][0], ds[2]
    assert gray.shape == rgba.shape == (3, 20, 30) and gray.dtype == torch.uint8
    assert rgba[:, 0, 0].tolist() == [10, 20, 30]
    assert rotated.shape == (3, 30, 20) and tuple(target["boxes"].canvas_size) == (30, 20)
    assert not caplog.records, "sizes agree with the annotations once EXIF orientation is applied"


# ---------------------------------------------------------------------------------------- transforms
COLOURS = torch.tensor([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0]], dtype=torch.uint8)


def _painted_sample() -> tuple[tv_tensors.Image, dict]:
    """Solid rectangles of distinct colours on black, exactly at their boxes; label k has colour k."""
    boxes = torch.tensor(
        [[10, 10, 50, 40], [70, 20, 110, 90], [120, 60, 158, 110], [20, 60, 60, 112]], dtype=torch.float32
    )
    labels = torch.tensor([2, 0, 3, 1])
    image = torch.zeros(3, 120, 160, dtype=torch.uint8)
    for (x1, y1, x2, y2), label in zip(boxes.int().tolist(), labels.tolist()):
        image[:, y1:y2, x1:x2] = COLOURS[label][:, None, None]
    target = {
        "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(120, 160)),
        "labels": labels,
        "iscrowd": torch.zeros(4, dtype=torch.int64),
        "image_id": 42,
    }
    return tv_tensors.Image(image), target


def test_lsj_keeps_boxes_on_their_objects() -> None:
    transform = lsj_transforms(64, (0.2, 2.0))
    flipped_some, dropped_some = False, False
    for seed in range(30):
        torch.manual_seed(seed)
        image, target = transform(*_painted_sample())
        assert isinstance(image, tv_tensors.Image) and image.shape == (3, 64, 64) and image.dtype == torch.uint8
        boxes, labels = target["boxes"], target["labels"]
        assert isinstance(boxes, tv_tensors.BoundingBoxes) and tuple(boxes.canvas_size) == (64, 64)
        assert len(boxes) == len(labels) == len(target["iscrowd"]) and target["image_id"] == 42
        dropped_some |= len(boxes) < 4
        assert (boxes >= 0).all() and (boxes <= 64).all()
        assert ((boxes[:, 2:] - boxes[:, :2]) >= 1).all()
        for (x1, y1, x2, y2), label in zip(boxes.tolist(), labels.tolist()):
            inner = image[:, round(y1) + 1 : round(y2) - 1, round(x1) + 1 : round(x2) - 1]
            if inner.shape[1] < 2 or inner.shape[2] < 2:
                continue
            mean = inner.float().mean(dim=(1, 2))
            assert torch.allclose(mean, COLOURS[label].float(), atol=40), (seed, label, mean)
            if label == 2:  # first box, left of centre before the flip
                flipped_some |= (x1 + x2) / 2 > 32 and y2 - y1 > 10
    assert dropped_some, "30 random crops should cut some boxes away"
    assert flipped_some


def test_lsj_without_flip_and_bad_arguments() -> None:
    assert not any(type(t).__name__ == "RandomHorizontalFlip" for t in lsj_transforms(32, flip=False).transforms)
    with pytest.raises(ValueError, match="scale_range"):
        lsj_transforms(32, (0, 1))
    with pytest.raises(ValueError, match="size"):
        lsj_transforms(0)


def test_eval_transforms_and_dataset_with_lsj(toy_root) -> None:
    image, target = _painted_sample()
    out_image, out_target = eval_transforms()(image, target)
    assert torch.equal(out_image, image) and torch.equal(out_target["boxes"], target["boxes"])
    assert torch.equal(out_target["labels"], target["labels"])
    _, path = toy_root
    ds = CocoDetection(path, transforms=lsj_transforms(48))
    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate_detection)
    images, targets = next(iter(loader))
    assert [tuple(i.shape) for i in images] == [(3, 48, 48)] * 4
    assert all(len(t["boxes"]) == len(t["labels"]) for t in targets)


# ------------------------------------------------------------------------------------------- OV-COCO
def _official_like() -> dict:
    """COCO-2017-like instances file: English names, official ids, a few images."""
    categories = [{"id": c.id, "name": c.english_name, "supercategory": c.supercategory} for c in cn.COCO_CATEGORIES]
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "width": 640, "height": 480} for i in (1, 2, 3, 4, 5, 6)]
    anns = [(1, 1), (2, 17), (3, 10), (4, 1), (4, 5), (4, 64), (4, 90), (6, 3)]  # (image, category)
    annotations = [
        {
            "id": k + 100,
            "image_id": i,
            "category_id": c,
            "bbox": [10.5, 20, 30, 40],
            "area": 1200.0,
            "iscrowd": int(i == 6),
            "segmentation": [[10.5, 20, 40.5, 20, 40.5, 60]],
        }
        for k, (i, c) in enumerate(anns)
    ]
    return {
        "info": {"description": "COCO 2017 Dataset"},
        "licenses": [{"id": 1, "name": "x"}],
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }


def test_convert_ovcoco_train_and_val(tmp_path) -> None:
    src = _write(tmp_path / "instances_train2017.json", _official_like())
    path, counts = convert_ovcoco(src, tmp_path / "out", split="train")
    assert path == tmp_path / "out" / "ovcoco_train2017.json"
    assert [p.name for p in path.parent.iterdir()] == ["ovcoco_train2017.json"], "no temporary file left"
    train = json.loads(path.read_text(encoding="utf-8"))
    assert [c["id"] for c in train["categories"]] == sorted(cn.OVCOCO_BASE_IDS)
    assert all(c["split"] == "base" for c in train["categories"])
    person = train["categories"][0]
    assert person == {
        "id": 1,
        "name": "人",
        "english_name": "person",
        "synonyms": ["行人", "人物"],
        "supercategory": "person",
        "split": "base",
    }
    assert [img["id"] for img in train["images"]] == [1, 4, 6]  # 2: novel only, 3: excluded only, 5: none
    assert sorted(a["category_id"] for a in train["annotations"]) == [1, 1, 3, 90]
    assert train["annotations"][0] == _official_like()["annotations"][0], "annotations are copied unchanged"
    assert counts == {
        "split": "train",
        "images": 3,
        "annotations": 4,
        "categories": 48,
        "base_categories": 48,
        "novel_categories": 0,
        "images_removed": 3,
        "annotations_removed": 4,
    }
    assert "OV-COCO train" in train["info"]["description"]

    path, counts = convert_ovcoco(src, tmp_path / "out", split="val")
    val = json.loads(path.read_text(encoding="utf-8"))
    assert len(val["categories"]) == 65 and counts["novel_categories"] == 17
    split = {c["id"]: c["split"] for c in val["categories"]}
    assert split[5] == "novel" and split[17] == "novel" and split[1] == "base" and 10 not in split
    assert next(c for c in val["categories"] if c["id"] == 28)["name"] == "雨伞"
    assert [img["id"] for img in val["images"]] == [1, 2, 4, 6]
    assert sorted(a["category_id"] for a in val["annotations"]) == [1, 1, 3, 5, 17, 90]
    _, counts = convert_ovcoco(src, tmp_path / "keep", split="val", keep_empty_images=True)
    assert counts["images"] == 6 and counts["images_removed"] == 0


def test_convert_ovcoco_errors(tmp_path) -> None:
    data = _official_like()
    src = _write(tmp_path / "instances.json", data)
    with pytest.raises(ValueError, match="split"):
        convert_ovcoco(src, tmp_path, split="test")  # type: ignore[arg-type]
    renamed = copy.deepcopy(data)
    renamed["categories"][4]["name"] = "飞机"  # already converted?
    with pytest.raises(CocoFormatError, match=r"renamed\.json: category id 5 is named '飞机', expected 'airplane'"):
        convert_ovcoco(_write(tmp_path / "renamed.json", renamed), tmp_path, split="val")
    partial = copy.deepcopy(data)
    partial["categories"] = [c for c in partial["categories"] if c["id"] != 17]
    with pytest.raises(CocoFormatError, match=r"categories \[17\] are missing"):
        convert_ovcoco(_write(tmp_path / "partial.json", partial), tmp_path, split="val")
    assert convert_ovcoco(_write(tmp_path / "partial.json", partial), tmp_path, split="train")[1]["categories"] == 48
    broken = copy.deepcopy(data)
    del broken["annotations"][3]["bbox"]
    with pytest.raises(CocoFormatError, match=r"broken\.json: annotations\[3\] has no 'bbox'"):
        convert_ovcoco(_write(tmp_path / "broken.json", broken), tmp_path, split="train")
    (tmp_path / "bad.json").write_text("{\n\n oops", encoding="utf-8")
    with pytest.raises(CocoFormatError, match=r"bad\.json:3: invalid JSON"):
        convert_ovcoco(tmp_path / "bad.json", tmp_path, split="train")
    with pytest.raises(FileNotFoundError, match="nothing.json"):
        convert_ovcoco(tmp_path / "nothing.json", tmp_path, split="train")
    assert issubclass(CocoFormatError, CNClipError)


def test_converted_file_loads_as_dataset(tmp_path) -> None:
    src = _write(tmp_path / "instances_val2017.json", _official_like())
    path, _ = convert_ovcoco(src, tmp_path, split="val")
    base = CocoDetection(path, categories=[c.name for c in map(cn.get_coco_category, cn.OVCOCO_BASE_IDS)])
    assert len(base.category_ids) == 48 and base.category_names[0] == "人"
    assert base.report["annotations_other_categories"] == 2 and base.report["crowd"] == 1
    assert CocoDetection(path, categories=["伞", "umbrella", 28]).category_names == ["雨伞"]  # synonyms, English, id


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_make_ovcoco_and_eval_coco(tmp_path, capsys) -> None:
    src = _write(tmp_path / "instances_val2017.json", _official_like())
    assert main(["make-ovcoco", "--instances", str(src), "--split", "val", "--output", str(tmp_path / "ov")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["output"] == str(tmp_path / "ov" / "ovcoco_val2017.json") and summary["categories"] == 65

    gt = toyworld.write_detection_set(tmp_path / "toy", 6, seed=1, image_size=64)
    data = json.loads(gt.read_text(encoding="utf-8"))
    results = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.5}
        for a in data["annotations"]
    ]
    res_path = _write(tmp_path / "results.json", results)  # type: ignore[arg-type]
    assert main(["eval-coco", "--ground-truth", str(gt), "--results", str(res_path)]) == 0
    out = capsys.readouterr().out
    metrics = json.loads(out)  # stdout holds only the JSON (pycocotools' prints are captured)
    assert metrics["AP"] == 1.0 and metrics["AP50_novel"] in (1.0, -1.0) and metrics["num_detections"] == len(results)
    assert set(metrics["per_category"]) == {c["name"] for c in data["categories"]}

    metrics_path = tmp_path / "metrics.json"
    assert (
        main(
            [
                "eval-coco",
                "--ground-truth",
                str(gt),
                "--results",
                str(res_path),
                "--output",
                str(metrics_path),
                "--base",
                "1,2,红色三角形",
                "--novel",
                "4",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out == ""
    written = json.loads(metrics_path.read_text(encoding="utf-8"))
    assert written["num_base"] == 3 and written["num_novel"] == 1


def test_cli_errors_are_one_line(tmp_path, capsys) -> None:
    gt = toyworld.write_detection_set(tmp_path / "toy", 3, seed=1, image_size=64)
    bad = _write(tmp_path / "results.json", [{"image_id": 999, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 1}])  # type: ignore[arg-type]
    assert main(["eval-coco", "--ground-truth", str(gt), "--results", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("cnclip eval-coco: error:") and "999" in err and "results.json" in err
    assert main(["eval-coco", "--ground-truth", str(tmp_path / "none.json"), "--results", str(bad)]) == 2
    assert "none.json" in capsys.readouterr().err
    assert main(["make-ovcoco", "--instances", str(gt), "--split", "train", "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "cnclip make-ovcoco: error:" in err and "are missing" in err


def test_category_lookup_priority():
    """One lookup for training selection and evaluation splits: a category's own name beats another's English
    name, which beats a synonym (earlier the two readers gave opposite answers when names collided)."""
    from cnclip_vision.detection.coco import category_lookup, resolve_categories

    records = [
        {"id": 1, "name": "伞", "english_name": "umbrella", "synonyms": ["雨伞"]},
        {"id": 2, "name": "雨伞", "english_name": "parasol", "synonyms": ["伞", "umbrella"]},
    ]
    lookup = category_lookup(records)
    assert lookup["伞"] == 1 and lookup["雨伞"] == 2  # own names win over the other's synonyms
    assert lookup["umbrella"] == 1 and lookup["parasol"] == 2 and lookup[2] == 2
    assert resolve_categories([" 伞 ", 2, "猫"], lookup, "categories") == ([1, 2], ["猫"])
    with pytest.raises(TypeError, match="single string"):
        resolve_categories("伞", lookup, "categories")
