"""Zero-shot image classification with Chinese class names.

Class embeddings are the normalised mean of the normalised text embeddings of every prompt template
filled with the class name (CLIP's prompt ensembling), computed once and cached; they can be saved so a
1,000-class vocabulary is not re-encoded every run.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from cnclip_vision.data.tokenizer import DEFAULT_CONTEXT_LENGTH, find_truncated
from cnclip_vision.data.transforms import ImageSource
from cnclip_vision.errors import CNClipError, UnreadableFolderError
from cnclip_vision.io import atomic_write
from cnclip_vision.models.clip import ChineseCLIP
from cnclip_vision.models.encode import encode_images, encode_texts

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_TEMPLATES",
    "SINGLE_TEMPLATE",
    "ZeroShotClassifier",
    "calibrate_threshold",
    "check_labels",
    "class_embeddings",
    "evaluate_folder",
    "read_label_file",
    "resolve_templates",
]

# Our own general-purpose Chinese prompts ("{}" is the class name).
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "{}",
    "一张{}的照片。",
    "{}的照片。",
    "一张{}的图片。",
    "一幅{}的图像。",
    "图中是{}。",
    "这是一张{}的照片。",
    "照片里有{}。",
    "画面中有一个{}。",
    "一张清晰的{}的照片。",
    "一张模糊的{}的照片。",
    "一张{}的特写照片。",
    "一张很小的{}的照片。",
    "一张很大的{}的照片。",
    "一张光线很暗的{}的照片。",
    "一张明亮的{}的照片。",
    "一张{}的黑白照片。",
    "一张裁剪过的{}的照片。",
    "一张{}的素描。",
    "一幅{}的画。",
    "一张{}的卡通图。",
    "一张{}的低分辨率照片。",
    "一个{}的渲染图。",
    "用手机拍的{}。",
    "网上的一张{}的图片。",
)
SINGLE_TEMPLATE: tuple[str, ...] = ("一张{}的照片。",)


def resolve_templates(templates: Sequence[str] | str) -> tuple[str, ...]:
    """A list of templates with ``{}``, or the name "default", "single" or "none"."""
    if isinstance(templates, str):
        named = {"default": DEFAULT_TEMPLATES, "single": SINGLE_TEMPLATE, "none": ("{}",)}
        if templates not in named:
            raise ValueError(
                f"templates must be a list of strings with '{{}}' or one of {sorted(named)}, got {templates!r}"
            )
        return named[templates]
    templates = tuple(templates)
    if not templates:
        raise ValueError("templates is empty")
    bad = [t for t in templates if not isinstance(t, str) or "{}" not in t]
    if bad:
        raise ValueError(f"every template needs a '{{}}' placeholder for the class name; these do not: {bad[:5]}")
    return templates


def check_labels(labels: Sequence[str], context_length: int = DEFAULT_CONTEXT_LENGTH) -> list[str]:
    """Validate class names: a non-empty list of distinct non-empty strings; warn about over-long ones."""
    if isinstance(labels, str) or not isinstance(labels, Sequence):
        raise TypeError(f"labels must be a list of strings, got {type(labels).__name__}")
    labels = list(labels)
    if not labels:
        raise ValueError("the label list is empty")
    for i, label in enumerate(labels):
        if not isinstance(label, str) or not label.strip():
            raise ValueError(f"labels[{i}] must be a non-empty string, got {label!r}")
    duplicates = [label for label, n in Counter(labels).items() if n > 1]
    if duplicates:
        raise ValueError(f"duplicate labels: {duplicates[:10]}; each class name must appear once")
    for i, text in find_truncated(labels, context_length):
        logger.warning("label %d (%r) is longer than the context length and is truncated", i, text)
    return labels


def class_embeddings(
    model: ChineseCLIP,
    labels: Sequence[str],
    templates: Sequence[str] | str = DEFAULT_TEMPLATES,
    *,
    batch_size: int = 256,
) -> torch.Tensor:
    """``[len(labels), embed_dim]`` normalised class embeddings on the CPU: every label filled into every
    template, encoded, averaged over the templates and normalised again (CLIP's prompt ensembling). The one
    place this is computed: zero-shot classification, the detector's vocabulary and heat maps use it."""
    names = resolve_templates(templates)
    prompts = [t.format(label) for label in labels for t in names]
    logger.info("encoding %d labels x %d templates", len(labels), len(names))
    features = encode_texts(model, prompts, batch_size=batch_size, progress=len(prompts) > 2000)
    mean = features.view(len(labels), len(names), -1).mean(dim=1)
    return torch.nn.functional.normalize(mean, dim=-1)


class ZeroShotClassifier:
    """Zero-shot classifier over a fixed list of Chinese class names.

    >>> clf = ZeroShotClassifier(model, ["猫", "狗", "兔子"])
    >>> clf.predict(["cat.jpg"], top_k=2)
    [{'labels': ['猫', '兔子'], 'indices': [0, 2], 'probs': [0.93, 0.05]}]
    """

    def __init__(
        self,
        model: ChineseCLIP,
        labels: Sequence[str],
        *,
        templates: Sequence[str] | str = DEFAULT_TEMPLATES,
        processor: Any = None,
        class_embeddings: torch.Tensor | None = None,
        batch_size: int = 256,
    ) -> None:
        self.model = model
        self.labels = check_labels(labels)
        self.templates = resolve_templates(templates)
        self.image_transform = processor.image_transform if processor is not None else None
        if class_embeddings is None:
            class_embeddings = self._encode_classes(batch_size)
        elif class_embeddings.shape != (len(self.labels), model.config.embed_dim):
            raise ValueError(
                f"class_embeddings has shape {tuple(class_embeddings.shape)}; expected "
                f"({len(self.labels)}, {model.config.embed_dim}) for {len(self.labels)} labels"
            )
        self.class_embeddings = class_embeddings.float()

    def _encode_classes(self, batch_size: int) -> torch.Tensor:
        return class_embeddings(self.model, self.labels, self.templates, batch_size=batch_size)

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().exp().clamp(max=100.0))

    def image_features(self, images: Sequence[ImageSource] | torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        if self.image_transform is not None and not isinstance(images, torch.Tensor):
            images = self.image_transform.batch(images)
        return encode_images(self.model, images, batch_size=batch_size)

    def scores(self, images: Sequence[ImageSource] | torch.Tensor) -> torch.Tensor:
        """Cosine similarity ``[num_images, num_labels]`` (images: raw or a preprocessed batch)."""
        return self.scores_from_features(self.image_features(images))

    def scores_from_features(self, image_features: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(image_features.float(), dim=-1) @ self.class_embeddings.t()

    def probabilities(self, cosine: torch.Tensor) -> torch.Tensor:
        """Softmax of ``exp(logit_scale) * cosine`` over the labels."""
        return (self.logit_scale * cosine).softmax(dim=-1)

    def predict(self, images: Sequence[ImageSource] | torch.Tensor, top_k: int = 5) -> list[dict[str, list]]:
        """Per image: the ``top_k`` labels, their indices and probabilities, best first."""
        return self.top_k(self.scores(images), top_k)

    def top_k(self, cosine: torch.Tensor, top_k: int = 5) -> list[dict[str, list]]:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        probs = self.probabilities(cosine)
        values, indices = probs.topk(min(top_k, len(self.labels)), dim=-1)
        return [
            {"labels": [self.labels[j] for j in row_i.tolist()], "indices": row_i.tolist(), "probs": row_p.tolist()}
            for row_p, row_i in zip(values, indices)
        ]

    # ------------------------------------------------------------------------------------- caching
    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the class embeddings with their labels and templates (safetensors, atomically)."""
        from safetensors.torch import save_file

        from cnclip_vision.models.identity import model_info

        info = model_info(self.model)
        metadata = {
            "labels": json.dumps(self.labels, ensure_ascii=False),
            "templates": json.dumps(list(self.templates), ensure_ascii=False),
            "embed_dim": str(self.model.config.embed_dim),
            "model": json.dumps({k: info[k] for k in ("description", "precision", "fingerprint", "source")}),
        }
        with atomic_write(path) as tmp:
            save_file({"class_embeddings": self.class_embeddings.contiguous()}, str(tmp), metadata=metadata)

    @classmethod
    def load(cls, path: str | os.PathLike[str], model: ChineseCLIP, *, processor: Any = None) -> ZeroShotClassifier:
        """A classifier from :meth:`save` output, without re-encoding any text. The file must have been written
        with ``model`` (same weights and precision, by fingerprint), else :class:`CNClipError`."""
        from safetensors import safe_open

        from cnclip_vision.models.identity import model_info

        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                embeddings = f.get_tensor("class_embeddings")
            labels, templates = json.loads(metadata["labels"]), json.loads(metadata["templates"])
            written_with = json.loads(metadata["model"]) if "model" in metadata else None
        except Exception as e:  # safetensors raises its own error type for corrupt files
            raise CNClipError(f"{path} is not a saved ZeroShotClassifier: {e}") from e
        if written_with is None:
            logger.warning("%s does not record the model that wrote it (an older file): not checked", path)
        else:
            info = model_info(model)
            if written_with.get("fingerprint") != info["fingerprint"]:
                raise CNClipError(
                    f"{path} holds class embeddings of another model or precision ({written_with.get('source')}, "
                    f"{written_with.get('precision')}) than {info['source']} ({info['precision']}); their scores "
                    "would mean nothing: delete it or load that model"
                )
        return cls(model, labels, templates=templates, processor=processor, class_embeddings=embeddings)

    # ----------------------------------------------------------------------------------- evaluation
    def evaluate(self, root: str | os.PathLike[str], **kwargs: Any) -> dict[str, Any]:
        """Accuracy on an ImageFolder tree whose class folder ``i`` holds images of ``self.labels[i]``
        (see :func:`evaluate_folder`)."""
        return evaluate_folder(self, root, **kwargs)


def read_label_file(path: str | os.PathLike[str]) -> list[str]:
    """One class name per line (``label_cn.txt``); line ``i`` names class folder ``i``."""
    path = Path(path)
    if not path.is_file():
        raise CNClipError(f"label file {path} does not exist")
    lines = path.read_text(encoding="utf-8").splitlines()
    labels = [ln.strip() for ln in lines]
    if not any(labels):
        raise CNClipError(f"label file {path} is empty")
    for i, label in enumerate(labels):
        if not label:
            raise CNClipError(f"{path}:{i + 1}: empty class name")
    return labels


def _class_folders(split_dir: Path, n_labels: int) -> list[tuple[int, Path]]:
    folders = []
    try:
        children = sorted(p for p in split_dir.iterdir() if p.is_dir())
    except OSError as e:
        raise UnreadableFolderError(f"cannot read the folder {split_dir}: {e.strerror or e}") from None
    for child in children:
        if not child.name.isdigit():
            raise CNClipError(f"{child}: class folders must be named by class index (000, 001, ...)")
        index = int(child.name)
        if index >= n_labels:
            raise CNClipError(f"{child}: class index {index} but the label file has only {n_labels} names")
        folders.append((index, child))
    if not folders:
        raise CNClipError(f"{split_dir} has no class folders (expected {split_dir}/000/..., {split_dir}/001/...)")
    return folders


def evaluate_folder(
    classifier: ZeroShotClassifier,
    root: str | os.PathLike[str],
    *,
    split: str = "test",
    batch_size: int = 64,
    num_workers: int | None = None,
    progress: bool = True,
    n_confusions: int = 20,
) -> dict[str, Any]:
    """Top-1 / top-5 accuracy, per-class accuracy and the most frequent confusions on
    ``root/{split}/{000,001,...}/*`` (the ELEVATER / Chinese-CLIP layout; ``root`` may also be the split
    folder itself). Unreadable images are reported, skipped and counted."""
    from cnclip_vision.data.images import iter_image_batches, list_images
    from cnclip_vision.data.transforms import image_transform

    root = Path(root)
    split_dir = root / split if (root / split).is_dir() else root
    folders = _class_folders(split_dir, len(classifier.labels))
    paths, targets = [], []
    for index, folder in folders:
        try:
            images = list_images(folder)
        except UnreadableFolderError:
            raise
        except CNClipError:
            logger.warning("class folder %s has no images", folder)
            continue
        paths += images
        targets += [index] * len(images)
    if not paths:
        raise CNClipError(f"no images found under {split_dir}")
    failures: list[dict[str, str]] = []
    transform = classifier.image_transform or image_transform(classifier.model.image_size)
    correct1: Counter[int] = Counter()
    correct5: Counter[int] = Counter()
    seen: Counter[int] = Counter()
    confusions: Counter[tuple[int, int]] = Counter()
    k = min(5, len(classifier.labels))
    for batch in iter_image_batches(
        paths,
        transform,
        batch_size=batch_size,
        num_workers=num_workers,
        device=classifier.model.device,
        progress=progress,
        desc="eval",
        on_failure=lambda p, r: failures.append({"path": str(p), "reason": r}),
    ):
        cosine = classifier.scores_from_features(encode_images(classifier.model, batch.pixel_values))
        top = cosine.topk(k, dim=-1).indices
        for row, i in zip(top.tolist(), batch.indices):
            target = targets[i]
            seen[target] += 1
            correct1[target] += row[0] == target
            correct5[target] += target in row
            if row[0] != target:
                confusions[(target, row[0])] += 1
    n = sum(seen.values())
    if n == 0:
        raise CNClipError(f"none of the {len(paths)} images under {split_dir} could be read")
    labels = classifier.labels
    return {
        "n_images": n,
        "n_skipped": len(failures),
        "n_classes": len(labels),
        "top1": sum(correct1.values()) / n,
        "top5": sum(correct5.values()) / n,
        "per_class": {
            labels[c]: {"n": seen[c], "top1": correct1[c] / seen[c], "top5": correct5[c] / seen[c]}
            for c in sorted(seen)
        },
        "confusions": [
            {"true": labels[t], "predicted": labels[p], "count": c}
            for (t, p), c in confusions.most_common(n_confusions)
        ],
        "skipped": failures,
        "templates": list(classifier.templates),
    }


def calibrate_threshold(
    cosine: Sequence[float] | torch.Tensor,
    related: Sequence[bool] | torch.Tensor,
    *,
    min_precision: float | None = None,
) -> dict[str, float]:
    """Pick an absolute cosine threshold for "is this image related to this text" from labelled pairs.

    Returns the threshold with the best F1 (or, with ``min_precision``, the lowest threshold whose
    precision reaches it, i.e. the best recall at that precision) and its precision, recall and F1.
    A pair is predicted related when ``cosine >= threshold``.
    """
    scores = torch.as_tensor(cosine, dtype=torch.float64).flatten()
    truth = torch.as_tensor(related, dtype=torch.bool).flatten()
    if scores.numel() != truth.numel() or scores.numel() == 0:
        raise ValueError(f"need as many labels as scores (got {truth.numel()} and {scores.numel()}), at least one")
    if truth.all() or not truth.any():
        raise ValueError("need both related and unrelated pairs to calibrate a threshold")
    order = scores.argsort(descending=True)
    scores, truth = scores[order], truth[order]
    tp = truth.cumsum(0).double()
    predicted = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    precision, recall = tp / predicted, tp / truth.sum()
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    last_of_tie = torch.ones_like(truth)  # a threshold can only split between distinct scores
    last_of_tie[:-1] = scores[:-1] != scores[1:]
    if min_precision is not None:
        ok = (precision >= min_precision) & last_of_tie
        if not ok.any():
            raise ValueError(f"no threshold reaches precision {min_precision}")
        best = int(ok.nonzero().max())
    else:
        best = int(torch.where(last_of_tie, f1, torch.full_like(f1, -1)).argmax())
    return {
        "threshold": float(scores[best]),
        "precision": float(precision[best]),
        "recall": float(recall[best]),
        "f1": float(f1[best]),
    }
