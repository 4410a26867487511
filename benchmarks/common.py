"""Shared pieces of the side-by-side benchmarks: the machine, its roofline, FLOP counting, alternating
timing, the same random weights for ours and transformers, result rows (a table line and a JSON line each).

Figures, never asserts. Every script imports this module from its own folder (``python benchmarks/x.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without `pip install -e .` (e.g. the GPU machine)
    sys.path.insert(0, str(REPO))

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # random weights only: never reach the network
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

ROOFLINE_ENV = "CNCLIP_BENCH_ROOFLINE"  # run_all.py measures the roofline once and hands it down here

# 100 distinct Chinese class names (objects, animals, food, scenes); the first 40 are the text benchmark's.
LABELS = (
    "猫",
    "狗",
    "电动车",
    "自行车",
    "汽车",
    "公交车",
    "卡车",
    "摩托车",
    "飞机",
    "火车",
    "轮船",
    "鸟",
    "马",
    "牛",
    "羊",
    "猪",
    "鸡",
    "鸭子",
    "兔子",
    "老虎",
    "狮子",
    "大象",
    "熊猫",
    "长颈鹿",
    "斑马",
    "猴子",
    "蛇",
    "鱼",
    "乌龟",
    "蝴蝶",
    "苹果",
    "香蕉",
    "橙子",
    "西瓜",
    "葡萄",
    "草莓",
    "面条",
    "米饭",
    "饺子",
    "包子",
    "蛋糕",
    "披萨",
    "汉堡",
    "咖啡",
    "茶杯",
    "筷子",
    "碗",
    "盘子",
    "勺子",
    "菜刀",
    "椅子",
    "桌子",
    "沙发",
    "床",
    "电视",
    "电脑",
    "手机",
    "键盘",
    "鼠标",
    "书",
    "时钟",
    "花瓶",
    "剪刀",
    "雨伞",
    "背包",
    "手提包",
    "领带",
    "行李箱",
    "足球",
    "篮球",
    "网球拍",
    "滑板",
    "冲浪板",
    "风筝",
    "棒球棒",
    "滑雪板",
    "红绿灯",
    "消防栓",
    "停车标志",
    "长椅",
    "冰箱",
    "微波炉",
    "烤箱",
    "水槽",
    "牙刷",
    "吹风机",
    "泰迪熊",
    "盆栽",
    "花",
    "树",
    "山",
    "河流",
    "大海",
    "沙滩",
    "城市",
    "街道",
    "房子",
    "桥",
    "寺庙",
    "长城",
)
assert len(set(LABELS)) == 100


# ------------------------------------------------------------------------------------------- setup
def quiet() -> None:
    """Silence the deprecation chatter of torch.ao quantisation and transformers' loading bars."""
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*quantiz.*")
    warnings.filterwarnings("ignore", message=".*TypedStorage.*")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers missing is reported where it is used
        return
    import logging

    logging.getLogger("cnclip_vision").setLevel(logging.ERROR)


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny models and sizes: a smoke test of a few seconds")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per case (median); warm-up first")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's; quick: 1)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def setup(args: argparse.Namespace) -> None:
    if args.repeats is not None and args.repeats < 1:
        raise SystemExit("--repeats must be at least 1")
    quiet()
    if args.threads:
        torch.set_num_threads(args.threads)
    elif args.quick:  # tiny ops: on a shared machine OpenMP barriers across threads cost more than the work
        torch.set_num_threads(1)
    torch.manual_seed(args.seed)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str = "cpu") -> dict[str, Any]:
    import transformers

    flags = ""
    with contextlib.suppress(OSError):
        text = Path("/proc/cpuinfo").read_text()
        found = {f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8") if f" {f}" in text}
        flags = ",".join(sorted(found))
    info = {
        "cpu": cpu_model(),
        "cpu_flags": flags,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def bf16_fast() -> bool:
    """Whether this CPU has bf16 units (the library's own rule, torch's capability queries)."""
    from cnclip_vision.device import bf16_is_fast

    return bf16_is_fast("cpu")[0]


def parse_mode(mode: str) -> tuple[str, bool]:
    """``"int8+compile"`` -> ``("int8", True)``; ``"compile"`` is ``fp32+compile``."""
    precision, _, extra = ("fp32+compile" if mode == "compile" else mode).partition("+")
    if precision not in ("fp32", "bf16", "int8") or extra not in ("", "compile"):
        raise SystemExit(f"unknown mode {mode!r}; use PRECISION[+compile] with fp32, bf16 or int8")
    return precision, extra == "compile"


def cpu_modes(given: str | None, quick: bool) -> list[str]:
    """Our modes to time: ``given`` (comma-separated), else every precision this machine runs fast (bf16 only
    with bf16 units), each also under torch.compile when a C++ compiler is there; quick: fp32,int8."""
    import shutil

    if given:
        modes = [m for m in given.split(",") if m]
    elif quick:
        modes = ["fp32", "int8"]
    else:
        precisions = ["fp32", "int8"] + (["bf16"] if bf16_fast() else [])
        compiler = shutil.which("g++") or shutil.which("c++")
        modes = precisions + ([f"{p}+compile" for p in precisions] if compiler else [])
    for mode in modes:
        parse_mode(mode)
    return modes


def machine_short(info: dict[str, Any]) -> str:
    """The machine in a few words, recorded in every row: CPU, its bf16/AMX flags, cores and threads (+ GPU)."""
    gpu = f", {info['gpu']}" if info.get("gpu") else ""
    return f"{info['cpu']} [{info['cpu_flags'] or '-'}] {info['cores']}c/{info['threads']}t{gpu}"


def machine_line(info: dict[str, Any]) -> str:
    gpu = f", GPU {info['gpu']}" if info.get("gpu") else ""
    return (
        f"{info['cpu']} ({info['cpu_flags'] or 'no AVX flags read'}), {info['cores']} cores, "
        f"{info['threads']} torch threads, torch {info['torch']}, transformers {info['transformers']}{gpu}"
    )


def bench_config(arch: str, quick: bool) -> Any:
    """The registered size ``arch`` (full size), or with ``quick`` a tiny config of the same patch/image size."""
    if not quick:
        return arch
    from cnclip_vision.models.configs import CLIPConfig, TextConfig, VisionConfig, get_config

    v = get_config(arch).vision
    head = v.width // v.heads
    vision = VisionConfig(image_size=v.image_size, width=2 * head, layers=2, heads=2, patch_size=v.patch_size)
    text = TextConfig(hidden_size=128, num_layers=2, num_heads=2, intermediate_size=256)
    return CLIPConfig(embed_dim=64, vision=vision, text=text)


def arch_name(config: Any) -> str:
    return config if isinstance(config, str) else "tiny (quick)"


def make_weights(config: Any, directory: str | os.PathLike[str], seed: int = 0) -> Path:
    """Random weights of ``config`` written with ``save_pretrained`` (readable by ours and transformers).

    LayerNorms get non-trivial scales and shifts (as in the parity tests): with the (1, 0) initialisation a
    random network's outputs are dominated by a few directions and every cosine looks better than it is.
    """
    import cnclip_vision

    torch.manual_seed(seed)
    model = cnclip_vision.create_model(config)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.normal_(1.0, 0.1)
                module.bias.normal_(0.0, 0.1)
        model.logit_scale.fill_(math.log(100.0))
    model.save_pretrained(directory)
    return Path(directory)


@contextlib.contextmanager
def weights_dir(config: Any, seed: int = 0) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="cnclip-bench-") as tmp:
        yield make_weights(config, tmp, seed)


def load_hf(directory: Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Any:
    from transformers import ChineseCLIPModel

    try:
        model = ChineseCLIPModel.from_pretrained(directory, attn_implementation="sdpa", dtype=dtype)
    except TypeError:  # transformers 4.x spells it torch_dtype
        model = ChineseCLIPModel.from_pretrained(directory, attn_implementation="sdpa", torch_dtype=dtype)
    return model.to(device).eval()


def hf_features(out: Any) -> torch.Tensor:
    """transformers 5 returns an output object from get_*_features (``pooler_output``), 4.x a tensor."""
    if isinstance(out, torch.Tensor):
        return out
    pooled = getattr(out, "pooler_output", None)
    if pooled is None:
        pooled = out[0]
    return pooled


def cosine_min(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(ours.float().cpu(), ref.float().cpu(), dim=-1).min())


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float().cpu() - b.float().cpu()).abs().max())


