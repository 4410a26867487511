"""The toy world as a searchable collection, for ``make serve-demo``, the serve tests and the load benchmark.

``build_demo(root)`` writes (deterministically, from ``seed``)::

    root/images/test/000/000000.png ...   single-object images, ``per_class`` per colour x shape class (64 px)
    root/images/scenes/000001.png ...     detection scenes of 3-6 objects (128 px), to upload in the page
    root/scenes.json                      the scenes' COCO boxes (Chinese category names)
    root/index/                           the images' embeddings with ``toy-tiny`` (``cnclip embed`` format)

Usage: ``python -m cnclip_vision.serve.demo build/serve-demo`` (does nothing when the index is there), then
``cnclip serve --index build/serve-demo/index --model toy-tiny --detector toy-detector``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["DemoWorld", "build_demo"]


@dataclass(frozen=True)
class DemoWorld:
    root: Path
    images: Path
    index: Path
    scenes: dict[str, Any]  # COCO dict of the scenes; file names relative to images/scenes
    labels: list[str]  # the 64 class names; class i is images/test/{i:03d}/

    def scene_path(self, image: dict[str, Any]) -> Path:
        return self.images / "scenes" / image["file_name"]


def _toy_world() -> Any:
    from cnclip_vision.toy import world

    return world


def build_demo(
    root: str | Path,
    *,
    per_class: int = 1,
    scenes: int = 8,
    seed: int = 0,
    model: Any = "toy-tiny",
    progress: bool = False,
) -> DemoWorld:
    """Write (or reuse, when ``root/index/manifest.json`` exists) the demo collection described above.
    ``model``: a loaded model or a name (the index must be built with the model that will serve it)."""
    import cnclip_vision

    root = Path(root)
    images, index = root / "images", root / "index"
    if not (index / "manifest.json").is_file():
        world = _toy_world()
        if images.exists():
            shutil.rmtree(images)
        world.write_imagefolder(images, n_per_class=per_class, seed=seed)
        tmp = root / ".scenes"
        if tmp.exists():
            shutil.rmtree(tmp)
        world.write_detection_set(tmp, scenes, seed + 1, image_size=128)
        shutil.move(str(tmp / "images"), str(images / "scenes"))
        shutil.move(str(tmp / "annotations.json"), str(root / "scenes.json"))
        shutil.rmtree(tmp)
        clip = cnclip_vision.load(model) if isinstance(model, str) else model
        cnclip_vision.extract_image_embeddings(clip, images, index, progress=progress, resume=False)
        logger.info("demo collection in %s", root)
    labels = (images / "label_cn.txt").read_text(encoding="utf-8").split()
    scenes_coco = json.loads((root / "scenes.json").read_text(encoding="utf-8"))
    return DemoWorld(root, images, index, scenes_coco, labels)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the toy-world demo collection and its toy-tiny index.")
    parser.add_argument("root", help="output folder, e.g. build/serve-demo")
    parser.add_argument(
        "--per-class", type=int, default=3, help="single-object images per class (default: %(default)s)"
    )
    parser.add_argument("--scenes", type=int, default=60, help="detection scenes (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    world = build_demo(args.root, per_class=args.per_class, scenes=args.scenes, seed=args.seed, progress=True)
    logger.info(
        "index %s, images %s; serve it with: cnclip serve --index %s --model toy-tiny --detector toy-detector",
        world.index,
        world.images,
        world.index,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
