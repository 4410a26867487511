"""Chinese names of the 80 COCO categories and the OV-COCO base/novel split, kept as data.

No public benchmark has Chinese category names, so this table defines ours: one primary name per class
(used as the ``"name"`` of converted files and as the detector's vocabulary) plus synonyms (alternative
prompts, and accepted wherever a category is looked up by name). Ids are the official, non-contiguous
COCO ids (1..90). The OV-COCO split (Bansal et al. 2018, as used by OVR-CNN, ViLD, F-VLM, ...) keeps 48
base and 17 novel classes; the other 15 are excluded from training and evaluation.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cnclip_vision.errors import CNClipError

__all__ = [
    "COCO_CATEGORIES",
    "OVCOCO_BASE_IDS",
    "OVCOCO_EXCLUDED_IDS",
    "OVCOCO_NOVEL_IDS",
    "CocoCategory",
    "NameMapError",
    "UnknownCategoryError",
    "chinese_name",
    "get_coco_category",
    "ovcoco_split",
    "read_name_map",
]


class NameMapError(CNClipError, ValueError):
    """A name-map file (JSON or TSV, English -> Chinese) is malformed; names the file and line."""


class UnknownCategoryError(CNClipError, KeyError):
    """A COCO category id or name that is not in the table."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class CocoCategory:
    """One COCO category: official id and English name, our Chinese name and synonyms."""

    id: int
    english_name: str
    name: str
    synonyms: tuple[str, ...] = ()
    supercategory: str = ""

    @property
    def names(self) -> tuple[str, ...]:
        """The primary Chinese name followed by its synonyms."""
        return (self.name, *self.synonyms)


