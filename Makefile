# The two commands of the README: `make demo` (main job end to end) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: venv demo test bench clean
venv:
	@bash scripts/setup_venv.sh $(VENV)

demo: venv
	$(PY) -m ros2_posenet.tools.demo $(ARGS)

test: venv
	$(PY) -m pytest -q test $(ARGS)

bench: venv
	$(PY) bench/run_all.py

clean:
	rm -rf runs build *.egg-info
