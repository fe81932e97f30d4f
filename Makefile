# The two commands: `make demo` and `make test`. Both set everything up first.
VENV ?= $(HOME)/.cache/kvbridge/venv
export KVBRIDGE_VENV := $(VENV)
BIN := $(VENV)/bin
# vLLM on this CPU machine: CPU platform, 1 GiB KV cache, never reach a hub.
export VLLM_TARGET_DEVICE ?= cpu
export VLLM_CPU_KVCACHE_SPACE ?= 1
export HF_HUB_OFFLINE ?= 1
export UCX_NET_DEVICES ?= lo
# torch's CPU tensors (the KV cache) on huge pages: see kvbridge/cache/hugepages.py
export THP_MEM_ALLOC_ENABLE ?= 1

.PHONY: setup demo test bench clean-results
setup:
	@bash scripts/setup-env.sh

# The main job: prefill + decode vLLM servers with KVBridgeConnector behind
# kvbridge proxy, a few chat/completion requests, clean shutdown.
demo: setup
	$(BIN)/kvbridge up $(UP_ARGS)

# pytest exits 5 when it collected nothing: that is a failure, not a pass.
test: setup
	@$(BIN)/python -m pytest -ra $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: no tests were collected" >&2; exit 1; fi; exit $$rc

bench: setup
	$(BIN)/kvbridge bench blocks
