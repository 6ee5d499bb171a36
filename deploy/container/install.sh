#!/bin/sh
# Installs FLQ inside the image (deploy/container/Containerfile runs it; not for hosts).
#   install.sh deps PROFILE   the venv and FLQ's dependencies (cached layer)
#   install.sh flq PROFILE    FLQ itself from /src, without touching the dependencies
# PROFILE x86:    FLQ's dependencies and its worker extra (tensorflow-cpu) from pyproject.toml.
# PROFILE jetson: the base image's TensorFlow (NVIDIA's build for JetPack 6) seen through
#                 --system-site-packages; the rest pinned by jetson/requirements-jp6.txt.
set -eu
# Build arguments arrive as variables, empty when not given: pip must not see empty ones.
for name in PIP_CERT PIP_INDEX_URL TF_WHEEL_URL; do
  eval "[ -n \"\${$name:-}\" ]" || unset "$name"
done
step="$1"
profile="$2"
venv=/opt/flq/venv
case "$profile" in
  x86 | jetson) ;;
  *) echo "install.sh: FLQ_PROFILE got '$profile', expected x86 or jetson" >&2; exit 2 ;;
esac
case "$step" in
  deps)
    if [ "$profile" = jetson ]; then
      # L4T images are Ubuntu 22.04: python3-venv is not always there.
      python3 -c "import ensurepip" 2>/dev/null || {
        apt-get update -qq && apt-get install -y -qq --no-install-recommends python3-venv \
          && rm -rf /var/lib/apt/lists/*; }
      python3 -m venv --system-site-packages "$venv"
      if [ -n "${TF_WHEEL_URL:-}" ]; then   # a base without TensorFlow (l4t-jetpack): NVIDIA's wheel
        # and the libraries NVIDIA's install guide asks for (the list of jetson/setup.sh)
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
          --no-install-recommends libhdf5-serial-dev hdf5-tools libhdf5-dev zlib1g-dev zip \
          libjpeg8-dev liblapack-dev libblas-dev gfortran && rm -rf /var/lib/apt/lists/*
        "$venv/bin/pip" install --quiet -c /src/jetson/requirements-jp6.txt "$TF_WHEEL_URL"
      fi
      "$venv/bin/python" -c "import tensorflow" || {
        echo "install.sh: FLQ_PROFILE=jetson needs TensorFlow: in the base image or TF_WHEEL_URL" >&2
        exit 2; }
      "$venv/bin/pip" install --quiet -c /src/jetson/requirements-jp6.txt \
        -r /src/jetson/requirements-jp6.txt
    else
      python3 -m venv "$venv"
      # pyproject.toml's dependencies plus the worker extra, read with the standard library.
      "$venv/bin/python" - > /tmp/requirements.txt <<'PY'
import tomllib
project = tomllib.load(open("/src/pyproject.toml", "rb"))["project"]
print("\n".join(project["dependencies"] + project["optional-dependencies"]["worker"]))
PY
      "$venv/bin/pip" install --quiet -r /tmp/requirements.txt
      rm /tmp/requirements.txt
    fi
    ;;
  flq)
    # --no-deps: everything FLQ needs is in the layer above; a changed dependency changes
    # pyproject.toml, which rebuilds that layer.
    "$venv/bin/pip" install --quiet --no-deps /src
    "$venv/bin/pip" check
    rm -rf /src
    ;;
  *) echo "install.sh: step got '$step', expected deps or flq" >&2; exit 2 ;;
esac
