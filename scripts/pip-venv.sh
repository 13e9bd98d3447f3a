# Sourced by the *-env.sh scripts: a cached venv with one pip requirement.
#   pip_venv NAME VENV REQUIREMENT CHECK...
# Reuses VENV when its stamp says REQUIREMENT and it is complete; otherwise builds it
# afresh with pip (PyPI) and runs CHECK (a command, VENV/bin first on PATH) before
# stamping it complete.
pip_venv() {
  local name=$1 venv=$2 req=$3
  local stamp="${req/==/=}"
  shift 3
  say() { printf '[%s] %s\n' "$name" "$*" >&2; }
  if [[ -f "$venv/.disagg-complete" && "$(cat "$venv/.disagg-complete")" == "$stamp" ]]; then
    say "venv present and complete: $venv"
    return 0
  fi
  rm -rf "$venv"
  mkdir -p "$(dirname "$venv")"
  local py="${PYTHON:-python3}"
  "$py" -m venv "$venv" || { say "error: cannot create a venv with $py"; return 1; }
  "$venv/bin/pip" install --no-input --progress-bar off -q "$req" \
    || { say "error: pip could not install $req (is PyPI reachable?)"; return 1; }
  PATH="$venv/bin:$PATH" "$@" || { say "error: the venv does not pass its check: $*"; return 1; }
  echo "$stamp" > "$venv/.disagg-complete"
  say "venv ready: $venv"
}
