"""Train torchvision's Faster R-CNN on a Chinese-CLIP ViT backbone, on a tiny generated COCO dataset.

    python examples/faster_rcnn_backbone.py                 # small random tower, 10 steps, < 1 min on CPU
    python examples/faster_rcnn_backbone.py --full-size --weights HF_DIR_OR_clip_cn_vit-b-16.pt --steps 200

The dataset (coloured rectangles = class 1, ellipses = class 2, with boxes) is written as PNG images and a
COCO ``instances.json`` to a temporary directory and read back with pycocotools (plain json if it is not
installed). The tower is frozen (``trainable_layers=0``); only the pyramid and the detector heads train.
Detections are written as a COCO results JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torchvision.models.detection import FasterRCNN
from tqdm import tqdm

from cnclip_vision.backbones.pyramid import detector_kwargs, vit_fpn_backbone
from cnclip_vision.data.transforms import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from cnclip_vision.models.configs import CLIPConfig, TextConfig, VisionConfig

CATEGORIES = [{"id": 1, "name": "rectangle"}, {"id": 2, "name": "ellipse"}]
# A small ViT-B/16-shaped tower (2 blocks of width 128) for a fast demo; --full-size uses ViT-B-16.
SMALL = CLIPConfig(embed_dim=64, vision=VisionConfig(width=128, layers=2, heads=2), text=TextConfig(num_layers=1))


def make_coco_dataset(root: Path, num_images: int, seed: int) -> Path:
    """Write ``num_images`` PNGs of coloured shapes and their COCO annotations; return the json path."""
    rng = random.Random(seed)
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        w, h = rng.choice([(320, 240), (256, 320), (288, 224)])
        img = Image.new("RGB", (w, h), tuple(rng.randint(0, 80) for _ in range(3)))
        draw = ImageDraw.Draw(img)
        for _ in range(rng.randint(1, 3)):
            bw, bh = rng.randint(40, w // 2), rng.randint(40, h // 2)
            x0, y0 = rng.randint(0, w - bw - 1), rng.randint(0, h - bh - 1)
            category = rng.choice(CATEGORIES)["id"]
            colour = tuple(rng.randint(120, 255) for _ in range(3))
            (draw.rectangle if category == 1 else draw.ellipse)([x0, y0, x0 + bw, y0 + bh], fill=colour)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category,
                    "bbox": [x0, y0, bw, bh],
                    "area": bw * bh,
                    "iscrowd": 0,
                }
            )
        file_name = f"{image_id:04d}.png"
        img.save(root / file_name)
        images.append({"id": image_id, "file_name": file_name, "width": w, "height": h})
    path = root / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": CATEGORIES}))
    return path


def read_coco(path: Path) -> list[tuple[int, torch.Tensor, dict[str, torch.Tensor]]]:
    """(image id, normalised image [3, H, W], target with xyxy boxes) for every image of a COCO file."""
    try:
        from pycocotools.coco import COCO

        coco = COCO(str(path))
        image_infos = coco.loadImgs(sorted(coco.getImgIds()))
        anns_of = lambda i: coco.loadAnns(coco.getAnnIds(imgIds=[i]))  # noqa: E731
    except ImportError:
        data = json.loads(path.read_text())
        image_infos = sorted(data["images"], key=lambda d: d["id"])
        anns_of = lambda i: [a for a in data["annotations"] if a["image_id"] == i]  # noqa: E731
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1)
    samples = []
    for info in image_infos:
        pixels = np.asarray(Image.open(path.parent / info["file_name"]).convert("RGB"), dtype=np.float32) / 255
        image = (torch.from_numpy(pixels).permute(2, 0, 1) - mean) / std
        anns = anns_of(info["id"])
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)], dtype=torch.float32)
        labels = torch.tensor([a["category_id"] for a in anns], dtype=torch.int64)
        samples.append((info["id"], image, {"boxes": boxes.reshape(-1, 4), "labels": labels}))
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="training steps (default 10)")
    parser.add_argument("--full-size", action="store_true", help="a full ViT-B-16 tower instead of the small one")
    parser.add_argument("--weights", default=None, help="weights file or directory for --full-size (default: random)")
    parser.add_argument("--images", type=int, default=8, help="images in the generated dataset")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="detections JSON (default: in the temp dir)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.weights and not args.full_size:
        parser.error("--weights needs --full-size")
    torch.manual_seed(args.seed)
    torch.set_num_threads(min(2, torch.get_num_threads()))

    with tempfile.TemporaryDirectory() as tmp:
        annotations = make_coco_dataset(Path(tmp), args.images, args.seed)
        samples = read_coco(annotations)
        print(f"dataset: {len(samples)} images, {sum(len(t['boxes']) for _, _, t in samples)} boxes in {annotations}")

        backbone = (
            vit_fpn_backbone("ViT-B-16", weights=args.weights)
            if args.full_size
            else vit_fpn_backbone(SMALL, out_channels=64)
        )
        model = FasterRCNN(
            backbone,
            num_classes=len(CATEGORIES) + 1,
            min_size=192 if not args.full_size else 320,
            max_size=256 if not args.full_size else 448,
            box_batch_size_per_image=128,  # RoIs sampled per image for the box head (default 512)
            image_mean=[0.0, 0.0, 0.0],  # images are already CLIP-normalised
            image_std=[1.0, 1.0, 1.0],
            **detector_kwargs("faster_rcnn", backbone),
        )
        params = [p for p in model.parameters() if p.requires_grad]
        print(
            f"trainable parameters: {sum(p.numel() for p in params) / 1e6:.2f}M "
            f"(tower frozen: {sum(p.numel() for p in backbone.tower.parameters()) / 1e6:.2f}M)"
        )
        optimizer = torch.optim.AdamW(params, lr=5e-4, weight_decay=1e-4)

        model.train()
        start, first, smoothed = time.monotonic(), None, None
        progress = tqdm(range(args.steps), desc="train", unit="step")
        for step in progress:
            batch = [samples[(step * args.batch_size + k) % len(samples)] for k in range(args.batch_size)]
            losses = model([s[1] for s in batch], [s[2] for s in batch])
            loss = sum(losses.values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            smoothed = loss.item() if smoothed is None else 0.8 * smoothed + 0.2 * loss.item()
            first = smoothed if first is None else first
            progress.set_postfix(loss=f"{smoothed:.3f}")
        elapsed = time.monotonic() - start
        print(f"loss {first:.3f} -> {smoothed:.3f} (smoothed) after {args.steps} steps in {elapsed:.1f}s")

        model.eval()
        results = []
        with torch.no_grad():
            for image_id, image, _ in samples:
                (det,) = model([image])
                for box, label, score in zip(det["boxes"].tolist(), det["labels"].tolist(), det["scores"].tolist()):
                    x0, y0, x1, y1 = (round(v, 2) for v in box)
                    results.append(
                        {
                            "image_id": image_id,
                            "category_id": label,
                            "bbox": [x0, y0, round(x1 - x0, 2), round(y1 - y0, 2)],
                            "score": round(score, 4),
                        }
                    )
        out = args.out or Path(tmp) / "detections.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results))
        print(f"{len(results)} detections on {len(samples)} images written to {out}")
        for r in sorted(results, key=lambda r: -r["score"])[:3]:
            print(f"  image {r['image_id']}: {CATEGORIES[r['category_id'] - 1]['name']} {r['bbox']} score {r['score']}")


if __name__ == "__main__":
    main()
