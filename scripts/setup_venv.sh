#!/usr/bin/env bash
# Create/refresh the PyPI-only environment (no ROS install needed): .venv with the ROS 2
# wheels, pinned torch/torchvision, tf2_msgs generated from its .msg, and this package (editable,
# with its share/ data files linked in place, so the venv looks like a colcon install space).
# Re-running is cheap: it only reinstalls when requirements changed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv}
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
stamp="$VENV/.ros2_posenet-installed"
want=$(cat requirements.txt requirements-ros.txt requirements-build-msgs.txt scripts/build_tf2_msgs.sh setup.py | sha256sum | cut -d' ' -f1)
# The data files (launch, config, package.xml, ament index marker) are symlinked into $VENV/share
# so that the venv looks like an install space; redone only when the list of files changes.
share_stamp="$VENV/.ros2_posenet-share"
share_want=$( { ls launch/*.launch.py config/*.yaml config/*.rviz resource/* package.xml; cat setup.py scripts/install_share.py; } | sha256sum | cut -d' ' -f1)
link_share() {
  if [[ ! -f "$share_stamp" || "$(cat "$share_stamp")" != "$share_want" ]]; then
    "$VENV/bin/python" scripts/install_share.py "$VENV"
    echo "$share_want" > "$share_stamp"
  fi
}
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  link_share
  exit 0
fi
echo "[setup] creating $VENV with $($PYTHON --version) (torch + ROS 2 wheels, ~2 min the first time)"
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
# This machine's pip config lists local indexes that print one warning per package; hide those only.
pip_install() { "$VENV/bin/python" -m pip install -q "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
pip_install --upgrade pip
pip_install -r requirements.txt -r requirements-ros.txt
bash scripts/build_tf2_msgs.sh "$VENV"
pip_install --no-deps --no-build-isolation -e .
link_share
echo "$want" > "$stamp"
echo "[setup] $VENV ready"
