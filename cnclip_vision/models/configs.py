"""Architecture configs of the released Chinese-CLIP sizes (DESIGN.md §2), kept as data.

A :class:`CLIPConfig` fully describes a model; the registered sizes are plain instances of it, and
custom (e.g. tiny test) configs are built the same way. Conversion to and from the Hugging Face
``ChineseCLIPConfig`` dictionary lives here too, so ``config.json`` stays readable by transformers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cnclip_vision.errors import UnknownModelError

__all__ = [
    "VisionConfig",
    "TextConfig",
    "CLIPConfig",
    "ModelInfo",
    "list_models",
    "get_model_info",
    "get_config",
    "register_model_info",
    "ASSETS_DIR",
    "TOY_CONFIG",
    "TOY_DENSE_MODEL_DIR",
    "TOY_DETECTOR_DIR",
    "TOY_DETECTORS",
    "TOY_MODEL_DIR",
]

LOGIT_SCALE_INIT = 2.6592  # ln(1 / 0.07), the CLIP initialisation; released models sit at ln(100)


@dataclass(frozen=True)
class VisionConfig:
    """Image tower. ``kind="vit"``: OpenAI-CLIP ViT (QuickGELU, pre-norm). ``kind="resnet"``: ModifiedResNet."""

    kind: Literal["vit", "resnet"] = "vit"
    image_size: int = 224
    width: int = 768
    layers: int | tuple[int, ...] = 12
    heads: int = 12
    patch_size: int = 16
    mlp_ratio: float = 4.0

    def __post_init__(self) -> None:
        if isinstance(self.layers, list):
            object.__setattr__(self, "layers", tuple(self.layers))
        if self.kind not in ("vit", "resnet"):
            raise ValueError(f"VisionConfig.kind must be 'vit' or 'resnet', got {self.kind!r}")
        if self.kind == "vit":
            if not isinstance(self.layers, int):
                raise ValueError(f"a ViT needs an integer number of layers, got {self.layers!r}")
            if self.width % self.heads:
                raise ValueError(f"ViT width {self.width} is not divisible by heads {self.heads}")
            if self.image_size % self.patch_size:
                raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")

    @property
    def grid_size(self) -> int:
        return self.image_size // (self.patch_size if self.kind == "vit" else 32)


@dataclass(frozen=True)
class TextConfig:
    """BERT text tower (RoBERTa-wwm-ext / RBT3 of the released models); no pooler."""

    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    vocab_size: int = 21128
    max_position_embeddings: int = 512
    type_vocab_size: int = 2

    def to_bert_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``transformers.BertConfig`` (eps 1e-12, GELU, pad id 0)."""
        return dict(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            intermediate_size=self.intermediate_size,
            max_position_embeddings=self.max_position_embeddings,
            type_vocab_size=self.type_vocab_size,
            hidden_act="gelu",
            layer_norm_eps=1e-12,
            pad_token_id=0,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )


