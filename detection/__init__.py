"""Open-vocabulary detection with Chinese labels (``cnclip_vision.detection``).

>>> from cnclip_vision.detection import OpenVocabDetector
>>> detector = OpenVocabDetector.from_pretrained("toy-detector")     # or a directory from train-detector
>>> detector.predict(["street.jpg"], ["猫", "狗", "电动车"])
[{'boxes': tensor([[x1, y1, x2, y2], ...]), 'scores': ..., 'labels': ..., 'label_names': [...]}]

Also: COCO data with Chinese names and the OV-COCO split (:mod:`.coco`, :mod:`.coco_names`), COCO / OV-COCO
evaluation (:mod:`.evaluation`, :func:`evaluate_detector`), training (:mod:`.train`), pictures
(:mod:`.visualize`) and similarity heat maps (:mod:`.heatmap`).
"""

from .coco import CocoDetection, CocoFormatError, collate_detection, convert_ovcoco, lsj_transforms, validate_coco
from .coco_names import COCO_CATEGORIES, OVCOCO_BASE_IDS, OVCOCO_NOVEL_IDS, chinese_name, read_name_map
from .evaluation import COCOEvaluator, evaluate_coco
from .heatmap import similarity_map
from .inference import detect_coco, evaluate_detector
from .model import VLM_MODES, DetectorConfig, ImageQuery, OpenVocabDetector, Vocabulary
from .visualize import draw_detections, find_cjk_font, heatmap_overlay

__all__ = [
    "COCOEvaluator",
    "COCO_CATEGORIES",
    "CocoDetection",
    "CocoFormatError",
    "DetectorConfig",
    "ImageQuery",
    "OVCOCO_BASE_IDS",
    "OVCOCO_NOVEL_IDS",
    "OpenVocabDetector",
    "VLM_MODES",
    "Vocabulary",
    "chinese_name",
    "collate_detection",
    "convert_ovcoco",
    "detect_coco",
    "draw_detections",
    "evaluate_coco",
    "evaluate_detector",
    "find_cjk_font",
    "heatmap_overlay",
    "lsj_transforms",
    "read_name_map",
    "similarity_map",
    "validate_coco",
]
