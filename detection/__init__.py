"""Open-vocabulary detection with Chinese labels (``cnclip_vision.detection``).

The detector, its COCO data tools and evaluation land here; see the project's detector issue.
"""

__all__: list[str] = []