# ---------------------------------------------------------------------------------------- roofline
@dataclass
class Roofline:
    """Matrix-product rates of this machine in GFLOP/s (int8: GOP/s of a dynamically quantised Linear).

    ``bf16`` is the rate of ``F.linear`` in bf16, what the models' Linear layers run (oneDNN); on CPUs without
    bf16 units a plain bf16 ``a @ b`` takes a much slower path, reported as ``bf16_matmul`` for information."""

    device: str
    fp32: float
    bf16: float
    fp16: float | None
    int8: float | None
    how: str
    bf16_matmul: float | None = None

    def rate(self, kind: str) -> float | None:
        return getattr(self, kind, None)

    def items_per_s(self, kind: str, gflop_per_item: float | None) -> float | None:
        rate = self.rate(kind)
        if rate is None or not gflop_per_item:
            return None
        return rate / gflop_per_item

    def line(self) -> str:
        parts = [f"fp32 {self.fp32:.1f}", f"bf16 {self.bf16:.1f}"]
        if self.bf16_matmul:
            parts.append(f"bf16 a@b {self.bf16_matmul:.1f}")
        if self.fp16:
            parts.append(f"fp16 {self.fp16:.1f}")
        if self.int8:
            parts.append(f"int8 {self.int8:.1f} (GOP/s)")
        return f"roofline ({self.device}): " + ", ".join(parts) + f" GFLOP/s; {self.how}"


