"""Image-text similarity with a Chinese-CLIP model: `python examples/similarity.py MODEL IMAGE TEXT...`.

MODEL is a name from `cnclip_vision.list_models()` (Hub cache), a Hugging Face directory or a
clip_cn_*.pt file.
"""

from __future__ import annotations

import sys

import torch

import cnclip_vision


def main(model_source: str, image: str, texts: list[str]) -> None:
    model = cnclip_vision.load(model_source)
    processor = model.get_processor()
    batch = processor(images=[image], text=texts)
    with torch.no_grad():
        out = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    probs = out.logits_per_image.softmax(dim=-1)[0]
    cosine = (out.image_embeds @ out.text_embeds.t())[0]
    for text, p, c in zip(texts, probs.tolist(), cosine.tolist()):
        print(f"{text}\tprob={p:.3f}\tcosine={c:.3f}")


if __name__ == "__main__":
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