_C = CocoCategory
COCO_CATEGORIES: tuple[CocoCategory, ...] = (
    _C(1, "person", "人", ("行人", "人物"), "person"),
    _C(2, "bicycle", "自行车", ("单车", "脚踏车"), "vehicle"),
    _C(3, "car", "汽车", ("轿车", "小汽车"), "vehicle"),
    _C(4, "motorcycle", "摩托车", ("机车",), "vehicle"),
    _C(5, "airplane", "飞机", ("客机",), "vehicle"),
    _C(6, "bus", "公交车", ("公共汽车", "巴士", "大巴"), "vehicle"),
    _C(7, "train", "火车", ("列车",), "vehicle"),
    _C(8, "truck", "卡车", ("货车",), "vehicle"),
    _C(9, "boat", "船", ("小船", "船只"), "vehicle"),
    _C(10, "traffic light", "红绿灯", ("交通信号灯", "信号灯"), "outdoor"),
    _C(11, "fire hydrant", "消防栓", ("消火栓",), "outdoor"),
    _C(13, "stop sign", "停车标志", ("停止标志",), "outdoor"),
    _C(14, "parking meter", "停车计时器", ("咪表",), "outdoor"),
    _C(15, "bench", "长椅", ("长凳",), "outdoor"),
    _C(16, "bird", "鸟", ("小鸟",), "animal"),
    _C(17, "cat", "猫", ("猫咪",), "animal"),
    _C(18, "dog", "狗", ("小狗",), "animal"),
    _C(19, "horse", "马", ("骏马",), "animal"),
    _C(20, "sheep", "羊", ("绵羊",), "animal"),
    _C(21, "cow", "牛", ("奶牛",), "animal"),
    _C(22, "elephant", "大象", ("象",), "animal"),
    _C(23, "bear", "熊", ("狗熊",), "animal"),
    _C(24, "zebra", "斑马", (), "animal"),
    _C(25, "giraffe", "长颈鹿", (), "animal"),
    _C(27, "backpack", "背包", ("双肩包",), "accessory"),
    _C(28, "umbrella", "雨伞", ("伞",), "accessory"),
    _C(31, "handbag", "手提包", ("手袋",), "accessory"),
    _C(32, "tie", "领带", (), "accessory"),
    _C(33, "suitcase", "手提箱", ("行李箱",), "accessory"),
    _C(34, "frisbee", "飞盘", (), "sports"),
    _C(35, "skis", "滑雪板", ("双板滑雪板",), "sports"),
    _C(36, "snowboard", "单板滑雪板", ("滑雪单板",), "sports"),
    _C(37, "sports ball", "球", ("运动球", "皮球"), "sports"),
    _C(38, "kite", "风筝", (), "sports"),
    _C(39, "baseball bat", "棒球棒", ("球棒",), "sports"),
    _C(40, "baseball glove", "棒球手套", (), "sports"),
    _C(41, "skateboard", "滑板", (), "sports"),
    _C(42, "surfboard", "冲浪板", (), "sports"),
    _C(43, "tennis racket", "网球拍", ("球拍",), "sports"),
    _C(44, "bottle", "瓶子", ("瓶",), "kitchen"),
    _C(46, "wine glass", "酒杯", ("红酒杯", "高脚杯"), "kitchen"),
    _C(47, "cup", "杯子", ("茶杯", "水杯"), "kitchen"),
    _C(48, "fork", "叉子", ("餐叉",), "kitchen"),
    _C(49, "knife", "刀", ("餐刀", "刀子"), "kitchen"),
    _C(50, "spoon", "勺子", ("汤匙", "调羹"), "kitchen"),
    _C(51, "bowl", "碗", (), "kitchen"),
    _C(52, "banana", "香蕉", (), "food"),
    _C(53, "apple", "苹果", (), "food"),
    _C(54, "sandwich", "三明治", (), "food"),
    _C(55, "orange", "橙子", ("橘子", "桔子"), "food"),
    _C(56, "broccoli", "西兰花", ("西蓝花", "花椰菜"), "food"),
    _C(57, "carrot", "胡萝卜", (), "food"),
    _C(58, "hot dog", "热狗", (), "food"),
    _C(59, "pizza", "披萨", ("比萨",), "food"),
    _C(60, "donut", "甜甜圈", (), "food"),
    _C(61, "cake", "蛋糕", (), "food"),
    _C(62, "chair", "椅子", (), "furniture"),
    _C(63, "couch", "沙发", (), "furniture"),
    _C(64, "potted plant", "盆栽", ("盆栽植物",), "furniture"),
    _C(65, "bed", "床", (), "furniture"),
    _C(67, "dining table", "餐桌", ("桌子",), "furniture"),
    _C(70, "toilet", "马桶", ("坐便器",), "furniture"),
    _C(72, "tv", "电视", ("电视机",), "electronic"),
    _C(73, "laptop", "笔记本电脑", ("手提电脑",), "electronic"),
    _C(74, "mouse", "鼠标", (), "electronic"),
    _C(75, "remote", "遥控器", (), "electronic"),
    _C(76, "keyboard", "键盘", (), "electronic"),
    _C(77, "cell phone", "手机", ("移动电话",), "electronic"),
    _C(78, "microwave", "微波炉", (), "appliance"),
    _C(79, "oven", "烤箱", (), "appliance"),
    _C(80, "toaster", "烤面包机", ("吐司机",), "appliance"),
    _C(81, "sink", "水槽", ("水池", "洗手池"), "appliance"),
    _C(82, "refrigerator", "冰箱", ("电冰箱",), "appliance"),
    _C(84, "book", "书", ("书本",), "indoor"),
    _C(85, "clock", "时钟", ("钟", "钟表"), "indoor"),
    _C(86, "vase", "花瓶", (), "indoor"),
    _C(87, "scissors", "剪刀", (), "indoor"),
    _C(88, "teddy bear", "泰迪熊", ("玩具熊", "毛绒熊"), "indoor"),
    _C(89, "hair drier", "吹风机", ("电吹风",), "indoor"),
    _C(90, "toothbrush", "牙刷", (), "indoor"),
)
del _C

# OV-COCO (DESIGN.md §6): 48 base classes for training, 17 novel ones seen only at test time.
OVCOCO_BASE_IDS: tuple[int, ...] = (
    1,
    2,
    3,
    4,
    7,
    8,
    9,
    15,
    16,
    19,
    20,
    23,
    24,
    25,
    27,
    31,
    33,
    34,
    35,
    38,
    42,
    44,
    48,
    50,
    51,
    52,
    53,
    54,
    55,
    56,
    57,
    59,
    60,
    62,
    65,
    70,
    72,
    73,
    74,
    75,
    78,
    79,
    80,
    82,
    84,
    85,
    86,
    90,
)
OVCOCO_NOVEL_IDS: tuple[int, ...] = (5, 6, 17, 18, 21, 22, 28, 32, 36, 41, 47, 49, 61, 63, 76, 81, 87)
OVCOCO_EXCLUDED_IDS: tuple[int, ...] = tuple(
    sorted({c.id for c in COCO_CATEGORIES} - set(OVCOCO_BASE_IDS) - set(OVCOCO_NOVEL_IDS))
)

