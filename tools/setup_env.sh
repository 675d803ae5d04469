#!/usr/bin/env bash
# Idempotent set-up of the project venv (.venv/): torch, detectron2, this package and its test deps.
# Overrides (environment): PYTHON, VENV, TORCH_SPEC, DETECTRON2_SPEC.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
DETECTRON2_SPEC=${DETECTRON2_SPEC:-"sal-detectron2==0.7.2"}
STAMP="$VENV/.dab_detr_setup_stamp"

# Everything that can change what gets installed goes into the stamp; an unchanged stamp = nothing to do.
want=$(cat setup.py tools/setup_env.sh | sha256sum | cut -d' ' -f1)-$TORCH_SPEC-$DETECTRON2_SPEC
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && "$VENV/bin/python" -c "import dab_detr, detectron2" 2>/dev/null; then
  "$VENV/bin/python" -m dab_detr.env
  exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $($PYTHON --version 2>&1)"
  if "$PYTHON" -c "import detectron2, torch" 2>/dev/null; then
    # Keep the detectron2 (and torch) the user already has: let the venv see them.
    echo "[setup] $PYTHON already imports detectron2: the venv will use it (--system-site-packages)"
    "$PYTHON" -m venv --system-site-packages "$VENV"
  else
    "$PYTHON" -m venv "$VENV"
  fi
fi
PY="$VENV/bin/python"
PIP="$PY -m pip --disable-pip-version-check"
$PIP install -q --upgrade "pip>=23" wheel "setuptools<81"

if ! $PY -c "import torch, torchvision" 2>/dev/null; then
  echo "[setup] installing $TORCH_SPEC"
  # shellcheck disable=SC2086
  $PIP install -q $TORCH_SPEC
fi

# detectron2 runtime dependencies (detectron2's own setup.py install_requires, minus its pins).
$PIP install -q fvcore "iopath<0.1.11" pycocotools omegaconf hydra-core termcolor yacs tabulate \
  cloudpickle tqdm tensorboard matplotlib packaging black "setuptools<81"

if $PY -c "import detectron2" 2>/dev/null; then
  echo "[setup] keeping the detectron2 already importable in $VENV"
else
  echo "[setup] installing the pure-Python code of $DETECTRON2_SPEC (upstream detectron2 a59f056)"
  site=$($PY -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  # The wheel is tagged cp310; its Python files are all we use (its _C is not loadable on 3.11).
  $PIP install -q --no-deps --only-binary=:all: --python-version 3.10 --upgrade \
    --target "$site" "$DETECTRON2_SPEC"
  # The wheel drops detectron2's own scripts as a top-level `tools` package; it would shadow ours.
  rm -rf "$site/tools"
fi

echo "[setup] installing dab_detr (editable) with test and export extras"
$PIP install -q -e ".[test,export]"
$PY -m dab_detr.env
echo "$want" > "$STAMP"
