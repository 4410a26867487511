"""Shared fixtures: small configs of every released size, reference models, inputs."""

from __future__ import annotations

import os

import pytest
import torch

from cnclip_vision.models.configs import CLIPConfig, TextConfig, VisionConfig, get_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the network
torch.set_num_threads(min(2, torch.get_num_threads()))

SMALL_TEXT = TextConfig(hidden_size=128, num_layers=2, num_heads=2, intermediate_size=256)  # 64-wide heads, as released


def small_config(arch: str) -> CLIPConfig:
    """The released size ``arch`` shrunk: same patch size, image size and head width, fewer/narrower layers."""
    full = get_config(arch)
    v = full.vision
    head_width = v.width // v.heads  # 64, or 80 for ViT-H-14
    vision = VisionConfig(image_size=v.image_size, width=2 * head_width, layers=2, heads=2, patch_size=v.patch_size)
    return CLIPConfig(embed_dim=48, vision=vision, text=SMALL_TEXT)


VIT_ARCHS = ["ViT-B-16", "ViT-L-14", "ViT-L-14-336", "ViT-H-14"]


def reference_clip(config: CLIPConfig) -> torch.nn.Module:
    """The original Chinese-CLIP model class (``cn_clip`` package) with random weights of this config."""
    from cn_clip.clip.model import CLIP

    v, t = config.vision, config.text
    vision_kwargs = (
        dict(vision_layers=list(v.layers), vision_width=v.width, vision_patch_size=None)
        if v.kind == "resnet"
        else dict(
            vision_layers=v.layers,
            vision_width=v.width,
            vision_patch_size=v.patch_size,
            vision_head_width=v.width // v.heads,
        )
    )
    model = CLIP(
        embed_dim=config.embed_dim,
        image_resolution=v.image_size,
        vocab_size=t.vocab_size,
        text_attention_probs_dropout_prob=0.0,
        text_hidden_act="gelu",
        text_hidden_dropout_prob=0.0,
        text_hidden_size=t.hidden_size,
        text_initializer_range=0.02,
        text_intermediate_size=t.intermediate_size,
        text_max_position_embeddings=t.max_position_embeddings,
        text_num_attention_heads=t.num_heads,
        text_num_hidden_layers=t.num_layers,
        text_type_vocab_size=t.type_vocab_size,
        **vision_kwargs,
    )
    with torch.no_grad():  # non-trivial values for everything the original initialises to constants
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.normal_(1.0, 0.1)
                module.bias.normal_(0.0, 0.1)
            elif isinstance(module, torch.nn.LayerNorm):
                module.weight.normal_(1.0, 0.1)
                module.bias.normal_(0.0, 0.1)
        model.logit_scale.fill_(4.6052)
    return model.eval()


def random_inputs(
    config: CLIPConfig, n_images: int = 2, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images ``[n, 3, S, S]`` and token ids with padding of varied length (and its mask)."""
    g = torch.Generator().manual_seed(seed)
    size = config.vision.image_size
    pixels = torch.randn(n_images, 3, size, size, generator=g)
    ids = torch.randint(672, config.text.vocab_size, (3, 12), generator=g)
    ids[:, 0] = 101
    for row, length in enumerate((12, 7, 3)):
        ids[row, length - 1] = 102
        ids[row, length:] = 0
    return pixels, ids, (ids != 0).long()


@pytest.fixture
def hf_offline_env(tmp_path, monkeypatch):
    """An empty Hugging Face home with the Hub switched off (for subprocess tests)."""
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1")
    env.pop("HF_HUB_CACHE", None)
    return env
