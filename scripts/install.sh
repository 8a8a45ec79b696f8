#!/usr/bin/env bash
# One-command set-up of fedrad on a fresh machine (Python >= 3.11 with venv).
# Creates .venv/ next to this repository and installs fedrad with its test extras.
# pyradiomics 3.0.1 has no wheel and needs numpy + versioneer at build time, so it is
# built without build isolation after those are present (see README, "Set-up").
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
VENV="${FEDRAD_VENV:-.venv}"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q "numpy>=1.26" versioneer setuptools wheel
python -m pip install -q --no-build-isolation "pyradiomics==3.0.1"
python -m pip install -q -e ".[test]"
echo "fedrad installed in $VENV (activate with: . $VENV/bin/activate)"
