#!/usr/bin/env bash
# Prepare a Jetson board (JetPack 6: Orin Nano / Orin NX, Ubuntu 22.04, Python 3.10) for FLQ.
# Run it once per board, as root:   sudo ./setup.sh   (or: sudo ./setup.sh --dry-run)
#
#   1. system packages: Python's venv and pip, rsync (deploy_jetson.sh copies with it), the
#      libraries NVIDIA's TensorFlow wheel links against, and Fashion-MNIST when the archive has it;
#   2. NVIDIA's TensorFlow wheel for this JetPack, system-wide, so the FLQ venv that
#      deploy_jetson.sh creates with --system-site-packages sees it (and so do services running
#      as their own user: a `pip install --user` would be invisible to them);
#   3. FLQ's other dependencies, pinned to the JetPack 6 line (requirements-jp6.txt: protobuf < 5
#      for that TensorFlow), also system-wide, so deploy_jetson.sh can install FLQ itself with
#      pip_args = "--no-deps" and without reaching PyPI from the board;
#   4. optionally (--venv DIR) the venv itself, for running flq-worker by hand.
#
# Override the wheel for another JetPack release:  TF_WHEEL_URL=https://... sudo -E ./setup.sh
# NVIDIA lists its wheels at https://developer.download.nvidia.com/compute/redist/jp/ (v60, v61).
set -euo pipefail

TF_WHEEL_URL=${TF_WHEEL_URL:-https://developer.download.nvidia.com/compute/redist/jp/v61/tensorflow/tensorflow-2.16.1+nv24.08-cp310-cp310-linux_aarch64.whl}
PYTHON=${PYTHON:-/usr/bin/python3}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REQUIREMENTS=$HERE/requirements-jp6.txt
APT_PACKAGES=(
  python3-venv python3-pip python3-dev rsync
  # what NVIDIA's install guide for TensorFlow on Jetson asks for
  libhdf5-serial-dev hdf5-tools libhdf5-dev zlib1g-dev zip libjpeg8-dev liblapack-dev
  libblas-dev gfortran
)
DRY_RUN=0
VENV=""

while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --venv) VENV=${2:?--venv needs a directory}; shift ;;
    -h | --help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "setup.sh: unknown argument $1 (try --help)" >&2; exit 2 ;;
  esac
  shift
done

run() {
  printf '+ %s\n' "$*"
  if [ "$DRY_RUN" = 0 ]; then "$@"; fi
}

warn() { echo "setup.sh: $*" >&2; }

if [ -r /etc/nv_tegra_release ]; then
  echo "L4T: $(head -n 1 /etc/nv_tegra_release)"
else
  warn "no /etc/nv_tegra_release: this does not look like a Jetson; going on anyway"
fi
if [ "$(id -u)" != 0 ] && [ "$DRY_RUN" = 0 ]; then
  warn "run me as root (sudo $0): packages and TensorFlow are installed system-wide"
  exit 1
fi
py_version=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [ "$py_version" != 3.10 ]; then
  warn "$PYTHON is Python $py_version; NVIDIA's JetPack 6 wheels are built for 3.10"
fi

echo "== 1/4 system packages"
run apt-get update
run env DEBIAN_FRONTEND=noninteractive apt-get install -y "${APT_PACKAGES[@]}"
if apt-cache show dataset-fashion-mnist >/dev/null 2>&1; then
  run env DEBIAN_FRONTEND=noninteractive apt-get install -y dataset-fashion-mnist
else
  warn "dataset-fashion-mnist is not in this archive: copy the IDX files to" \
    "/usr/share/datasets/fashion-mnist (or set dataset.data_dir in the config)"
fi

echo "== 2/4 NVIDIA's TensorFlow ($TF_WHEEL_URL)"
if "$PYTHON" -c 'import tensorflow' >/dev/null 2>&1; then
  echo "TensorFlow $("$PYTHON" -c 'import tensorflow as tf; print(tf.__version__)' 2>/dev/null) is already installed: kept"
else
  run "$PYTHON" -m pip install --no-cache-dir -c "$REQUIREMENTS" "$TF_WHEEL_URL"
fi

echo "== 3/4 FLQ's dependencies (JetPack 6 pins: $REQUIREMENTS)"
run "$PYTHON" -m pip install -c "$REQUIREMENTS" -r "$REQUIREMENTS"

if [ -n "$VENV" ]; then
  echo "== 4/4 venv $VENV (--system-site-packages: sees the packages above)"
  run "$PYTHON" -m venv --system-site-packages "$VENV"
else
  echo "== 4/4 no venv (deploy_jetson.sh makes its own; --venv DIR makes one here)"
fi

if [ "$DRY_RUN" = 0 ]; then
  echo "== check"
  "$PYTHON" - <<'PY'
import google.protobuf, grpc, numpy, tensorflow as tf
gpus = tf.config.list_physical_devices("GPU")
print(f"tensorflow {tf.__version__}, protobuf {google.protobuf.__version__}, grpc {grpc.__version__},"
      f" numpy {numpy.__version__}; GPUs: {len(gpus)}")
if not gpus:
    print("no GPU visible: is this user in the video group, and is it NVIDIA's TensorFlow wheel?")
PY
fi
echo "done. Next, on your workstation: cp inventory.example.toml inventory.toml; ./deploy_jetson.sh"
