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
# neuroHarmonize (the ComBat-GAM reference of the tests) pins numpy<2 but runs on numpy 2: installed without its
# dependency pins so it cannot downgrade numpy for everything else (pyproject.toml, test extra)
python -m pip install -q "nibabel>=5"
python -m pip install -q --no-deps "neuroHarmonize==2.5.2"

# Headless chromium for the report's browser test (tests/test_report.py skips it without chromium). Optional:
# time-bounded and never fatal, so the set-up (and CI) cannot fail because of it.
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo -n"
    apt_install() { timeout 600 $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
                        --no-install-recommends chromium >/dev/null 2>&1; }
    if command -v apt-get >/dev/null 2>&1 \
            && { apt_install || { timeout 300 $SUDO apt-get update -qq >/dev/null 2>&1 && apt_install; }; }; then
        echo "chromium installed (headless browser test of the study report)"
    else
        echo "warning: chromium not installed (needs apt-get as root); the report's browser test will be skipped" >&2
    fi
fi
echo "fedrad installed in $VENV (activate with: . $VENV/bin/activate)"