def _median_seconds(fn: Callable[[], object], repeats: int, sync: Callable[[], None]) -> float:
    fn()
    sync()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def measure_roofline(device: str = "cpu", quick: bool = False) -> Roofline:
    """Median rate of square matrix products ``F.linear(a, b)`` (= a @ b.T, what Linear layers run; on the CPU
    the faster of it and oneDNN's linear): fp32 2048 and bf16 1024 on the CPU (plus a plain bf16 ``a @ b`` at
    512, slow on CPUs without bf16 units), a
    dynamically quantised int8 ``Linear`` 2048x2048 on 2048 rows; 8192 on a GPU."""
    sync = (lambda: torch.cuda.synchronize()) if device.startswith("cuda") else (lambda: None)

    def gflops(n: int, dtype: torch.dtype, repeats: int, linear: bool = True, onednn: bool = False) -> float:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        if onednn:  # what compile=True runs on the CPU (inductor freezing → oneDNN's linear)
            fn = lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")  # noqa: E731
        else:
            fn = (lambda: torch.nn.functional.linear(a, b)) if linear else (lambda: a @ b)
        return 2 * n**3 / _median_seconds(fn, repeats, sync) / 1e9

    def best(n: int, dtype: torch.dtype, repeats: int) -> tuple[float, str]:
        """The faster of F.linear (MKL in fp32: on AMD CPUs it keeps to AVX2, half of oneDNN's rate on an
        AVX-512 EPYC) and oneDNN's linear; which one is named in the roofline's line."""
        rate, how = gflops(n, dtype, repeats), "F.linear"
        with contextlib.suppress(Exception):  # a build without oneDNN
            direct = gflops(n, dtype, repeats, onednn=True)
            if direct > rate:
                rate, how = direct, f"oneDNN linear (F.linear {rate:.0f})"
        return rate, how

    if device.startswith("cuda"):
        n = 4096 if quick else 8192
        prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        fp32 = gflops(n, torch.float32, 5)
        torch.backends.cuda.matmul.allow_tf32 = prev
        return Roofline(
            device,
            fp32,
            gflops(n, torch.bfloat16, 10),
            gflops(n, torch.float16, 10),
            None,
            f"{n}x{n} F.linear, median of 5-10 (fp32 without TF32)",
        )
    n32, n16 = (1024, 256) if quick else (2048, 1024)
    fp32, fp32_how = best(n32, torch.float32, 5)
    bf16, bf16_how = best(n16, torch.bfloat16, 3)
    bf16_matmul = gflops(n16 // 2, torch.bfloat16, 3, linear=False)
    int8 = None
    with contextlib.suppress(Exception), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic

        linear = quantize_dynamic(torch.nn.Sequential(torch.nn.Linear(n32, n32)), {torch.nn.Linear}, dtype=torch.qint8)
        x = torch.randn(n32, n32)
        with torch.inference_mode():
            int8 = 2 * n32**3 / _median_seconds(lambda: linear(x), 5, sync) / 1e9
    return Roofline(
        "cpu",
        fp32,
        bf16,
        None,
        int8,
        f"fp32 {n32}x{n32} {fp32_how}, bf16 {n16}x{n16} {bf16_how} (a@b {n16 // 2}), int8 dynamic-quantised "
        f"Linear {n32}, medians",
        bf16_matmul,
    )


def get_roofline(device: str = "cpu", quick: bool = False) -> Roofline:
    """The roofline handed down by run_all.py (same device), else measured now."""
    raw = os.environ.get(ROOFLINE_ENV)
    if raw:
        with contextlib.suppress(ValueError, TypeError, KeyError):
            data = json.loads(raw)
            if data.get("device", "cpu").split(":")[0] == device.split(":")[0]:
                return Roofline(**data)
    return measure_roofline(device, quick)


# -------------------------------------------------------------------------------------------- flops
def count_gflop(fn: Callable[..., object], *inputs: Any, fake: bool = True) -> float:
    """GFLOP of ``fn(*inputs)``, counted by ``FlopCounterMode`` with attention in SDPA's math backend (so
    its two batched products are counted too). With ``fake`` the inputs become fake tensors: nothing is
    computed, the count is instant even for large inputs (the parameters stay real)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode())
        stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        if fake:
            from torch._subclasses.fake_tensor import FakeTensorMode

            mode = stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
            inputs = tuple(mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in inputs)
        counter = stack.enter_context(FlopCounterMode(display=False))
        fn(*inputs)
    return counter.get_total_flops() / 1e9


# ------------------------------------------------------------------------------------------- timing
def make_sync(device: str) -> Callable[[], None]:
    if str(device).startswith("cuda"):
        return lambda: torch.cuda.synchronize()
    return lambda: None


def alternate(
    cases: dict[str, Callable[[], Any]],
    repeats: int,
    *,
    warmup: int = 1,
    sync: Callable[[], None] = lambda: None,
    warmup_cases: dict[str, Callable[[], Any]] | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Warm each case up, then time ``repeats`` rounds in which every case runs once; the order flips each
    round so a slow drift of the machine (other load, heat) hits every case alike.

    ``warmup_cases[name]``, where given, replaces the warm-up call (e.g. a smaller input that only warms the
    kernels up). Returns the seconds of every timed run per case, and each case's output: of its warm-up
    call, or of its first timed run where the warm-up was a ``warmup_cases`` one (or there was none)."""
    outputs: dict[str, Any] = {}
    replace = set(warmup_cases or ()) if warmup > 0 else set(cases)
    for name, fn in cases.items():
        warm = (warmup_cases or {}).get(name, fn)
        for _ in range(max(warmup, 0)):
            start = time.perf_counter()
            outputs[name] = warm()
            sync()
            if log:
                log(f"  warm-up {name}: {time.perf_counter() - start:.2f} s")
    times: dict[str, list[float]] = {name: [] for name in cases}
    names = list(cases)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            out = cases[name]()
            sync()
            times[name].append(time.perf_counter() - start)
            if name in replace:
                outputs[name] = out
                replace.discard(name)
            if log:
                log(f"  run {r + 1}/{repeats} {name}: {times[name][-1]:.2f} s")
    return times, outputs


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- rows
def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def row(
    script: str,
    measure: str,
    ours: str,
    reference: str,
    *,
    unit: str,
    ours_value: float | None,
    ref_value: float | None,
    target: float | None = None,
    target_kind: str = "min",
    cosine: float | None = None,
    ours_roofline: float | None = None,
    ref_roofline: float | None = None,
    ours_gflop: float | None = None,
    ref_gflop: float | None = None,
    headline: bool = False,
    notes: str = "",
    ratio: float | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One result: ``ratio`` = ours / reference (``target_kind`` "min": at least ``target``; "max": at most)."""
    ratio = _ratio(ours_value, ref_value) if ratio is None else ratio
    meets = None
    if target is not None and ratio is not None:
        meets = ratio >= target if target_kind == "min" else ratio <= target
    return {
        "script": script,
        "measure": measure,
        "ours": ours,
        "reference": reference,
        "unit": unit,
        "ours_value": ours_value,
        "ref_value": ref_value,
        "ratio": ratio,
        "target": None if target is None else (f">= {target:g}x" if target_kind == "min" else f"<= {target:g}x"),
        "target_ratio": target,
        "meets_target": meets,
        "cosine_min": cosine,
        "ours_roofline": ours_roofline,
        "ref_roofline": ref_roofline,
        "ours_gflop_per_item": ours_gflop,
        "ref_gflop_per_item": ref_gflop,
        "headline": headline,
        "notes": notes,
        **extra,
    }


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value == 0 or not math.isfinite(value):
            return f"{value:g}"
        magnitude = math.floor(math.log10(abs(value)))
        decimals = max(0, digits - 1 - magnitude)
        return f"{value:,.{decimals}f}"
    return str(value)


def fmt_cos(value: float | None) -> str:
    return "-" if value is None else f"{value:.6f}"


COLUMNS = (
    "measure",
    "ours",
    "reference",
    "ours value",
    "ours roofline",
    "ref value",
    "ref roofline",
    "unit",
    "ours/ref",
    "target",
    "met",
    "cos min",
    "notes",
    "machine",
)


def cells(r: dict[str, Any]) -> list[str]:
    mark = " **(headline)**" if r.get("headline") else ""
    ratio = "-" if r.get("ratio") is None else f"{r['ratio']:.2f}x"
    return [
        r["measure"],
        r["ours"] + mark,
        r["reference"],
        fmt(r.get("ours_value")),
        fmt(r.get("ours_roofline")),
        fmt(r.get("ref_value")),
        fmt(r.get("ref_roofline")),
        r.get("unit", ""),
        ratio,
        r.get("target") or "-",
        fmt(r.get("meets_target")),
        fmt_cos(r.get("cosine_min")),
        r.get("notes", ""),
        r.get("machine", ""),
    ]


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells(r)) + " |")
    return "\n".join(lines)


class Report:
    """Prints each row as it comes (a table line and a ``{"row": ...}`` JSON line for run_all.py)."""

    def __init__(self, script: str, info: dict[str, Any], roofline: Roofline | None) -> None:
        self.script = script
        self.machine = machine_short(info)
        self.rows: list[dict[str, Any]] = []
        print(f"# {script}: {machine_line(info)}", flush=True)
        print(json.dumps({"machine": info}, ensure_ascii=False), flush=True)
        if roofline is not None:
            print(f"# {roofline.line()}", flush=True)
            print(json.dumps({"roofline": asdict(roofline)}), flush=True)

    def row(self, measure: str, ours: str, reference: str, **kwargs: Any) -> dict[str, Any]:
        """A row of this script, not printed yet (see :meth:`emit`)."""
        return row(self.script, measure, ours, reference, **kwargs)

    def add(self, measure: str, ours: str, reference: str, **kwargs: Any) -> dict[str, Any]:
        return self.emit(self.row(measure, ours, reference, **kwargs))

    def emit(self, r: dict[str, Any]) -> dict[str, Any]:
        r.setdefault("machine", self.machine)
        self.rows.append(r)
        print("| " + " | ".join(cells(r)) + " |", flush=True)
        print(json.dumps({"row": r}, ensure_ascii=False), flush=True)
        return r

    def skipped(self, measure: str, reason: str) -> None:
        print(f"skipped: {measure}: {reason}", flush=True)
        self.add(
            measure, "skipped", "-", unit="-", ours_value=None, ref_value=None, notes=f"skipped: {reason}", skipped=True
        )

    def done(self) -> None:
        print(f"\n## {self.script}\n" + markdown_table(self.rows), flush=True)


def mark_headline(rows: list[dict[str, Any]], min_cosine: float = 0.999) -> dict[str, Any] | None:
    """The fastest row whose cosine is at least ``min_cosine`` (the fastest at all when none has a cosine)."""
    good = [r for r in rows if r.get("ours_value") and (r.get("cosine_min") is None or r["cosine_min"] >= min_cosine)]
    if not good:
        return None
    best = max(good, key=lambda r: r["ours_value"])
    best["headline"] = True
    return best


def run_suites(parser: Any, args: Any, script: str, cpu_suite: Any, same_precision: Any) -> int:
    """The shared main of bench_image / bench_text: the CPU suite by default, else the same-precision
    comparison (``--precision``, e.g. on a GPU)."""
    setup(args)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("skipped: --device cuda but torch sees no CUDA GPU", flush=True)
        return 2
    config = bench_config(args.arch, args.quick)
    roofline = get_roofline(args.device, args.quick)
    report = Report(script, machine_info(args.device), roofline)
    with weights_dir(config, args.seed) as directory:
        if args.precision is None:
            if args.device != "cpu":
                parser.error("the default suite is the CPU one; with --device cuda give --precision bf16|fp16|fp32")
            cpu_suite(args, config, directory, roofline, report)
        else:
            same_precision(args, config, directory, roofline, report)
    report.done()
    return 0


def onnx_image_session(model: Any, out: str) -> tuple[Any, str, str, float, str]:
    """Export ``model``'s encoders to ``out`` and open ``image_encoder.onnx`` in onnxruntime (CPU provider, torch's
    thread count, spinning off: in one process ORT's idle threads would otherwise take the cores from torch's
    next run). Returns ``(session, input name, output name, export seconds, onnxruntime version)``; raises
    ``RuntimeError`` with the reason where the exporter or onnxruntime is missing."""
    try:
        from cnclip_vision.export.onnx import export_onnx
    except ImportError as e:
        raise RuntimeError(f"cnclip_vision.export.onnx.export_onnx is not available ({e})") from e
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise RuntimeError(f"onnxruntime is not installed ({e}); pip install 'cnclip-vision[onnx]'") from e
    start = time.perf_counter()
    export_onnx(model, out, check=False)
    export_seconds = time.perf_counter() - start
    log(f"exported in {export_seconds:.0f} s")
    onnx_file = Path(out) / "image_encoder.onnx"
    if not onnx_file.is_file():
        files = sorted(p.name for p in Path(out).iterdir())
        raise RuntimeError(f"export_onnx wrote no {onnx_file.name} (files: {files})")
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])
    return session, session.get_inputs()[0].name, session.get_outputs()[0].name, export_seconds, ort.__version__
