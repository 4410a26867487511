"""The open-vocabulary detector: F-VLM / F-ViT on a frozen Chinese-CLIP ViT, with Chinese labels.

Layout (Kuo et al., *F-VLM*, ICLR 2023; DESIGN.md §6)::

    image -> GeneralizedRCNNTransform (resize the long side to image_size, CLIP mean/std, pad to 32)
          -> frozen CLIP ViT tower -> ViTDet simple feature pyramid (strides 4..64)
          -> class-agnostic RPN (torchvision) -> RoIAlign 7x7 -> two-layer MLP
          -> region embedding (cosine to the vocabulary's text embeddings and to a learned background
             embedding, learned temperature) + class-agnostic box regression
    VLM branch (inference only), scoring each region against the same text embeddings with CLIP's own
    temperature:  "dense" RoIAlign-mean of the tower's projected patch tokens (F-VLM; one tower pass; the
                  last block as trained or a training-free variant, ``dense_mode``),
                  "crops" the top proposals cropped square (10% margin), resized to the CLIP input size and
                  re-encoded by the image tower in batches (pooled embedding; slower, reliable where dense
                  features are not aligned), or "off".
    score(class c) = p_det(c) ** (1 - a_c) * p_vlm(c) ** a_c with a_c = alpha_seen for categories seen in
    training and alpha_unseen otherwise; p_det is the softmax over background + classes (background
    probability from the detector only), p_vlm the softmax over the classes. Class-aware NMS
    (``torchvision.ops.batched_nms``).

The CLIP model is referenced by :class:`DetectorConfig.clip` (a name or a path) and loaded separately;
:meth:`OpenVocabDetector.save_pretrained` writes only the detector's own weights unless asked to copy it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection._utils import _topk_min
from torchvision.models.detection.faster_rcnn import TwoMLPHead
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes
from torchvision.ops import batched_nms, clip_boxes_to_image, remove_small_boxes, roi_align

from cnclip_vision.backbones.dense import DenseMode, check_dense_mode
from cnclip_vision.backbones.pyramid import ViTDetBackbone, detector_kwargs, vit_fpn_backbone
from cnclip_vision.data.transforms import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageSource, load_image, square_boxes
from cnclip_vision.detection.vocabulary import (
    VLM_MODES,
    ImageQuery,
    Label,
    VLMMode,
    Vocabulary,
    check_labels,
    check_thresholds,
    check_vlm_mode,
)
from cnclip_vision.errors import CheckpointError, CNClipError
from cnclip_vision.io import atomic_write, write_json
from cnclip_vision.models.clip import ChineseCLIP
from cnclip_vision.models.configs import ASSETS_DIR, TOY_DETECTORS
from cnclip_vision.zeroshot import class_embeddings

logger = logging.getLogger(__name__)

__all__ = ["DetectorConfig", "ImageQuery", "OpenVocabDetector", "Vocabulary", "VLM_MODES"]

CONFIG_NAME = "detector_config.json"
WEIGHTS_NAME = "detector.safetensors"
CLIP_SUBDIR = "clip"
SHIPPED = {name: ASSETS_DIR / name for name in TOY_DETECTORS.values()}  # package data (cnclip_vision/assets/)


@dataclass
class DetectorConfig:
    """Hyper-parameters of :class:`OpenVocabDetector` (saved as ``detector_config.json``)."""

    clip: str = "ViT-B-16"  # the CLIP it sits on: a registered name or a path (relative: to the detector dir)
    image_size: int = 640  # the long side of the network input (F-ViT: 640)
    out_channels: int = 256  # pyramid channels
    levels: Literal["p2-p6", "p3-p7"] = "p2-p6"  # pyramid strides 4..64 (ViTDet) or 8..128 (cheaper)
    representation_size: int = 1024  # region MLP width
    trainable_layers: int = 0  # tower blocks fine-tuned (0: frozen, as F-VLM)
    rpn_pre_nms_top_n: tuple[int, int] = (2000, 1000)  # (train, test)
    rpn_post_nms_top_n: tuple[int, int] = (1000, 1000)
    rpn_batch_size_per_image: int = 256
    box_batch_size_per_image: int = 512
    box_positive_fraction: float = 0.25
    background_weight: float = 0.2  # cross-entropy weight of the background class (F-ViT)
    vlm_mode: VLMMode = "crops"
    alpha_seen: float = 0.35  # VLM weight in the geometric ensemble, categories seen in training
    alpha_unseen: float = 0.65  # the same for categories not seen in training
    # proposals per image re-encoded in "crops" mode; 50: on the toy world AP50 novel 0.917 at 50 against 0.910
    # at 100, in 0.61x the time (README, detection)
    crop_top_k: int = 50
    crop_margin: float = 0.1  # context around a crop, per side, as a fraction of the box's long side
    crop_batch_size: int = 64
    dense_pool: int = 3  # RoIAlign grid (averaged) on the stride-16 dense embeddings in "dense" mode
    # the last block's variant whose tokens the "dense" branch pools (cnclip_vision.backbones.dense; the pyramid
    # always takes the raw tokens it was trained on). maskclip: on the toy world dense novel AP50 0.509 against
    # raw 0.101, naclip 0.298, sclip 0.132, clearclip 0.113 (README, detection)
    dense_mode: DenseMode = "maskclip"
    templates: tuple[str, ...] | str = "default"  # prompt templates ({} = the label), or a named set
    seen_categories: tuple[str, ...] = ()  # label names the region head was trained on
    temperature_init: float = 0.02  # initial region-text temperature (learned)
    # ViLD-image distillation (Gu et al., ICLR 2022) in training: the region embeddings of the top RPN proposals
    # of each image (unlabelled novel objects included) are pulled (L1) to the frozen CLIP's pooled embeddings of
    # the same boxes cropped as in "crops" mode; 0 turns it off
    distill_weight: float = 0.0
    distill_proposals: int = 16  # proposals per image distilled (the top ones by objectness)

    def __post_init__(self) -> None:
        self.rpn_pre_nms_top_n = _train_test(self.rpn_pre_nms_top_n, "rpn_pre_nms_top_n")  # JSON gives lists
        self.rpn_post_nms_top_n = _train_test(self.rpn_post_nms_top_n, "rpn_post_nms_top_n")
        self.seen_categories = tuple(self.seen_categories)
        if not isinstance(self.templates, str):
            self.templates = tuple(self.templates)
        check_vlm_mode(self.vlm_mode)
        check_dense_mode(self.dense_mode)
        for name in ("alpha_seen", "alpha_unseen", "crop_margin", "background_weight", "distill_weight"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 <= value <= (1 if name.startswith("alpha") else 10):
                raise ValueError(f"DetectorConfig.{name}={value!r} is out of range")
        for name in (
            "image_size",
            "out_channels",
            "representation_size",
            "crop_top_k",
            "crop_batch_size",
            "dense_pool",
            "distill_proposals",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DetectorConfig.{name}={value!r}; expected a positive int")
        if self.image_size % 32:
            raise ValueError(f"DetectorConfig.image_size={self.image_size} must be a multiple of 32")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> DetectorConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CNClipError(f"{source}: unknown detector options {unknown}; known: {sorted(known)}")
        return cls(**data)


class _RegionHead(nn.Module):
    """RoI features -> (region embedding [R, D], class-agnostic box deltas [R, 4])."""

    def __init__(self, in_features: int, representation_size: int, embed_dim: int) -> None:
        super().__init__()
        self.mlp = TwoMLPHead(in_features, representation_size)
        self.embed = nn.Linear(representation_size, embed_dim)
        self.bbox = nn.Linear(representation_size, 4)
        nn.init.normal_(self.bbox.weight, std=0.001)
        nn.init.zeros_(self.bbox.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.mlp(x)
        return F.normalize(self.embed(h), dim=-1), self.bbox(h)


class OpenVocabDetector(nn.Module):
    """Open-vocabulary detector with Chinese labels on a frozen Chinese-CLIP ViT. Stateless: class embeddings go
    in with the images; the vocabulary, its cache and the thresholds live in a
    :class:`~cnclip_vision.detection.predictor.DetectionPredictor` beside it (as segment-anything's predictor).

    >>> det = OpenVocabDetector.from_pretrained("my-detector")           # or OpenVocabDetector(clip, config)
    >>> det.predict(["street.jpg"], ["猫", "狗", "电动车"])                # convenience: one predictor per call
    [{'boxes': tensor([[x1, y1, x2, y2], ...]), 'scores': ..., 'labels': ..., 'label_names': [...]}]

    ``forward(images, vocabulary, targets)``: ``images`` a list of float ``[3, H, W]`` tensors in 0..1, the
    :class:`Vocabulary` from :meth:`encode_vocabulary`; in training mode with ``targets`` (dicts of ``boxes``
    xyxy pixels and ``labels`` = vocabulary indices) the loss dict, in eval mode the detections, as torchvision
    detectors.

    The CLIP model is held, not copied: its tower is the detector's frozen backbone tower (one object); with
    ``trainable_layers > 0`` the detector trains a copy of the tower. The detector never changes the CLIP's
    weights, ``requires_grad`` flags or train/eval mode.
    """

    def __init__(self, clip: ChineseCLIP, config: DetectorConfig | None = None) -> None:
        super().__init__()
        config = config or DetectorConfig()
        if clip.config.vision.kind != "vit":
            raise ValueError("the open-vocabulary detector needs a ViT image tower; RN50 is not supported")
        self.config = config
        self.clip = clip
        self.backbone: ViTDetBackbone = vit_fpn_backbone(
            clip.config,
            weights=clip,
            out_channels=config.out_channels,
            levels=config.levels,
            trainable_layers=config.trainable_layers,
        )
        embed_dim = clip.config.embed_dim
        self.transform = _Transform(
            config.image_size, config.image_size, list(OPENAI_CLIP_MEAN), list(OPENAI_CLIP_STD), size_divisible=32
        )
        kwargs = detector_kwargs("faster_rcnn", self.backbone)
        anchors = kwargs["rpn_anchor_generator"]
        self.rpn = RegionProposalNetwork(
            anchors,
            RPNHead(config.out_channels, anchors.num_anchors_per_location()[0]),
            fg_iou_thresh=0.7,
            bg_iou_thresh=0.3,
            batch_size_per_image=config.rpn_batch_size_per_image,
            positive_fraction=0.5,
            pre_nms_top_n=dict(training=config.rpn_pre_nms_top_n[0], testing=config.rpn_pre_nms_top_n[1]),
            post_nms_top_n=dict(training=config.rpn_post_nms_top_n[0], testing=config.rpn_post_nms_top_n[1]),
            nms_thresh=0.7,
        )
        pool = kwargs["box_roi_pool"]  # RoIAlign 7x7 on every level but the top one
        self.region_head = _RegionHead(config.out_channels * 49, config.representation_size, embed_dim)
        # torchvision's RoIHeads for proposal sampling, pooling and box coding; scoring and losses are ours
        self.roi_heads = RoIHeads(
            pool,
            None,
            None,
            fg_iou_thresh=0.5,
            bg_iou_thresh=0.5,
            batch_size_per_image=config.box_batch_size_per_image,
            positive_fraction=config.box_positive_fraction,
            bbox_reg_weights=None,
            score_thresh=0.0,
            nms_thresh=0.5,
            detections_per_img=100,
        )
        self.background = nn.Parameter(F.normalize(torch.randn(embed_dim), dim=0))
        self.log_inv_temperature = nn.Parameter(torch.tensor(math.log(1 / config.temperature_init)))

    @property
    def device(self) -> torch.device:
        return self.background.device

    @property
    def embed_dim(self) -> int:
        return self.clip.config.embed_dim

    # ------------------------------------------------------------------------------------- vocabulary
    @torch.no_grad()
    def encode_vocabulary(self, labels: Sequence[Label], *, seen: Sequence[bool] | None = None) -> Vocabulary:
        """Class embeddings of ``labels``: Chinese names template-averaged
        (:func:`cnclip_vision.zeroshot.class_embeddings` with ``config.templates``) and :class:`ImageQuery` crops
        through the image tower. ``seen`` says which labels count as seen in training (default: the names in
        ``config.seen_categories``)."""
        names = check_labels(labels)
        out = torch.empty(len(labels), self.embed_dim)
        texts = [(i, x) for i, x in enumerate(labels) if isinstance(x, str)]
        if texts:
            out[[i for i, _ in texts]] = class_embeddings(self.clip, [x for _, x in texts], self.config.templates)
        queries = [(i, x) for i, x in enumerate(labels) if isinstance(x, ImageQuery)]
        if queries:
            crops = torch.stack([_query_pixels(q, self.clip.image_size) for _, q in queries])
            out[[i for i, _ in queries]] = self.clip.encode_image(crops, normalize=True).float().cpu()
        if seen is None:
            seen_set = set(self.config.seen_categories)
            seen_mask = torch.tensor([isinstance(x, str) and x in seen_set for x in labels])
        else:
            if len(seen) != len(labels):
                raise ValueError(f"seen has {len(seen)} entries for {len(labels)} labels")
            seen_mask = torch.tensor([bool(s) for s in seen])
        return Vocabulary(names, out.to(self.device), seen_mask)

    def check_vocabulary(self, vocabulary: Vocabulary) -> Vocabulary:
        """``vocabulary`` if its embeddings fit this detector, else ValueError."""
        shape = tuple(vocabulary.embeddings.shape)
        if shape != (len(vocabulary.names), self.embed_dim) or len(vocabulary.seen) != len(vocabulary.names):
            raise ValueError(
                f"vocabulary embeddings have shape {shape} and {len(vocabulary.seen)} seen flags for "
                f"{len(vocabulary.names)} names; expected ({len(vocabulary.names)}, {self.embed_dim})"
            )
        return vocabulary

    # ------------------------------------------------------------------------------------- parameters
    def train(self, mode: bool = True) -> OpenVocabDetector:
        """The detector's own modules follow ``mode``; the CLIP (and a frozen tower) are left as they are."""
        for name, child in self.named_children():
            if name != "clip":
                child.train(mode)
        self.training = mode
        return self

    def trainable_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """What training updates: pyramid, RPN, region head, background, temperature and the tower blocks of
        ``config.trainable_layers`` (never the CLIP's own tensors)."""
        tower = {f"backbone.tower.{n}" for n in self.backbone.trainable_tower_parameter_names()}
        return [(n, p) for n, p in self.named_parameters(remove_duplicate=False) if _is_own(n, tower)]

    # ------------------------------------------------------------------------------------- the pipeline
    def forward(
        self,
        images: list[torch.Tensor],
        vocabulary: Vocabulary,
        targets: list[dict[str, torch.Tensor]] | None = None,
        *,
        vlm_mode: VLMMode | None = None,
        dense_mode: DenseMode | None = None,
        score_threshold: float = 0.05,
        nms_threshold: float = 0.5,
        max_detections: int = 100,
    ) -> dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]:
        """One pipeline for training and inference (torchvision's ``GeneralizedRCNN`` order and convention: transform,
        backbone, RPN, RoI heads, postprocess; training mode returns losses, eval mode detections).

        Training mode (``targets`` required): the loss dict (``loss_classifier``, ``loss_box_reg``, ``loss_objectness``,
        ``loss_rpn_box_reg``). Eval mode: per image ``boxes`` (xyxy pixels of the input image), ``scores``,
        ``labels`` (vocabulary indices) and ``embeddings`` (the region embeddings ``[K, embed_dim]``), with the
        VLM branch ``vlm_mode`` (default ``config.vlm_mode``) ensembled in; ``dense`` pools the tokens of the last
        block's variant ``dense_mode`` (default ``config.dense_mode``).
        """
        vocab = self.check_vocabulary(vocabulary)
        if self.training:
            if targets is None:
                raise ValueError("in training mode the detector needs targets; call detector.eval() to detect")
            targets = [
                {"boxes": t["boxes"].float(), "labels": t["labels"].long() + 1} for t in targets
            ]  # 0: background
            mode = "off"  # the VLM branch is inference-only (F-VLM)
        else:
            targets = None
            mode = self.config.vlm_mode if vlm_mode is None else vlm_mode
            check_vlm_mode(mode)
            check_thresholds(score_threshold, nms_threshold, max_detections)
        dense_mode = check_dense_mode(self.config.dense_mode if dense_mode is None else dense_mode)
        original_sizes = [(im.shape[-2], im.shape[-1]) for im in images]  # traced, not constants, in an export
        batch, targets = self.transform(images, targets)
        if mode == "dense":
            features, dense = self.backbone.forward_with_dense(batch.tensors, normalize=False, dense_mode=dense_mode)
        else:
            features, dense = self.backbone(batch.tensors), None
        with _fp32_heads(features):  # under bf16 autocast only the backbone runs in bf16 (heads: box precision)
            for k in features:
                features[k] = features[k].float()
            proposals, rpn_losses = self.rpn(batch, features, targets)
            distill = {}
            if targets is not None and self.config.distill_weight > 0:
                distill["loss_distill"] = self._distill_loss(batch, features, proposals)
            if targets is not None:
                proposals, _, labels, regression_targets = self.roi_heads.select_training_samples(proposals, targets)
            embeddings, deltas = self.region_head(self.roi_heads.box_roi_pool(features, proposals, batch.image_sizes))
            logits = self._det_logits(embeddings, vocab.embeddings)
        if targets is not None:
            return {**self._losses(logits, deltas, labels, regression_targets), **rpn_losses, **distill}
        boxes = self.roi_heads.box_coder.decode(deltas, proposals)[:, 0]  # class-agnostic: one box per proposal
        counts = [len(x) for x in proposals]
        per_image = []
        for p, b, e, size in zip(_split(logits.softmax(-1), counts), _split(boxes, counts),
                                 _split(embeddings, counts), batch.image_sizes):  # fmt: skip
            b = clip_boxes_to_image(b, size)
            keep = remove_small_boxes(b, 1e-2)
            scores, b, e = p[keep, 1:], b[keep], e[keep]
            if mode == "crops":
                top = scores.max(-1).values.topk(_topk_min(scores, self.config.crop_top_k, 0)).indices
                scores, b, e = scores[top], b[top], e[top]
            per_image.append((scores, b, e))
        if mode == "crops":  # the crops of every image of the batch in shared batches through the tower
            crops = self._crop_embeddings(batch.tensors, [b for _, b, _ in per_image])
            per_image = [(self._ensemble(s, c, vocab), b, e) for (s, b, e), c in zip(per_image, crops)]
        elif mode == "dense" and dense is not None:  # dense is set exactly in "dense" mode
            per_image = [
                (self._ensemble(s, self._dense_embeddings(dense[i : i + 1], b), vocab), b, e)
                for i, (s, b, e) in enumerate(per_image)
            ]
        results = [_select(b, e, s, score_threshold, nms_threshold, max_detections) for s, b, e in per_image]
        for r, size, original in zip(results, batch.image_sizes, original_sizes):
            r["boxes"] = resize_boxes(r["boxes"], size, original)
        return results

    def _losses(
        self,
        logits: torch.Tensor,
        deltas: torch.Tensor,
        labels: list[torch.Tensor],
        regression_targets: list[torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        labels_all = torch.cat(labels)
        weight = torch.ones(logits.shape[1], device=logits.device)
        weight[0] = self.config.background_weight
        loss_classifier = F.cross_entropy(logits, labels_all, weight=weight)
        positive = labels_all > 0
        loss_box = F.smooth_l1_loss(
            deltas[positive], torch.cat(regression_targets)[positive], beta=1 / 9, reduction="sum"
        ) / max(labels_all.numel(), 1)
        return {"loss_classifier": loss_classifier, "loss_box_reg": loss_box}

    def _distill_loss(
        self, batch: Any, features: dict[str, torch.Tensor], proposals: list[torch.Tensor]
    ) -> torch.Tensor:
        """ViLD-image: ``distill_weight`` x the mean over regions of the L1 distance between the region embeddings
        of each image's top ``distill_proposals`` proposals (the RPN's, ordered by objectness, detached) and the
        frozen CLIP's embeddings of their crops (both unit vectors)."""
        top = [p[: self.config.distill_proposals].detach() for p in proposals]
        with torch.no_grad():
            teacher = torch.cat(self._crop_embeddings(batch.tensors, top))
        student, _ = self.region_head(self.roi_heads.box_roi_pool(features, top, batch.image_sizes))
        if not len(student):
            return student.sum()
        return self.config.distill_weight * (student - teacher.to(student)).abs().sum(-1).mean()

    def _det_logits(self, embeddings: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """``[R, 1 + C]`` region-text logits, column 0 the learned background."""
        keys = torch.cat([F.normalize(self.background, dim=0)[None], classes.to(embeddings)])
        return self.log_inv_temperature.exp().clamp(max=100.0) * embeddings @ keys.t()

    def _ensemble(self, p_det: torch.Tensor, vlm: torch.Tensor, vocab: Vocabulary) -> torch.Tensor:
        """``p_det ** (1 - a) * p_vlm ** a`` per class, ``a`` = alpha_seen or alpha_unseen."""
        scale = self.clip.logit_scale.detach().exp().clamp(max=100.0)
        p_vlm = (scale * vlm @ vocab.embeddings.to(vlm).t()).softmax(-1)
        alpha = torch.where(vocab.seen.to(p_det.device), self.config.alpha_seen, self.config.alpha_unseen)
        return p_det.clamp_min(1e-12) ** (1 - alpha) * p_vlm.clamp_min(1e-12) ** alpha

    @torch.no_grad()
    def _crop_embeddings(self, images: torch.Tensor, boxes: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Pooled CLIP embeddings of square crops around ``boxes[i]`` of image ``i`` (normalised batch
        ``[N, 3, H, W]``), through the CLIP's own (frozen) tower: the crops of all images share batches of
        ``crop_batch_size``, so a batch of images with few proposals each still fills the tower."""
        counts = [len(b) for b in boxes]
        if not sum(counts):
            return [images.new_zeros(0, self.embed_dim) for _ in boxes]
        owner = torch.cat([torch.full_like(b[:, 0], i) for i, b in enumerate(boxes)])  # each box's image
        rois = torch.cat([owner[:, None], square_boxes(torch.cat(list(boxes)), self.config.crop_margin)], 1)
        size = self.clip.image_size
        out = []
        # one chunk while tracing (an ONNX export has one image and crop_top_k crops): a traced split is fixed
        for chunk in [rois] if torch.jit.is_tracing() else rois.split(self.config.crop_batch_size):
            crops = roi_align(images, chunk, output_size=size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
            out.append(self.clip.encode_image(crops, normalize=True).float())
        return _split(torch.cat(out), counts)

    def _dense_embeddings(self, dense: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """RoIAlign-mean of the stride-16 projected patch embeddings inside ``boxes``, normalised."""
        if len(boxes) == 0:
            return boxes.new_zeros(0, self.embed_dim)
        k = self.config.dense_pool
        pooled = roi_align(dense.float(), [boxes], output_size=k, spatial_scale=1 / 16, sampling_ratio=2, aligned=True)
        return F.normalize(pooled.mean((2, 3)), dim=-1)

    # ------------------------------------------------------------------------------------- convenience
    def predict(
        self,
        images: ImageSource | Sequence[ImageSource],
        labels: Sequence[Label],
        **kwargs: Any,
    ) -> list[dict[str, Any]]:
        """``DetectionPredictor(self).predict(images, labels, **kwargs)``: detect ``labels`` (Chinese names and/or
        :class:`ImageQuery` crops) in images of any size and mode. The labels are encoded on every call; keep a
        :class:`~cnclip_vision.detection.predictor.DetectionPredictor` to encode a vocabulary once."""
        from cnclip_vision.detection.predictor import DetectionPredictor

        return DetectionPredictor(self).predict(images, labels, **kwargs)

    # ------------------------------------------------------------------------------------- persistence
    def head_state_dict(self) -> dict[str, torch.Tensor]:
        """The detector's own weights (pyramid, RPN, region head, background, temperature; and the tower
        blocks it fine-tuned), without the CLIP model."""
        tower = {f"backbone.tower.{n}" for n in self.backbone.trainable_tower_parameter_names()}
        return {k: v for k, v in self.state_dict().items() if _is_own(k, tower)}

    def save_pretrained(
        self, directory: str | os.PathLike[str], *, include_clip: bool = False, half: bool = False
    ) -> Path:
        """Write ``detector_config.json`` and ``detector.safetensors`` (``half``: fp16, loads back as the
        model's dtype); with ``include_clip`` also the CLIP model into ``directory/clip`` (otherwise the
        config references ``config.clip``)."""
        from safetensors.torch import save_file

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        config = dataclasses.replace(self.config)
        if include_clip:
            self.clip.save_pretrained(out / CLIP_SUBDIR)
            config.clip = CLIP_SUBDIR
        state = {k: v.detach().contiguous().cpu() for k, v in self.head_state_dict().items()}
        if half:
            state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
        with atomic_write(out / WEIGHTS_NAME) as tmp:
            save_file(state, str(tmp), metadata={"format": "pt", "cnclip_detector": "1"})
        write_json(out / CONFIG_NAME, {"detector": config.to_dict(), "clip_config": self.clip.config.to_dict()})
        logger.info("detector written to %s", out)
        return out

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike[str],
        *,
        clip: ChineseCLIP | str | os.PathLike[str] | None = None,
        device: torch.device | str | None = None,
        **overrides: Any,
    ) -> OpenVocabDetector:
        """Load a detector written by :meth:`save_pretrained` (or ``"toy-detector"``, the shipped detector of the
        toy world; ``"toy-detector-held-out-shapes"`` / ``"-colours"`` for the attribute-held-out protocols).
        ``clip`` overrides the referenced CLIP model; ``overrides`` change inference options of
        the config (e.g. ``vlm_mode="dense"``)."""
        from safetensors.torch import load_file

        from cnclip_vision.models.factory import load

        root = Path(directory)
        if str(directory) in SHIPPED and not root.exists():
            root = SHIPPED[str(directory)]
        config_path = root / CONFIG_NAME
        if not config_path.is_file():
            raise CheckpointError(f"{root} is not a detector directory: {CONFIG_NAME} is missing")
        try:
            meta = json.loads(config_path.read_text(encoding="utf-8"))
            saved = DetectorConfig.from_dict(meta["detector"], source=str(config_path))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, CNClipError) as e:
            raise CheckpointError(f"{config_path}: not a valid detector config ({e})") from e
        config = DetectorConfig.from_dict({**saved.to_dict(), **overrides}, source="from_pretrained overrides")
        if clip is None:
            ref = Path(config.clip)
            clip = str(root / ref) if not ref.is_absolute() and (root / ref).exists() else config.clip
        if not isinstance(clip, ChineseCLIP):
            clip = load(clip, device=device)
        detector = cls(clip, config)
        try:
            state = load_file(str(root / WEIGHTS_NAME))
        except Exception as e:  # noqa: BLE001  safetensors raises several types for corrupt files
            raise CheckpointError(f"cannot read {root / WEIGHTS_NAME}: {e}") from e
        detector.load_head_state_dict(state, source=str(root / WEIGHTS_NAME))
        return detector.to(device or clip.device).eval()

    def load_head_state_dict(self, state: dict[str, torch.Tensor], *, source: str) -> None:
        """Load :meth:`head_state_dict` weights (cast to this detector's dtypes); keys and shapes must match
        exactly, else :class:`CheckpointError` naming ``source``."""
        expected = self.head_state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        shapes = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
        if missing or unexpected or shapes:
            raise CheckpointError(
                f"{source} does not fit the detector config: missing {missing[:5]}, unexpected {unexpected[:5]}, "
                f"shape mismatches {shapes[:5]}"
            )
        self.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=False)


# ----------------------------------------------------------------------------------------- helpers
class _Transform(GeneralizedRCNNTransform):
    """torchvision's transform; while tracing (ONNX export) the resized size is computed as eager PyTorch
    computes it, ``floor(side * scale)`` in float64. torchvision's tracing path passes a float32 scale to
    ``Resize``, whose size onnxruntime rounds down one pixel at exact ratios (720 -> 575 instead of 576 at
    scale 0.8), so the last column of the image would be padding."""

    def resize(
        self, image: torch.Tensor, target: dict[str, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        if self.training or not torch.jit.is_tracing():
            return super().resize(image, target)
        # float64 and 1-d throughout: the exporter computes 0-d operands ("scalars") in float32
        sides = torch._shape_as_tensor(image)[-2:].to(torch.float64)
        limits = torch.tensor([float(self.min_size[-1]), float(self.max_size)], dtype=torch.float64)
        scale = (limits / torch.stack([sides.min(), sides.max()])).min(dim=0, keepdim=True).values
        size = torch.floor(sides * scale).to(torch.int64)
        traced = cast("tuple[int, int]", (size[0], size[1]))  # 0-d tensors: the tracer keeps them symbolic
        resized = F.interpolate(image[None], size=traced, mode="bilinear", align_corners=False)[0]
        return resized, target


def _fp32_heads(features: Mapping[str, torch.Tensor]) -> Any:
    """Autocast off (for the RPN, the region head and the logits) when it is on for the features' device."""
    device = next(iter(features.values())).device.type
    return torch.autocast(device, enabled=False) if torch.is_autocast_enabled(device) else contextlib.nullcontext()


def _split(x: torch.Tensor, counts: list[int]) -> list[torch.Tensor]:
    """``x.split(counts)``; a single image's rows unsplit (a traced split would fix their number)."""
    return [x] if len(counts) == 1 else list(x.split(counts))


def _train_test(value: Sequence[int], name: str) -> tuple[int, int]:
    """A ``(train, test)`` pair of a config field (a list when read from JSON)."""
    if len(value) != 2:
        raise ValueError(f"DetectorConfig.{name}={value!r}: expected two values (train, test)")
    return value[0], value[1]


def _is_own(name: str, trained_tower: set[str]) -> bool:
    """Whether a parameter / state key is the detector's own (not the CLIP's, not a frozen tower's)."""
    if name.startswith("clip."):
        return False
    return not name.startswith("backbone.tower.") or name in trained_tower


def _select(
    boxes: torch.Tensor, embeddings: torch.Tensor, scores: torch.Tensor, threshold: float, nms: float, limit: int
) -> dict[str, torch.Tensor]:
    """Every (box, class) pair above ``threshold``, class-aware NMS, the best ``limit``."""
    idx, cls = (scores > threshold).nonzero(as_tuple=True)
    b, s = boxes[idx], scores[idx, cls]
    keep = batched_nms(b, s, cls, nms)[:limit]
    return {"boxes": b[keep], "scores": s[keep], "labels": cls[keep], "embeddings": embeddings[idx][keep]}


def _query_pixels(query: ImageQuery, size: int) -> torch.Tensor:
    """The query image cropped to its box, resized to ``size`` x ``size``, CLIP-normalised."""
    from cnclip_vision.data.transforms import image_transform

    image = load_image(query.image)
    if query.box is not None:
        try:
            x1, y1, x2, y2 = (float(v) for v in query.box)
        except (TypeError, ValueError) as e:
            raise ValueError(f"ImageQuery {query.name!r}: box must be (x1, y1, x2, y2), got {query.box!r}") from e
        x1, y1 = max(x1, 0.0), max(y1, 0.0)
        x2, y2 = min(x2, float(image.width)), min(y2, float(image.height))
        if x2 - x1 < 1 or y2 - y1 < 1:
            raise ValueError(
                f"ImageQuery {query.name!r}: the crop {query.box} has zero size inside the "
                f"{image.width}x{image.height} image"
            )
        image = image.crop((x1, y1, x2, y2))
    return image_transform(size)(image)
