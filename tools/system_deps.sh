#!/usr/bin/env bash
# Debian packages the test suite needs: a real SLURM (slurmctld, slurmd, client tools), munge, and
# iproute2 for the two-node cluster (network namespaces). Installed only when missing, and only as
# root (CI runs as root); otherwise the SLURM and cluster tests skip.
set -euo pipefail
PACKAGES=(slurmctld slurmd slurm-client munge iproute2)
if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
    && command -v ip >/dev/null; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "note: not root or no apt-get: skipping ${PACKAGES[*]} (the SLURM and cluster tests will be skipped)" >&2
  exit 0
fi
echo "installing ${PACKAGES[*]} from Debian" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -qq "${PACKAGES[@]}" >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq "${PACKAGES[@]}" >/dev/null; }
