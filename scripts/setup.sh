#!/usr/bin/env bash
# Set up this checkout: a Python 3.12 virtual environment in .venv with the project installed editable, plus
# the extras named in the first argument (`scripts/setup.sh test,aot`). Python 3.12 is python3.12 on PATH or
# pyenv's 3.12 (which need not be pyenv's default: there `python3.12` is a shim that refuses to run).
# `scripts/setup.sh --find-python` prints the interpreter it would use. An existing 3.12 .venv is reused.
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {
  local cand root
  local cands=(python3.12)
  if command -v pyenv >/dev/null 2>&1; then
    root="$(pyenv root)"
    cands+=("$root"/versions/3.12*/bin/python3.12)
  fi
  cands+=("$HOME"/.pyenv/versions/3.12*/bin/python3.12)
  for cand in "${cands[@]}"; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
      command -v "$cand"; return 0
    fi
  done
  echo "setup: no Python 3.12 found (looked for python3.12 on PATH and pyenv's versions/3.12*); jax 0.11 needs 3.12" >&2
  return 1
}

if [ "${1:-}" = "--find-python" ]; then find_python; exit; fi

if ! [ -x .venv/bin/python ] || ! .venv/bin/python -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
  PY="$(find_python)"
  echo "setup: creating .venv with $PY ($("$PY" --version))"
  rm -rf .venv
  "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
.venv/bin/python -m pip install -q -e ".${1:+[$1]}"
