#!/usr/bin/env bash
# The project's test command (see README.md): everything CI runs.
#   unit tests + integration tests against `disagg sim` processes over loopback.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --locked "$@"
