#!/usr/bin/env bash
# Fresh-machine set-up: Fashion-MNIST from Debian's package, then a virtual environment in .venv with dmae.
#   bash setup.sh        # the package
#   bash setup.sh test   # the package and the test tools
# The torch / torchvision pins are the builds this project is tested with; pip never resolves another.
set -euo pipefail
cd "$(dirname "$0")"
SUDO=""
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null; then SUDO=sudo; fi
if command -v apt-get >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -q >/dev/null
  $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null
fi
extra=""
[ "${1:-}" = "test" ] && extra="[test]"
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
if ! .venv/bin/python -m pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1 -e ".$extra" \
    >.venv/pip-install.log 2>&1; then
  grep -v "is ignored: it is neither a file nor a directory" .venv/pip-install.log >&2
  echo "setup.sh: pip install failed (log: .venv/pip-install.log)" >&2
  exit 1
fi
.venv/bin/python -c "import dmae, torch; print(f'dmae {dmae.__version__} with torch {torch.__version__} installed in .venv')"
