#!/usr/bin/env bash
# The base image the container tests build on, made from Debian's packages (no image registry
# is reachable where the tests run): a minimal bookworm root file system with Python 3.11 and
# venv, built by mmdebstrap and imported into podman with the PATH every distribution image sets.
# Skipped when the image is already there.
#   usage: deploy/container/test-base.sh [IMAGE]   (default localhost/flq-test-base:bookworm)
set -euo pipefail
image="${1:-localhost/flq-test-base:bookworm}"
if podman image exists "$image"; then
  echo "base image $image: present"
  exit 0
fi
echo "base image $image: building with mmdebstrap (a few minutes)"
mmdebstrap --quiet --variant=minbase \
  --include=python3,python3-venv,ca-certificates \
  --aptopt='Acquire::Retries "3"' \
  bookworm - http://deb.debian.org/debian \
  | podman import --change 'CMD ["/bin/bash"]' \
      --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      - "$image" >/dev/null
echo "base image $image: built"
