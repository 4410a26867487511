"""Open-vocabulary detection with Chinese labels (``cnclip_vision.detection``).

>>> from cnclip_vision.detection import OpenVocabDetector
>>> detector = OpenVocabDetector.from_pretrained("toy-detector")     # or a directory from train-detector
>>> detector.predict(["street.jpg"], ["猫", "狗", "电动车"])
[{'boxes': tensor([[x1, y1, x2, y2], ...]), 'scores': ..., 'labels': ..., 'label_names': [...]}]

Also: COCO data with Chinese names and the OV-COCO split (:mod:`.coco`, :mod:`.coco_names`), COCO / OV-COCO
evaluation (:mod:`.evaluation`, :func:`evaluate_detector`), training (:mod:`.train`), pictures
(:mod:`.visualize`), similarity heat maps (:mod:`.heatmap`) and the ONNX export with the vocabulary as an
input (:mod:`.export`).
"""

from cnclip_vision._imports import lazy_exports

_EXPORTS = {
    "CocoDetection": "cnclip_vision.detection.coco",
    "CocoFormatError": "cnclip_vision.detection.coco",
    "collate_detection": "cnclip_vision.detection.coco",
    "convert_ovcoco": "cnclip_vision.detection.coco",
    "lsj_transforms": "cnclip_vision.detection.coco",
    "validate_coco": "cnclip_vision.detection.coco",
    "COCO_CATEGORIES": "cnclip_vision.detection.coco_names",
    "OVCOCO_BASE_IDS": "cnclip_vision.detection.coco_names",
    "OVCOCO_NOVEL_IDS": "cnclip_vision.detection.coco_names",
    "chinese_name": "cnclip_vision.detection.coco_names",
    "read_name_map": "cnclip_vision.detection.coco_names",
    "COCOEvaluator": "cnclip_vision.detection.evaluation",
    "evaluate_coco": "cnclip_vision.detection.evaluation",
    "similarity_map": "cnclip_vision.detection.heatmap",
    "OnnxDetector": "cnclip_vision.detection.export",
    "export_detector_onnx": "cnclip_vision.detection.export",
    "detect_coco": "cnclip_vision.detection.inference",
    "evaluate_detector": "cnclip_vision.detection.inference",
    "VLM_MODES": "cnclip_vision.detection.vocabulary",
    "DetectorConfig": "cnclip_vision.detection.model",
    "ImageQuery": "cnclip_vision.detection.vocabulary",
    "OpenVocabDetector": "cnclip_vision.detection.model",
    "Vocabulary": "cnclip_vision.detection.vocabulary",
    "DetectionPredictor": "cnclip_vision.detection.predictor",
    "draw_detections": "cnclip_vision.detection.visualize",
    "find_cjk_font": "cnclip_vision.detection.visualize",
    "heatmap_overlay": "cnclip_vision.detection.visualize",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
