#!/usr/bin/env bash
# Create .venv/ and install genprior into it (editable, with the test tools).
#
# torch and torchvision must be builds of the same release. Some machines preconfigure pip
# (PIP_FIND_LINKS or pip.conf find-links) with a local CPU-only torch wheel that has no
# matching torchvision; torchvision, timm and torchmetrics' image metrics then fail to import
# ("operator torchvision::nms does not exist"). For this install, find-links points at an
# empty folder so both come from the package index; any other pip setting (index, proxy,
# certificates) is kept.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_SPEC=${GENPRIOR_TORCH:-"torch==2.13.0"}
TORCHVISION_SPEC=${GENPRIOR_TORCHVISION:-"torchvision==0.28.0"}

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
mkdir -p .venv/empty-find-links
export PIP_FIND_LINKS="$PWD/.venv/empty-find-links"

pip_install() { .venv/bin/python -m pip install --disable-pip-version-check -q "$@"; }

# A local "+cpu" wheel satisfies "torch==2.13.0" too, so check that the pair imports and
# reinstall from the index if it does not.
if ! .venv/bin/python -c "import torch, torchvision; torchvision.ops.nms" >/dev/null 2>&1; then
  pip_install --force-reinstall --no-deps "$TORCH_SPEC" "$TORCHVISION_SPEC" || true
  pip_install "$TORCH_SPEC" "$TORCHVISION_SPEC"
fi
pip_install -e ".[dev]"
# task=defense's attacks (docs/defense.md). --no-deps: torchattacks 3.5.1 pins requests~=2.25.1
# in its metadata, which would downgrade the requests/urllib3 that wandb needs; its real
# dependencies (torch, torchvision, scipy, numpy, tqdm) are installed above.
pip_install --no-deps "torchattacks==3.5.1"

if ! .venv/bin/python -c "import torch, torchvision, timm, torchmetrics, lightning, genprior" 2>/tmp/genprior_setup_err; then
  echo "setup.sh: the environment does not import cleanly:" >&2
  cat /tmp/genprior_setup_err >&2
  exit 1
fi
echo "setup.sh: ready ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
