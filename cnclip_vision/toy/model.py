"""The tiny Chinese-CLIP of the toy world ("toy-tiny"): its architecture, its quality measurement and
its export into the package. A model of the synthetic world only — not of real images."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from cnclip_vision.models.configs import TOY_CONFIG, TOY_MODEL_DIR

logger = logging.getLogger(__name__)

__all__ = ["TOY_CONFIG", "TOY_MODEL_DIR", "QUALITY_BARS", "evaluate_toy_model", "export_toy_model"]

QUALITY_BARS = {"zeroshot_top1": 0.90, "t2i_R@1": 0.50}


@torch.inference_mode()
def evaluate_toy_model(
    model: Any, *, seed: int = 12345, n_per_class: int = 20, n_retrieval: int = 1000, batch_size: int = 256
) -> dict[str, Any]:
    """Quality on freshly generated held-out data: zero-shot top-1 over all 64 colour x shape classes,
    top-1 on the colour x shape combinations never shown in pretraining, and strict text→image R@1 on
    ``n_retrieval`` caption/image pairs whose captions identify their image."""
    from cnclip_vision.models.encode import encode_texts
    from cnclip_vision.toy import world as toyworld
    from cnclip_vision.zeroshot import ZeroShotClassifier

    labels = [c.name for c in toyworld.CATEGORIES]
    clf = ZeroShotClassifier(model, labels, templates=toyworld.ZERO_SHOT_TEMPLATES)
    test = toyworld.classification_set(n_per_class, seed, image_size=model.image_size)
    pixels = _to_pixels(test.images, model.image_size)
    predicted = torch.cat([clf.scores(chunk).argmax(-1) for chunk in pixels.split(batch_size)])
    target = torch.tensor([labels.index(name) for name in test.labels])
    correct = predicted == target
    held_out = torch.tensor([name in {c.name for c in toyworld.HELD_OUT_COMBOS} for name in test.labels])

    pairs = toyworld.retrieval_set(n_retrieval, seed + 1, image_size=model.image_size)
    images = torch.cat(
        [
            model.encode_image(c, normalize=True).float()
            for c in _to_pixels(pairs.images, model.image_size).split(batch_size)
        ]
    )
    texts = encode_texts(model, pairs.captions, batch_size=batch_size)
    ranks = (texts @ images.t()).argmax(-1)
    report: dict[str, Any] = {
        "zeroshot_top1": float(correct.float().mean()),
        "zeroshot_top1_held_out_combos": float(correct[held_out].float().mean()),
        "held_out_combos": [c.name for c in toyworld.HELD_OUT_COMBOS],
        "t2i_R@1": float((ranks == torch.arange(n_retrieval)).float().mean()),
        "n_classification": len(target),
        "n_retrieval": n_retrieval,
        "seed": seed,
        "chance_top1": 1 / len(labels),
    }
    report["passes"] = all(report[k] >= v for k, v in QUALITY_BARS.items())
    return report


def _to_pixels(images: Any, size: int) -> torch.Tensor:
    from cnclip_vision.data.transforms import clip_normalize

    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255)
    if x.shape[-1] != size:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", antialias=True)
    return clip_normalize(x)


def export_toy_model(model_dir: str | os.PathLike[str], destination: str | os.PathLike[str] = TOY_MODEL_DIR) -> Path:
    """Store a trained toy model in half precision (loads back as fp32) where ``load("toy-tiny")`` finds it."""
    from cnclip_vision.models.factory import load

    model = load(model_dir)
    if model.config != TOY_CONFIG:
        raise ValueError(f"{model_dir} is not a toy-tiny model (config {model.config})")
    model.half().save_pretrained(destination)
    logger.info("exported the toy model to %s", destination)
    return Path(destination)
