# cnclip-vision: every target creates / reuses .venv and installs what it needs.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# This machine's pip serves these two from local disk; override elsewhere, e.g. TORCH_SPEC="torch torchvision".
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed

.PHONY: install check typecheck format test test-fast demo bench toy-model toy-tiny-dense toy-detector toy-detectors-held-out clean serve-demo bench-serve

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps "cn-clip==1.6.0"
	@# the `cnclip serve` browser test drives Debian's chromium (with a CJK font); without them it fails with this hint
	command -v chromium >/dev/null && command -v chromedriver >/dev/null && fc-list 2>/dev/null | grep -qi "Noto Sans CJK" || \
		(apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver fonts-noto-cjk) || \
		echo "WARNING: could not install chromium chromium-driver fonts-noto-cjk (apt-get, as root): the browser test will fail"
	touch $(STAMP)

# Lint, format and types (pyproject.toml [tool.ruff], [tool.mypy]); `make test` runs it first, so CI does too.
check: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(MAKE) --no-print-directory typecheck

# mypy over the package as it is installed: detection/ is cnclip_vision.detection (the package-dir mapping,
# which mypy cannot follow), so it runs on a tree of links under build/typecheck.
TYPECHECK := build/typecheck
typecheck: $(STAMP)
	rm -rf $(TYPECHECK) && mkdir -p $(TYPECHECK)/cnclip_vision
	for f in cnclip_vision/*; do ln -s ../../../$$f $(TYPECHECK)/cnclip_vision/; done
	ln -s ../../../detection $(TYPECHECK)/cnclip_vision/detection
	cd $(TYPECHECK) && ../../$(BIN)/mypy --config-file ../../pyproject.toml -p cnclip_vision

# Apply ruff's fixes and formatting in place.
format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: check
	$(BIN)/python -m pytest -q -ra --durations=20

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -ra -m "not slow"

demo: $(STAMP)
	$(BIN)/python examples/demo.py --output demo_output

# Side-by-side benchmarks (ours vs transformers / onnxruntime on the same random full-size weights): figures,
# never asserts. About 20-25 minutes on a 2-core CPU; results also in build/bench/results.{json,md}.
bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

# The tiny toy-world model shipped in cnclip_vision/assets/toy-tiny: train (fixed seed, fp32), check the
# quality bars on freshly generated held-out data, export in fp16.
toy-model: $(STAMP)
	$(BIN)/cnclip train --config recipes/toy-tiny.json --output-dir build/toy-tiny
	$(BIN)/cnclip toy-eval --model build/toy-tiny/model --check --output build/toy-tiny/quality.json
	$(BIN)/cnclip toy-export build/toy-tiny/model
	$(BIN)/cnclip toy-eval --model toy-tiny --check

# toy-tiny with CLIPSelf-distilled dense tokens (region-level on the toy objects' boxes, 3 x 3 bins; images only,
# text tower untouched), shipped as cnclip_vision/assets/toy-tiny-dense; about 12 minutes on 2 CPU cores.
toy-tiny-dense: $(STAMP)
	$(BIN)/cnclip clipself --config recipes/toy-clipself.json
	$(BIN)/cnclip toy-export build/toy-clipself/model --dst cnclip_vision/assets/toy-tiny-dense

# The toy-world detector shipped in cnclip_vision/assets/toy-detector: base-only training data (novel objects
# unlabelled) and fresh held-out scenes with all 64 categories, training on toy-tiny (at most 15 minutes on
# 2 CPU cores), the quality bars per VLM mode, export in fp16.
TOY_DET_DATA := build/toy-detector-data
toy-detector: $(STAMP)
	$(BIN)/cnclip toy-data detection $(TOY_DET_DATA)/train --n 4000 --seed 0 --image-size 128 --base-only
	$(BIN)/cnclip toy-data detection $(TOY_DET_DATA)/val --n 500 --seed 777 --image-size 128
	$(BIN)/cnclip train-detector --config recipes/toy-detector.json
	$(BIN)/cnclip toy-detector-eval --detector build/toy-detector/detector --annotations $(TOY_DET_DATA)/val/annotations.json --check --output build/toy-detector/quality.json
	$(BIN)/cnclip toy-detector-export build/toy-detector/detector

# The attribute-held-out toy detectors (every category of two whole shapes, or of two whole colours, withheld
# from training; novel objects stay in the images unlabelled), same recipe, shipped as
# cnclip_vision/assets/toy-detector-held-out-{shapes,colours}; about 5 minutes each on 2 CPU cores. Each ships
# with the VLM branch that scored best on its novel categories (README, "Two protocols"): crops for shapes
# (the region head never saw those outlines), off for colours.
toy-detectors-held-out: $(STAMP)
	set -e; for PM in held-out-shapes:crops held-out-colours:off; do \
	  P=$${PM%%:*}; M=$${PM##*:}; D=build/toy-det-$$P; \
	  $(BIN)/cnclip toy-data detection $$D-data/train --n 4000 --seed 0 --image-size 128 --base-only --protocol $$P; \
	  $(BIN)/cnclip toy-data detection $$D-data/val --n 500 --seed 777 --image-size 128 --protocol $$P; \
	  $(BIN)/cnclip train-detector --config recipes/toy-detector.json --output-dir $$D \
	    --train-data $$D-data/train/annotations.json --eval-data $$D-data/val/annotations.json; \
	  $(BIN)/cnclip toy-detector-eval --detector $$D/detector --annotations $$D-data/val/annotations.json \
	    --check --output $$D/quality.json; \
	  $(BIN)/cnclip toy-detector-export $$D/detector --vlm-mode $$M; \
	done

# The service and its web page on the toy world, offline: http://127.0.0.1:8000 (toy-tiny, toy-detector, a toy index)
SERVE_DEMO := build/serve-demo
serve-demo: $(STAMP)
	$(BIN)/python -m cnclip_vision.serve.demo $(SERVE_DEMO)
	$(BIN)/cnclip serve --index $(SERVE_DEMO)/index --model toy-tiny --detector toy-detector

# Load test of `cnclip serve` on loopback (1 and 8 clients x 200 requests per scenario); figures, never asserts
bench-serve: $(STAMP)
	mkdir -p build/bench
	$(BIN)/python benchmarks/bench_serve.py --json build/bench/serve.json

clean:
	rm -rf $(VENV) demo_output .pytest_cache
