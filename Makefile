# Two entry points (see README): `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DATA := data/shapes
RUN := runs/shapes
HARD_RUN := runs/shapes_hard

BUNDLE := .gpu_bundle
OUT ?=

# A real model from Flickr8k (FLICKR8K=DIR with DIR/dataset_flickr8k.json and DIR/images/).
FLICKR8K ?= ../shared/data/flickr8k
F8K_DATA := data/flickr8k_224
F8K_RUN := runs/flickr8k_lite
F8K_HARD_RUN := runs/flickr8k_lite_hard
F8K_PHOTOS := 1107246521_d16a476380.jpg 113678030_87a6a6e42e.jpg 1082379191_ec1e53f996.jpg

.PHONY: demo demo-hard flickr8k flickr8k-hard serve test clean gpu-bundle gpu-check

# The pinned versions of requirements.txt, then satkit itself (editable: pyproject.toml), as a user would install it.
$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -e .
	touch $@

# Pack the built-in dataset, train soft attention on CPU, score the test split, caption fresh images.
demo: $(VENV)/.installed
	$(PY) create_input_files.py --dataset shapes --output-folder $(DATA) --force
	rm -rf $(RUN)
	$(PY) train.py --config configs/shapes.yaml data_folder=$(DATA) out_dir=$(RUN)
	$(PY) eval.py --checkpoint $(RUN)/best.pt --data-folder $(DATA) --split test --beam-size 3 --out $(RUN)/test_beam3.json
	$(PY) -m tools.draw_shapes --out-dir $(RUN)/samples --count 4
	$(PY) caption.py --img $(RUN)/samples --checkpoint $(RUN)/best.pt --beam-size 3 --out-dir $(RUN)/captions

# The same with stochastic hard attention (run after `make demo`, which packs the data).
demo-hard: $(VENV)/.installed
	rm -rf $(HARD_RUN)
	$(PY) train.py --config configs/shapes_hard.yaml data_folder=$(DATA) out_dir=$(HARD_RUN)
	$(PY) eval.py --checkpoint $(HARD_RUN)/best.pt --data-folder $(DATA) --split test --beam-size 3 --out $(HARD_RUN)/test_beam3.json
	$(PY) -m tools.draw_shapes --out-dir $(HARD_RUN)/samples --count 4
	$(PY) caption.py --img $(HARD_RUN)/samples --checkpoint $(HARD_RUN)/best.pt --beam-size 3 --out-dir $(HARD_RUN)/captions

# Flickr8k at 224 px through the frozen ImageNet EfficientNet-Lite0 (configs/flickr8k_lite.yaml): pack, train,
# score the test split (beam 3, with the shuffled-reference control; COCO-format results), caption three test photos.
flickr8k: $(VENV)/.installed
	$(PY) create_input_files.py --dataset flickr8k --karpathy-json $(FLICKR8K)/dataset_flickr8k.json \
		--image-folder $(FLICKR8K)/images --image-size 224 --output-folder $(F8K_DATA) --force
	rm -rf $(F8K_RUN)
	$(PY) train.py --config configs/flickr8k_lite.yaml data_folder=$(F8K_DATA) out_dir=$(F8K_RUN)
	$(PY) eval.py --checkpoint $(F8K_RUN)/best.pt --data-folder $(F8K_DATA) --split test --beam-size 3 \
		--out $(F8K_RUN)/test_beam3.json
	$(PY) caption.py --img $(addprefix $(FLICKR8K)/images/,$(F8K_PHOTOS)) --checkpoint $(F8K_RUN)/best.pt \
		--beam-size 3 --out-dir $(F8K_RUN)/captions

# Hard attention warm-started from the soft model (run after `make flickr8k`, as demo-hard after demo): train
# configs/flickr8k_lite_hard.yaml from $(F8K_RUN)/best.pt, score the test split with beam 3.
flickr8k-hard: $(VENV)/.installed
	@test -f $(F8K_RUN)/best.pt || { echo "make flickr8k-hard: no $(F8K_RUN)/best.pt; run make flickr8k first" >&2; exit 2; }
	rm -rf $(F8K_HARD_RUN)
	$(PY) train.py --config configs/flickr8k_lite_hard.yaml data_folder=$(F8K_DATA) out_dir=$(F8K_HARD_RUN) \
		init_from=$(F8K_RUN)/best.pt
	$(PY) eval.py --checkpoint $(F8K_HARD_RUN)/best.pt --data-folder $(F8K_DATA) --split test --beam-size 3 \
		--out $(F8K_HARD_RUN)/test_beam3.json

# Caption your own photos in a browser (satkit/serve.py): http://127.0.0.1:$(PORT)/ and POST /api/caption.
# CHECKPOINT=PATH serves another model (default: make flickr8k's); the page offers make flickr8k's three
# test photos when the default model and the photos are there, else the samples/ folder beside the checkpoint.
PORT ?= 8000
CHECKPOINT ?=
EXAMPLES ?= $(if $(CHECKPOINT),,$(wildcard $(addprefix $(FLICKR8K)/images/,$(F8K_PHOTOS))))
serve: $(VENV)/.installed
	OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-PASSIVE} $(PY) -m satkit.serve $(if $(CHECKPOINT),--checkpoint $(CHECKPOINT)) \
		--port $(PORT) $(if $(EXAMPLES),--examples $(EXAMPLES))

# pytest exits 5 when it collected nothing; make treats any non-zero exit as failure.
# Two test processes (pytest-xdist): the suite is mostly single-threaded Python, so 2 cores halve its time.
test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 tests

clean:
	rm -rf $(DATA) $(RUN) $(HARD_RUN)

# The GPU check (docs/gpu.md). Here: `make gpu-bundle` writes $(BUNDLE)/ (Flickr8k at 160 px, pycocoevalcap's
# BLEU and CIDEr), the ignored folder that travels with the working tree. On a GPU machine, where there is no
# venv: `make gpu-check PY=python3 OUT=$OUT` (no prerequisite: nothing is installed there). Without CUDA it
# runs its dry mode on the CPU. tools/gpu_check.py puts $(BUNDLE)/site on its children's PYTHONPATH itself.
gpu-bundle: $(VENV)/.installed
	$(PY) -m tools.gpu_bundle --out $(BUNDLE)

gpu-check:
	@PYTHONPATH="$(BUNDLE)/site$${PYTHONPATH:+:$$PYTHONPATH}" $(PY) -m tools.gpu_check --bundle $(BUNDLE) $(if $(OUT),--out "$(OUT)")
