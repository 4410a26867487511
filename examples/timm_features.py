"""Chinese-CLIP image towers as timm models: multi-scale features, intermediates, pooled embeddings.

    python examples/timm_features.py                       # random weights (offline)
    python examples/timm_features.py --weights DIR_OR_FILE # a HF directory, model.safetensors or clip_cn_*.pt

Without --weights a randomly initialised dual encoder is saved to a temporary folder and loaded back
through timm's pretrained machinery, so the same code path as for real weights runs.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import timm
import torch

import cnclip_vision


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="chinese_clip_vit_base_patch16_224", help="registered timm name")
    parser.add_argument("--weights", default=None, help="checkpoint file or Hugging Face directory")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        weights = args.weights
        if weights is None:
            arch = cnclip_vision.backbones.TIMM_NAMES[args.model]
            print(f"NOTE: random weights ({arch}); pass --weights for real ones")
            cnclip_vision.create_model(arch).save_pretrained(tmp)
            weights = tmp
        path = Path(weights)
        if path.is_dir():
            path = next(p for p in (path / "model.safetensors", path / "pytorch_model.bin") if p.exists())
        overlay = dict(file=str(path))
        model = timm.create_model(args.model, pretrained=True, pretrained_cfg_overlay=overlay).eval()
        features = timm.create_model(
            args.model, pretrained=True, pretrained_cfg_overlay=overlay, features_only=True, out_indices=(-3, -2, -1)
        ).eval()
    config = timm.data.resolve_data_config({}, model=model)
    print("preprocessing:", {k: config[k] for k in ("input_size", "interpolation", "crop_pct", "crop_mode")})
    x = torch.randn(2, *config["input_size"])
    with torch.no_grad():
        print("image embedding (= encode_image):", tuple(model(x).shape))
        print(
            "pooled pre-projection features:",
            tuple(model.forward_head(model.forward_features(x), pre_logits=True).shape),
        )
        for info, fmap in zip(features.feature_info.get_dicts(), features(x)):
            print(f"features_only {info['module']}: {tuple(fmap.shape)} (stride {info['reduction']})")
        _, intermediates = model.forward_intermediates(x, indices=2, norm=True)
        print("forward_intermediates (last 2 blocks, normed):", [tuple(t.shape) for t in intermediates])


if __name__ == "__main__":
    main()
