"""The detector of the toy world: its data, its measured quality (OV-COCO in miniature) and the shipped copy.

Training data: 128 px scenes of 3-6 coloured shapes with only the 48 base categories annotated (novel
objects stay in the images, unlabelled, as in OV-COCO). Evaluation: freshly generated scenes with all 64
categories annotated and scored together (the generalized protocol), AP50 on base / novel / all.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from cnclip_vision.backbones.dense import DenseMode
from cnclip_vision.detection.model import OpenVocabDetector
from cnclip_vision.detection.vocabulary import VLM_MODES, VLMMode, Vocabulary, check_vlm_mode
from cnclip_vision.models.configs import ASSETS_DIR, TOY_DETECTOR_DIR, TOY_DETECTORS
from cnclip_vision.toy import world as toyworld

logger = logging.getLogger(__name__)

__all__ = [
    "TOY_DETECTOR_DIR",
    "DETECTOR_QUALITY_BARS",
    "write_toy_detection_data",
    "novel_split",
    "protocol_of",
    "protocol_of_detector",
    "evaluate_toy_detector",
    "export_toy_detector",
]

DETECTOR_QUALITY_BARS = {"AP50_base": 0.7, "AP50_novel": 0.4}


def write_toy_detection_data(
    root: str | os.PathLike[str],
    *,
    n_train: int = 4000,
    n_val: int = 500,
    seed: int = 0,
    val_seed: int = 777,
    protocol: str = "compositional",
) -> dict[str, Path]:
    """``root/train`` (the protocol's base categories annotated, novel objects unlabelled) and ``root/val``
    (all 64, another seed), with each category's ``"split"`` from ``protocol``
    (:func:`~cnclip_vision.toy.world.protocol_split`); COCO files (a count of 0 skips that split)."""
    base, novel = toyworld.protocol_split(protocol)
    root = Path(root)
    out = {}
    if n_train:
        out["train"] = toyworld.write_detection_set(root / "train", n_train, seed, annotate=base, novel=novel)
    if n_val:
        out["val"] = toyworld.write_detection_set(root / "val", n_val, val_seed, novel=novel)
    return out


def random_novel_vocabulary(vocabulary: Vocabulary, novel: set[str], seed: int = 0) -> Vocabulary:
    """A copy of ``vocabulary`` whose novel classes have random unit vectors instead of text embeddings."""
    g = torch.Generator().manual_seed(seed)
    embeddings = vocabulary.embeddings.clone()
    rows = [i for i, n in enumerate(vocabulary.names) if n in novel]
    embeddings[rows] = F.normalize(torch.randn(len(rows), embeddings.shape[1], generator=g), dim=-1).to(embeddings)
    return Vocabulary(list(vocabulary.names), embeddings, vocabulary.seen.clone())


def novel_split(annotation_file: str | os.PathLike[str]) -> set[str]:
    """Names of the categories a toy COCO file marks ``"split": "novel"`` (an error if there are none)."""
    from cnclip_vision.detection.coco import read_coco

    categories = read_coco(annotation_file).get("categories", [])
    novel = {c["name"] for c in categories if c.get("split") == "novel"}
    if not novel:
        raise ValueError(f'{annotation_file}: no category has "split": "novel"; write it with toy-data detection')
    return novel


def protocol_of(novel: set[str]) -> str:
    """The :data:`~cnclip_vision.toy.world.PROTOCOLS` entry whose novel categories are ``novel``, else ``"custom"``."""
    return next((k for k, v in toyworld.PROTOCOLS.items() if {c.name for c in v} == novel), "custom")


def evaluate_toy_detector(
    detector: OpenVocabDetector,
    annotation_file: str | os.PathLike[str],
    *,
    modes: tuple[VLMMode, ...] = VLM_MODES,
    random_novel: bool = True,
    progress: bool = False,
    dense_modes: Sequence[DenseMode] = (),
    dense_seed: int = 777,
) -> dict[str, Any]:
    """AP50 base / novel / all for each VLM mode, and with the novel text embeddings replaced by random
    vectors (default mode): novel AP50 must collapse if novel detection comes from the text encoder. The
    split is the file's (``"split"`` of each category: the protocol it was written for); a detector trained on
    boxes of a novel category is refused. With
    ``dense_modes``, also the ``dense`` branch with each last-block variant (``report["dense_modes"]``), with
    the patch-level accuracy of the CLIP's dense tokens on 100 fresh scenes of ``dense_seed``
    (:func:`~cnclip_vision.toy.dense.evaluate_dense_alignment`)."""
    from cnclip_vision.detection.evaluation import evaluate_coco
    from cnclip_vision.detection.inference import detect_coco

    novel = novel_split(annotation_file)
    leaked = sorted(novel & set(detector.config.seen_categories))
    if leaked:
        raise ValueError(
            f"the detector was trained on boxes of {len(leaked)} categories that {annotation_file} marks novel "
            f"({', '.join(leaked[:4])}{', ...' if len(leaked) > 4 else ''}): its novel AP50 would measure nothing; "
            "evaluate it on data of the protocol it was trained for"
        )
    report: dict[str, Any] = {
        "protocol": protocol_of(novel),
        "novel_categories": sorted(novel),
        "default_mode": detector.config.vlm_mode,
        "modes": {},
    }
    keys = ("AP", "AP50", "AP50_base", "AP50_novel", "AP50_all")
    for mode in modes:
        results, dataset = detect_coco(detector, annotation_file, vlm_mode=mode, progress=progress)
        metrics = evaluate_coco(dataset.coco, results)
        report["modes"][mode] = {k: metrics[k] for k in keys}
        logger.info("toy detector, VLM %s: %s", mode, report["modes"][mode])
    if random_novel:
        results, dataset = detect_coco(
            detector,
            annotation_file,
            progress=progress,
            vocabulary_transform=lambda v: random_novel_vocabulary(v, novel),
        )
        metrics = evaluate_coco(dataset.coco, results)
        report["random_novel_embeddings"] = {k: metrics[k] for k in keys}
        logger.info("toy detector, random novel text embeddings: %s", report["random_novel_embeddings"])
    if dense_modes:
        from cnclip_vision.toy.dense import evaluate_dense_alignment

        alignment = evaluate_dense_alignment(detector.clip, modes=dense_modes, seed=dense_seed)["modes"]
        report["dense_modes"] = {}
        for dense_mode in dense_modes:
            results, dataset = detect_coco(
                detector, annotation_file, vlm_mode="dense", dense_mode=dense_mode, progress=progress
            )
            metrics = evaluate_coco(dataset.coco, results)
            report["dense_modes"][dense_mode] = {
                **{k: metrics[k] for k in keys},
                "patch_accuracy": alignment[dense_mode]["patch_accuracy"],
            }
            logger.info("toy detector, dense mode %s: %s", dense_mode, report["dense_modes"][dense_mode])
    default = report["modes"].get(detector.config.vlm_mode)
    if default is not None:
        report["passes"] = all(default[k] >= v for k, v in DETECTOR_QUALITY_BARS.items())
    report["bars"] = DETECTOR_QUALITY_BARS
    return report


def protocol_of_detector(detector: OpenVocabDetector) -> str | None:
    """The protocol whose base categories are exactly the detector's seen categories, else None."""
    seen = set(detector.config.seen_categories)
    names = {c.name for c in toyworld.CATEGORIES}
    protocol = protocol_of(names - seen) if seen <= names else "custom"
    return None if protocol == "custom" else protocol


def export_toy_detector(
    directory: str | os.PathLike[str],
    destination: str | os.PathLike[str] | None = None,
    *,
    vlm_mode: VLMMode | None = None,
) -> Path:
    """Store a trained toy detector (half-precision weights, ``clip`` = ``toy-tiny``) in the package, as the
    shipped detector of the protocol it was trained for (``TOY_DETECTORS``, found from its seen categories);
    ``vlm_mode`` replaces its default VLM branch (an inference setting, chosen from its evaluation)."""
    detector = OpenVocabDetector.from_pretrained(directory)
    if vlm_mode is not None:
        check_vlm_mode(vlm_mode)
        detector.config.vlm_mode = vlm_mode
    if detector.config.clip != "toy-tiny":
        raise ValueError(f"{directory} sits on {detector.config.clip!r}, not on the toy model 'toy-tiny'")
    protocol = protocol_of_detector(detector)
    if destination is None and protocol is None:
        raise ValueError(
            f"{directory} was trained on {len(detector.config.seen_categories)} categories that are the base "
            f"categories of no protocol ({', '.join(toyworld.PROTOCOLS)}); give a destination"
        )
    out = Path(destination) if destination else ASSETS_DIR / TOY_DETECTORS[protocol or "compositional"]
    detector.save_pretrained(out, half=True)
    logger.info("exported the toy detector to %s", out)
    return out
