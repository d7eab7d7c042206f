#!/usr/bin/env bash
# The three quality scripts in sequence (MQAR, addition, language modelling), every option passed to each, so their
# tables, JSON and figures land in one --out-dir. From the repository root:
#
#   PYTHONPATH=. bash benchmarks/quality/run_all.sh --device cuda --out-dir DIR    # full size: about 13 minutes on one H200
#   PYTHONPATH=. bash benchmarks/quality/run_all.sh --tiny --out-dir DIR           # tiny: about 2 minutes on a 2-core CPU
#   PYTHONPATH=. bash benchmarks/quality/run_all.sh --plot-only DIR                # the figures from DIR's JSON
#
# PYTHON picks the interpreter (default: python3).
set -euo pipefail
here="$(dirname "$0")"
for script in mqar arithmetic lm; do
    echo "=== $script ==="
    "${PYTHON:-python3}" "$here/$script.py" "$@"
done
