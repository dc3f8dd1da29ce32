#!/usr/bin/env bash
# Everything the test suite needs on a fresh Debian machine: system packages, then Python ones.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0   # the local CPU wheel; never a CUDA build
python -m pip install -q -e ".[test]"
