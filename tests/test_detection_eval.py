"""COCO evaluation: our figures equal pycocotools' own on the same files (the detectron2 check), the OV-COCO
per-split AP50 matches a direct reading of ``eval["precision"]``, and every bad input is caught."""

from __future__ import annotations

import contextlib
import copy
import io
import json

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from cnclip_vision.detection.coco import CocoFormatError
from cnclip_vision.detection.evaluation import COCOEvaluator, evaluate_coco
from cnclip_vision.toy import world as toyworld

SUMMARY_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


@pytest.fixture(scope="module")
def gt() -> dict:
    """60 toy images with small, medium and large objects; not every one of the 64 classes occurs."""
    data = toyworld.detection_set(60, seed=7, image_size=256, objects=(2, 5), radius=(6, 60))
    areas = [a["area"] for a in data["annotations"]]
    assert min(areas) < 32**2 and max(areas) > 96**2  # all three COCO area ranges are populated
    assert len({a["category_id"] for a in data["annotations"]}) < 64
    return data


def _noisy_results(gt: dict, seed: int = 0, *, fp_per_image: int = 4) -> list[dict]:
    """Detections: most boxes found with jitter (some with the wrong class), plus random false positives."""
    rng = np.random.default_rng(seed)
    cats = [c["id"] for c in gt["categories"]]
    results = []
    for a in gt["annotations"]:
        if rng.random() < 0.15:
            continue
        x, y, w, h = a["bbox"]
        dx, dy, dw, dh = rng.normal(0, 0.12, 4) * [w, h, w, h]
        cat = a["category_id"] if rng.random() > 0.1 else int(rng.choice(cats))
        results.append(
            {
                "image_id": a["image_id"],
                "category_id": cat,
                "score": float(rng.random()),
                "bbox": [float(x + dx), float(y + dy), float(max(1, w + dw)), float(max(1, h + dh))],
            }
        )
    for img in gt["images"]:
        for _ in range(int(rng.integers(0, fp_per_image + 1))):
            x, y = rng.uniform(0, 200, 2)
            w, h = rng.uniform(5, 80, 2)
            results.append(
                {
                    "image_id": img["id"],
                    "category_id": int(rng.choice(cats)),
                    "score": float(rng.random() * 0.8),
                    "bbox": [float(x), float(y), float(w), float(h)],
                }
            )
    return results


