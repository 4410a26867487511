#!/usr/bin/env bash
# GPU benchmarks (under 5 minutes on one CUDA GPU): image and text embedding in bf16 and fp16 at batch 256,
# ours against transformers' ChineseCLIPModel with the same dtype and batch, same random ViT-B-16 weights:
#   bench_image.py / bench_text.py --device cuda --batch-size 256 --precision {bf16,fp16}
# through run_all.py --gpu, which writes build/bench/gpu/results.{json,md}. Figures, never asserts.
#
#   bash benchmarks/gpu.sh                 # uses .venv/bin/python if present, else python3
#   PYTHON=/path/to/python bash benchmarks/gpu.sh [run_all.py options, e.g. --repeats 20]
set -euo pipefail

cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
# the checkout itself on the path: works without `pip install -e .` (needs torch, timm, transformers)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# --- preflight: a CUDA GPU that torch can use, and the packages the benchmarks import -----------------
if ! "$PYTHON" - <<'EOF'
import sys
try:
    import torch
except ImportError as e:
    sys.exit(f"gpu.sh: torch is not importable: {e}")
if not torch.cuda.is_available():
    sys.exit(f"gpu.sh: no CUDA GPU visible to torch {torch.__version__} (CUDA build: {torch.version.cuda}); "
             "run this on a machine with an NVIDIA GPU and a CUDA build of torch")
missing = []
for name in ("timm", "transformers", "safetensors", "cnclip_vision"):
    try:
        __import__(name)
    except ImportError as e:
        missing.append(f"{name} ({e})")
if missing:
    sys.exit("gpu.sh: missing Python packages: " + ", ".join(missing))
print(f"gpu.sh: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
EOF
then
    exit 2
fi
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader || true
fi

exec timeout 290 "$PYTHON" benchmarks/run_all.py --gpu "$@"
