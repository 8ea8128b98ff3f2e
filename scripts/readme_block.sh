#!/usr/bin/env bash
# Print the Nth ```bash block of README.md (1-based), so CI runs the README's commands as written.
set -euo pipefail
cd "$(dirname "$0")/.."
awk -v n="$1" '/^```bash$/ { k++; on = (k == n); next } /^```$/ { on = 0 } on' README.md