def _pycocotools(gt: dict, results: list[dict], *, max_dets=(1, 10, 100), image_ids=None) -> COCOeval:
    """pycocotools used directly, the way its README does."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(copy.deepcopy(results))
        e = COCOeval(coco_gt, coco_dt, "bbox")
        e.params.maxDets = list(max_dets)
        if image_ids is not None:
            e.params.imgIds = image_ids
        e.evaluate()
        e.accumulate()
        if len(max_dets) == 3:  # summarize() indexes maxDets[2]
            e.summarize()
    return e


def _split_ap50(e: COCOeval, category_ids) -> float:
    ks = [e.params.catIds.index(c) for c in category_ids]
    s = e.eval["precision"][0, :, ks, 0, -1]
    s = s[s > -1]
    return float(np.mean(s)) if s.size else -1.0


# ------------------------------------------------------------------------------------ parity
def test_figures_equal_pycocotools(gt, tmp_path) -> None:
    results = _noisy_results(gt)
    reference = _pycocotools(gt, results)
    gt_path, res_path = tmp_path / "gt.json", tmp_path / "results.json"
    gt_path.write_text(json.dumps(gt, ensure_ascii=False), encoding="utf-8")
    res_path.write_text(json.dumps(results), encoding="utf-8")
    for ours in (evaluate_coco(gt, results), evaluate_coco(gt_path, res_path)):
        assert [ours[k] for k in SUMMARY_KEYS] == reference.stats[:6].tolist()  # exactly
        assert ours["AR"] == reference.stats[8]
        assert 0.2 < ours["AP"] < 0.9 and ours["APl"] > 0  # a non-trivial result
        assert ours["num_images"] == 60 and ours["num_detections"] == len(results)

        base = [c["id"] for c in gt["categories"] if c["split"] == "base"]
        novel = [c["id"] for c in gt["categories"] if c["split"] == "novel"]
        assert ours["num_base"] == len(base) and ours["num_novel"] == len(novel)
        assert ours["AP50_base"] == pytest.approx(_split_ap50(reference, base), rel=1e-12, abs=0)
        assert ours["AP50_novel"] == pytest.approx(_split_ap50(reference, novel), rel=1e-12, abs=0)
        assert ours["AP50_all"] == pytest.approx(_split_ap50(reference, base + novel), rel=1e-12, abs=0)
        assert ours["AP50_all"] == pytest.approx(ours["AP50"], rel=1e-12)  # every class is base or novel here
        names = {c["id"]: c["name"] for c in gt["categories"]}
        for cid in reference.params.catIds:
            assert ours["AP50_per_category"][names[cid]] == pytest.approx(
                _split_ap50(reference, [cid]), rel=1e-12, abs=0
            )
        absent = {c["id"] for c in gt["categories"]} - {a["category_id"] for a in gt["annotations"]}
        assert absent and all(ours["per_category"][names[c]] == -1.0 for c in absent)
        assert all(0 <= ours["per_category"][names[c]] <= 1 for c in set(names) - absent)


def test_explicit_splits_by_id_and_name(gt) -> None:
    results = _noisy_results(gt, seed=1)
    reference = _pycocotools(gt, results)
    novel = [c for c in gt["categories"] if c["split"] == "novel"][:5]
    base = [c for c in gt["categories"] if c["split"] == "base"][:9]
    ours = evaluate_coco(gt, results, novel=[c["name"] for c in novel], base=[c["id"] for c in base])
    assert ours["num_novel"] == 5 and ours["num_base"] == 9
    assert ours["AP50_novel"] == pytest.approx(_split_ap50(reference, [c["id"] for c in novel]), rel=1e-12, abs=0)
    assert ours["AP50_base"] == pytest.approx(_split_ap50(reference, [c["id"] for c in base]), rel=1e-12, abs=0)
    both = sorted(c["id"] for c in novel + base)
    assert ours["AP50_all"] == pytest.approx(_split_ap50(reference, both), rel=1e-12, abs=0)


def test_without_split_information(gt) -> None:
    plain = {**gt, "categories": [{"id": c["id"], "name": c["name"]} for c in gt["categories"]]}
    ours = evaluate_coco(plain, _noisy_results(gt))
    assert ours["AP50_base"] == ours["AP50_novel"] == ours["AP_base"] == ours["AP_novel"] == -1.0
    assert ours["num_base"] == ours["num_novel"] == 0
    assert ours["AP50_all"] == pytest.approx(ours["AP50"], rel=1e-12)


def test_max_dets_is_honoured(gt) -> None:
    results = _noisy_results(gt, seed=2)
    # 12 higher-scored misses of the same image and class before some true boxes (pycocotools applies
    # maxDets per image and class)
    for a in gt["annotations"][::3]:
        results += [
            {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": [0.0, 0.0, 2.0, 2.0], "score": 1.0}
            for _ in range(12)
        ]
    reference = _pycocotools(gt, results, max_dets=(1, 10, 300))
    assert reference.stats[0] == -1, "pycocotools' summarize() silently assumes maxDets 100"
    ours = evaluate_coco(gt, results, max_dets=300)
    s = reference.eval["precision"][:, :, :, 0, 2]
    assert ours["AP"] == float(np.mean(s[s > -1])) and ours["max_dets"] == 300
    at_10 = evaluate_coco(gt, results, max_dets=10)
    ref_10 = _pycocotools(gt, results, max_dets=(1, 10))
    s = ref_10.eval["precision"][:, :, :, 0, 1]
    assert at_10["AP"] == float(np.mean(s[s > -1]))
    assert at_10["AP"] < evaluate_coco(gt, results)["AP"] == ours["AP"]
    with pytest.raises(ValueError, match="max_dets"):
        evaluate_coco(gt, results, max_dets=0)


def test_image_subset(gt) -> None:
    results = _noisy_results(gt, seed=3)
    subset = [img["id"] for img in gt["images"][:20]]
    reference = _pycocotools(gt, [r for r in results if r["image_id"] in subset], image_ids=subset)
    ours = evaluate_coco(gt, results, image_ids=subset)
    assert [ours[k] for k in SUMMARY_KEYS] == reference.stats[:6].tolist() and ours["num_images"] == 20
    with pytest.raises(CocoFormatError, match=r"image_ids \[12345\]"):
        evaluate_coco(gt, results, image_ids=[12345])
    with pytest.raises(ValueError, match="empty"):
        evaluate_coco(gt, results, image_ids=[])


# ---------------------------------------------------------------------------------- pitfalls
def test_empty_results(gt) -> None:
    ours = evaluate_coco(gt, [])
    assert [ours[k] for k in SUMMARY_KEYS] == [0.0] * 6 and ours["AR"] == 0.0
    assert ours["AP50_base"] == ours["AP50_novel"] == ours["AP50_all"] == 0.0 and ours["num_detections"] == 0
    assert all(np.isfinite(v) for v in ours["per_category"].values())
    json.dumps(ours, allow_nan=False)  # no NaN anywhere
    no_gt = {**gt, "annotations": []}
    ours = evaluate_coco(no_gt, [])
    assert [ours[k] for k in SUMMARY_KEYS] == [-1.0] * 6


def test_ground_truth_without_info_area_iscrowd(gt) -> None:
    results = _noisy_results(gt, seed=4)
    bare = {
        "images": gt["images"],
        "categories": gt["categories"],
        "annotations": [{k: v for k, v in a.items() if k not in ("area", "iscrowd")} for a in gt["annotations"]],
    }
    before = copy.deepcopy(bare)
    ours = evaluate_coco(bare, results)
    assert bare == before, "the caller's dict is not modified"
    assert [ours[k] for k in SUMMARY_KEYS] == _pycocotools(gt, results).stats[:6].tolist()  # toy area == box area


def test_results_are_not_mutated_and_output_is_written(gt, tmp_path) -> None:
    results = _noisy_results(gt, seed=5)
    before = copy.deepcopy(results)
    out = tmp_path / "sub" / "detections.json"
    evaluate_coco(gt, results, output=out)
    assert results == before, "pycocotools' loadRes adds keys to its input; we pass copies"
    assert json.loads(out.read_text(encoding="utf-8")) == before
    assert [p.name for p in out.parent.iterdir()] == ["detections.json"]


def test_stdout_stays_clean(gt, capsys) -> None:
    evaluate_coco(gt, _noisy_results(gt))
    evaluate_coco(gt, [])
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda r: r[3].update(image_id=4242),
            r"results: 1 detections have image ids that are not in ground truth: \[4242\]",
        ),
        (lambda r: r[0].update(category_id=77), r"category ids that are not in ground truth: \[77\]"),
        (lambda r: r[2].pop("score"), r"results\[2\] has no 'score'"),
        (lambda r: r[1].update(bbox=[1, 2, 3]), r"results\[1\]\['bbox'\] must be \[x, y, width, height\]"),
        (lambda r: r[1].update(bbox=[10, 10, 5, -4]), r"results\[1\]\['bbox'\] .* negative width or height"),
        (lambda r: r[0].update(score=float("nan")), r"results\[0\]\['score'\] must be a finite number"),
        (lambda r: r[0].update(image_id="1"), r"results\[0\]\['image_id'\] must be an integer"),
        (lambda r: r[0].update(category_id=True), r"results\[0\]\['category_id'\] must be an integer"),
        (lambda r: r.__setitem__(4, [1, 2]), r"results\[4\] must be an object"),
    ],
)
def test_bad_results(gt, change, message) -> None:
    results = _noisy_results(gt)
    change(results)
    with pytest.raises(CocoFormatError, match=message):
        evaluate_coco(gt, results)


def test_bad_files_and_arguments(gt, tmp_path) -> None:
    results = _noisy_results(gt)
    (tmp_path / "dict.json").write_text("{}", encoding="utf-8")
    with pytest.raises(CocoFormatError, match=r"dict\.json: expected a JSON list"):
        evaluate_coco(gt, tmp_path / "dict.json")
    (tmp_path / "broken.json").write_text("[\n{", encoding="utf-8")
    with pytest.raises(CocoFormatError, match=r"broken\.json:2: invalid JSON"):
        evaluate_coco(gt, tmp_path / "broken.json")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        evaluate_coco(gt, tmp_path / "missing.json")
    with pytest.raises(FileNotFoundError, match="missing_gt.json"):
        evaluate_coco(tmp_path / "missing_gt.json", results)
    with pytest.raises(TypeError):
        evaluate_coco(gt, {"image_id": 1})  # type: ignore[arg-type]
    bad_gt = copy.deepcopy(gt)
    del bad_gt["images"][3]["height"]
    with pytest.raises(CocoFormatError, match=r"images\[3\] has no 'height'"):
        evaluate_coco(bad_gt, results)
    with pytest.raises(ValueError, match="only 'bbox'"):
        evaluate_coco(gt, results, iou_type="segm")
    with pytest.raises(CocoFormatError, match=r"novel categories \['独角兽'\]"):
        evaluate_coco(gt, results, novel=["独角兽"])
    with pytest.raises(ValueError, match=r"both base and novel"):
        evaluate_coco(gt, results, novel=[1, 2], base=[2, 3])


# ------------------------------------------------------------------------------ COCOEvaluator
def _predictions(gt: dict, results: list[dict], category_ids: list[int]) -> dict[int, dict[str, torch.Tensor]]:
    label = {c: i for i, c in enumerate(category_ids)}
    out = {}
    for img in gt["images"]:
        rows = [r for r in results if r["image_id"] == img["id"]]
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (r["bbox"] for r in rows)], dtype=torch.float32)
        out[img["id"]] = {
            "boxes": boxes.reshape(-1, 4),
            "scores": torch.tensor([r["score"] for r in rows]),
            "labels": torch.tensor([label[r["category_id"]] for r in rows], dtype=torch.int64),
        }
    return out


def test_evaluator_matches_evaluate_coco(gt, tmp_path) -> None:
    results = _noisy_results(gt, seed=6)
    expected = evaluate_coco(gt, results)
    for category_ids in (None, sorted({c["id"] for c in gt["categories"]}, reverse=True)):
        evaluator = COCOEvaluator(gt, category_ids)
        preds = _predictions(gt, results, evaluator.category_ids)
        ids = list(preds)
        for start in range(0, len(ids), 16):
            batch = ids[start : start + 16]
            evaluator.process(batch, [preds[i] for i in batch])
        got = evaluator.evaluate(output=tmp_path / "dets.json")
        for key in (*SUMMARY_KEYS, "AP50_base", "AP50_novel", "AP50_all", "num_images", "num_detections"):
            assert got[key] == pytest.approx(expected[key], abs=1e-6), key  # boxes went through float32
    assert len(json.loads((tmp_path / "dets.json").read_text(encoding="utf-8"))) == len(results)

    evaluator.reset()
    with pytest.raises(ValueError, match="nothing to evaluate"):
        evaluator.evaluate()
    first = list(preds)[:10]
    evaluator.process(first, [preds[i] for i in first])
    partial = evaluator.evaluate()
    assert partial["num_images"] == 10
    assert partial["AP"] == pytest.approx(evaluate_coco(gt, results, image_ids=first)["AP"], abs=1e-6)


def test_evaluator_bad_input(gt) -> None:
    evaluator = COCOEvaluator(gt)
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}
    one = {"boxes": torch.tensor([[1.0, 2, 30, 40]]), "scores": torch.tensor([0.9]), "labels": torch.tensor([64])}
    with pytest.raises(ValueError, match=r"labels must be in \[0, 64\)"):
        evaluator.process([1], [one])
    with pytest.raises(ValueError, match="2 image ids but 1 predictions"):
        evaluator.process([1, 2], [empty])
    with pytest.raises(CocoFormatError, match="image id 999"):
        evaluator.process([999], [empty])
    with pytest.raises(ValueError, match=r"has no \['scores'\]"):
        evaluator.process([1], [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0)}])
    with pytest.raises(ValueError, match="1 boxes, 2 scores"):
        evaluator.process([1], [{**one, "labels": torch.tensor([0]), "scores": torch.tensor([0.1, 0.2])}])
    with pytest.raises(CocoFormatError, match=r"category_ids \[100\]"):
        COCOEvaluator(gt, [1, 100])
    evaluator.process([1, 2], [empty, empty])  # images without detections still count
    got = evaluator.evaluate()
    assert got["num_images"] == 2 and got["num_detections"] == 0 and got["AP"] == 0.0


# ------------------------------------------------------------------ evaluation that cannot mislead
def test_results_in_xyxy_are_refused_with_the_reason(gt) -> None:
    xywh = _noisy_results(gt)
    evaluate_coco(gt, xywh)  # the right format passes the check
    xyxy = [
        {**r, "bbox": [r["bbox"][0], r["bbox"][1], r["bbox"][0] + r["bbox"][2], r["bbox"][1] + r["bbox"][3]]}
        for r in xywh
    ]
    with pytest.raises(CocoFormatError, match=r"look like \[x1, y1, x2, y2\]"):
        evaluate_coco(gt, xyxy)


@pytest.fixture(scope="module")
def toy_scenes(tmp_path_factory):
    from cnclip_vision.cli import main

    root = tmp_path_factory.mktemp("eval_missing")
    assert main(["-q", "toy-data", "detection", str(root), "--n", "6", "--seed", "11", "--image-size", "128"]) == 0
    return root


def test_missing_images_refuse_ap_unless_allowed(toy_scenes, tmp_path, capsys) -> None:
    import shutil

    from cnclip_vision.cli import main

    data = tmp_path / "data"
    shutil.copytree(toy_scenes, data)
    annotations = data / "annotations.json"
    files = [img["file_name"] for img in json.loads(annotations.read_text())["images"]]
    capsys.readouterr()
    base = ["eval-coco", "--ground-truth", str(annotations), "--detector", "toy-detector", "--device", "cpu"]
    assert main(base) == 0
    complete = json.loads(capsys.readouterr().out)
    assert (complete["images_evaluated"], complete["images_missing"], complete["images_unreadable"]) == (6, 0, 0)

    assert main([*base, "--image-root", str(tmp_path / "nowhere")]) == 2
    assert "none of the 6 ground-truth images could be read" in capsys.readouterr().err

    (data / "images" / files[0]).unlink()  # one missing ...
    (data / "images" / files[1]).write_bytes(b"not a png")  # ... one unreadable
    assert main(base) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "2 of 6 ground-truth images were not evaluated (1 missing, 1 unreadable" in err and "--allow-missing" in err

    assert main([*base, "--allow-missing"]) == 0
    partial = json.loads(capsys.readouterr().out)
    assert (partial["images_evaluated"], partial["images_missing"], partial["images_unreadable"]) == (4, 1, 1)
    assert "4 evaluated images only" in partial["evaluated_on"]
    assert partial["num_images"] == 4