_BY_ID = {c.id: c for c in COCO_CATEGORIES}
_BY_ENGLISH = {c.english_name: c for c in COCO_CATEGORIES}
_BY_CHINESE = {n: c for c in COCO_CATEGORIES for n in c.names}


def get_coco_category(key: int | str) -> CocoCategory:
    """The category with this COCO id, English name (case-insensitive) or Chinese name / synonym."""
    if isinstance(key, bool):
        raise TypeError(f"a COCO category is an id or a name, got {key!r}")
    if isinstance(key, int):
        if key in _BY_ID:
            return _BY_ID[key]
        raise UnknownCategoryError(f"unknown COCO category id {key} (ids are 1..90, 80 of them used)")
    if isinstance(key, str):
        text = key.strip()
        found = _BY_ENGLISH.get(text.lower()) or _BY_CHINESE.get(text)
        if found is not None:
            return found
        if text.isdigit():
            return get_coco_category(int(text))
        raise UnknownCategoryError(
            f"unknown COCO category {key!r} (expected an id, an English name such as 'umbrella' or a Chinese "
            "name such as 雨伞)"
        )
    raise TypeError(f"a COCO category is an id or a name, got {type(key).__name__}")


def chinese_name(id_or_english: int | str) -> str:
    """Our primary Chinese name of a COCO category given by id (``28``) or English name (``"umbrella"``)."""
    return get_coco_category(id_or_english).name


def ovcoco_split(category_id: int) -> Literal["base", "novel", "excluded"]:
    """Where a COCO category id falls in the OV-COCO split."""
    get_coco_category(category_id)  # unknown ids raise
    if category_id in OVCOCO_BASE_IDS:
        return "base"
    return "novel" if category_id in OVCOCO_NOVEL_IDS else "excluded"


def read_name_map(path: str | os.PathLike[str]) -> dict[str, str]:
    """Read an English -> Chinese name map: a JSON object ``{"umbrella": "雨伞", ...}`` or a two-column
    TSV (``english<TAB>chinese`` per line; blank lines and ``#`` comments skipped; a first line
    ``english<TAB>chinese`` is taken as a header). Raises :class:`NameMapError` naming the file and line."""
    path = Path(path)
    if path.is_dir():
        raise NameMapError(f"name map {path} is a folder; expected a JSON object or a two-column TSV file")
    if not path.is_file():
        raise FileNotFoundError(f"name map {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise NameMapError(f"{path}: not UTF-8 text ({e})") from e
    if path.suffix.lower() == ".json" or text.lstrip().startswith("{"):
        return _name_map_json(text, path)
    mapping: dict[str, str] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        cells = [c.strip() for c in line.split("\t")]
        if len(cells) != 2 or not all(cells):
            raise NameMapError(
                f"{path}:{lineno}: expected two tab-separated columns 'english<TAB>chinese', got {line!r}"
            )
        english, chinese = cells
        if not mapping and (english.lower(), chinese.lower()) == ("english", "chinese"):
            continue  # header
        if english in mapping and mapping[english] != chinese:
            raise NameMapError(f"{path}:{lineno}: {english!r} is mapped twice ({mapping[english]!r} and {chinese!r})")
        mapping[english] = chinese
    if not mapping:
        raise NameMapError(f"{path}: the name map is empty")
    return mapping


def _name_map_json(text: str, path: Path) -> dict[str, str]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise NameMapError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from e
    if not isinstance(data, dict) or not data:
        raise NameMapError(f"{path}: expected a non-empty JSON object {{english: chinese}}, got {type(data).__name__}")
    for key, value in data.items():
        if not isinstance(value, str) or not value.strip():
            raise NameMapError(f"{path}: the value of {key!r} must be a non-empty string, got {value!r}")
    return {k.strip(): v.strip() for k, v in data.items()}