@dataclass(frozen=True)
class CLIPConfig:
    """A whole dual encoder: joint embedding size, image tower and text tower."""

    embed_dim: int = 512
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if isinstance(d["vision"]["layers"], tuple):
            d["vision"]["layers"] = list(d["vision"]["layers"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CLIPConfig:
        try:
            return cls(
                embed_dim=int(d["embed_dim"]),
                vision=VisionConfig(**d.get("vision", {})),
                text=TextConfig(**d.get("text", {})),
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"not a cnclip_vision config: {e}; expected keys embed_dim, vision, text") from e

    # --- Hugging Face ChineseCLIPConfig -------------------------------------------------------------
    def to_hf_dict(self) -> dict[str, Any]:
        """The ``config.json`` content transformers' ``ChineseCLIPModel`` reads (ViT towers only)."""
        if self.vision.kind != "vit":
            raise ValueError("transformers has no Chinese-CLIP ResNet class; only ViT configs convert")
        t, v = self.text, self.vision
        return {
            "architectures": ["ChineseCLIPModel"],
            "model_type": "chinese_clip",
            "projection_dim": self.embed_dim,
            "logit_scale_init_value": LOGIT_SCALE_INIT,
            "text_config": {"model_type": "chinese_clip_text_model", **t.to_bert_kwargs()},
            "vision_config": {
                "model_type": "chinese_clip_vision_model",
                "hidden_size": v.width,
                "intermediate_size": int(v.width * v.mlp_ratio),
                "num_hidden_layers": v.layers,
                "num_attention_heads": v.heads,
                "image_size": v.image_size,
                "patch_size": v.patch_size,
                "projection_dim": self.embed_dim,
                "hidden_act": "quick_gelu",
                "layer_norm_eps": 1e-5,
                "num_channels": 3,
            },
        }

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> CLIPConfig:
        """Read a Hugging Face ``ChineseCLIPConfig`` dictionary (missing fields take HF's defaults)."""
        t = d.get("text_config") or {}
        v = d.get("vision_config") or {}
        hidden = int(v.get("hidden_size", 768))
        act = v.get("hidden_act", "quick_gelu")
        if act != "quick_gelu":
            raise ValueError(f"vision_config.hidden_act is {act!r}; Chinese-CLIP uses 'quick_gelu'")
        return cls(
            embed_dim=int(d.get("projection_dim", 512)),
            vision=VisionConfig(
                kind="vit",
                image_size=int(v.get("image_size", 224)),
                width=hidden,
                layers=int(v.get("num_hidden_layers", 12)),
                heads=int(v.get("num_attention_heads", 12)),
                patch_size=int(v.get("patch_size", 32)),
                mlp_ratio=int(v.get("intermediate_size", 3072)) / hidden,
            ),
            text=TextConfig(
                hidden_size=int(t.get("hidden_size", 768)),
                num_layers=int(t.get("num_hidden_layers", 12)),
                num_heads=int(t.get("num_attention_heads", 12)),
                intermediate_size=int(t.get("intermediate_size", 3072)),
                vocab_size=int(t.get("vocab_size", 21128)),
                max_position_embeddings=int(t.get("max_position_embeddings", 512)),
                type_vocab_size=int(t.get("type_vocab_size", 2)),
            ),
        )


@dataclass(frozen=True)
class ModelInfo:
    """A registered model: its architecture and where its released weights live."""

    name: str
    config: CLIPConfig
    hub_id: str | None = None
    original_file: str | None = None  # the clip_cn_*.pt file name in the Hub repo
    local_path: str | None = None  # weights shipped inside this package
    description: str = ""


_BASE_TEXT = TextConfig()
_LARGE_TEXT = TextConfig(hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096)
_RBT3_TEXT = TextConfig(num_layers=3)

_REGISTRY: dict[str, ModelInfo] = {}


def register_model_info(info: ModelInfo) -> None:
    """Add a model to :func:`list_models` (used for the released sizes and shipped models)."""
    _REGISTRY[info.name] = info


for _info in (
    ModelInfo(
        "RN50",
        CLIPConfig(1024, VisionConfig(kind="resnet", width=64, layers=(3, 4, 6, 3), heads=32), _RBT3_TEXT),
        hub_id="OFA-Sys/chinese-clip-rn50",
        original_file="clip_cn_rn50.pt",
        description="ModifiedResNet-50 + RBT3, 77M parameters",
    ),
    ModelInfo(
        "ViT-B-16",
        CLIPConfig(512, VisionConfig(width=768, layers=12, heads=12, patch_size=16), _BASE_TEXT),
        hub_id="OFA-Sys/chinese-clip-vit-base-patch16",
        original_file="clip_cn_vit-b-16.pt",
        description="ViT-B/16 + RoBERTa-wwm-ext-base, 188M parameters",
    ),
    ModelInfo(
        "ViT-L-14",
        CLIPConfig(768, VisionConfig(width=1024, layers=24, heads=16, patch_size=14), _BASE_TEXT),
        hub_id="OFA-Sys/chinese-clip-vit-large-patch14",
        original_file="clip_cn_vit-l-14.pt",
        description="ViT-L/14 + RoBERTa-wwm-ext-base, 406M parameters",
    ),
    ModelInfo(
        "ViT-L-14-336",
        CLIPConfig(768, VisionConfig(image_size=336, width=1024, layers=24, heads=16, patch_size=14), _BASE_TEXT),
        hub_id="OFA-Sys/chinese-clip-vit-large-patch14-336px",
        original_file="clip_cn_vit-l-14-336.pt",
        description="ViT-L/14 at 336 px + RoBERTa-wwm-ext-base, 407M parameters",
    ),
    ModelInfo(
        "ViT-H-14",
        CLIPConfig(1024, VisionConfig(width=1280, layers=32, heads=16, patch_size=14), _LARGE_TEXT),
        hub_id="OFA-Sys/chinese-clip-vit-huge-patch14",
        original_file="clip_cn_vit-h-14.pt",
        description="ViT-H/14 (16 heads of width 80) + RoBERTa-wwm-ext-large, 958M parameters",
    ),
):
    register_model_info(_info)


# Models shipped inside the package (cnclip_vision/assets/): the toy world's tiny CLIP and its detector.
ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
TOY_MODEL_DIR = ASSETS_DIR / "toy-tiny"
TOY_DENSE_MODEL_DIR = ASSETS_DIR / "toy-tiny-dense"
TOY_DETECTOR_DIR = ASSETS_DIR / "toy-detector"
# the toy detector of each detection protocol (cnclip_vision.toy.world.PROTOCOLS), by shipped name
TOY_DETECTORS = {
    "compositional": "toy-detector",
    "held-out-shapes": "toy-detector-held-out-shapes",
    "held-out-colours": "toy-detector-held-out-colours",
}
# ViT 128 x 4 layers, patch 8 at 48 px (36 patches); BERT 128 x 2 layers with the real 21128-token
# vocabulary. Sized for fp32 on a 2-core CPU without bf16 matmul units (bf16 runs ~60x slower there).
TOY_CONFIG = CLIPConfig(
    embed_dim=128,
    vision=VisionConfig(image_size=48, width=128, layers=4, heads=2, patch_size=8),
    text=TextConfig(hidden_size=128, num_layers=2, num_heads=2, intermediate_size=512),
)
register_model_info(
    ModelInfo(
        "toy-tiny",
        TOY_CONFIG,
        local_path=str(TOY_MODEL_DIR),
        description="tiny model of the synthetic toy world (coloured shapes), shipped with the package; "
        "not a model of real images",
    )
)
register_model_info(
    ModelInfo(
        "toy-tiny-dense",
        TOY_CONFIG,
        local_path=str(TOY_DENSE_MODEL_DIR),
        description="toy-tiny with CLIPSelf-distilled dense tokens (recipes/toy-clipself.json; text tower "
        "unchanged), shipped with the package",
    )
)


def list_models() -> list[str]:
    """Names accepted by :func:`cnclip_vision.load` and :func:`cnclip_vision.create_model`."""
    return list(_REGISTRY)


def get_model_info(name: str) -> ModelInfo:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownModelError(f"unknown model name {name!r}; {suggest_model(name)}") from None


def suggest_model(name: str) -> str:
    """``did you mean 'toy-tiny'? known models: ...`` for a name that is not registered."""
    import difflib

    close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
    close += [k for k in _REGISTRY if k.lower() == str(name).lower() and k not in close]
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    return f"{hint}known models: {', '.join(_REGISTRY)}"


def get_config(arch: str | CLIPConfig) -> CLIPConfig:
    """A config from a registered name, or the config itself."""
    return arch if isinstance(arch, CLIPConfig) else get_model_info(arch).config


def match_registered(config: CLIPConfig) -> str | None:
    """Name of the registered size with exactly this config, if any."""
    return next((n for n, info in _REGISTRY.items() if info.config == config), None)
