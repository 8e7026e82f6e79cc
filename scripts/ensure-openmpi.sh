#!/usr/bin/env bash
# Makes Open MPI (mpirun and libmpi.so.40) available for data-parallel training and its tests. Does nothing when
# both are present; as root on Debian/Ubuntu installs the distribution's openmpi-bin and libopenmpi-dev; otherwise
# fails and says what to install. Prints one line about the outcome.
set -euo pipefail

present() {
  local cache
  cache=$( { /sbin/ldconfig -p || ldconfig -p; } 2>/dev/null || true)
  command -v mpirun >/dev/null 2>&1 && [[ $cache == *"libmpi.so.40 "* ]]
}

if present; then
  echo "Open MPI present: $(mpirun --version 2>/dev/null | head -1)"
  exit 0
fi
if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
  echo "error: Open MPI is missing (mpirun or libmpi.so.40) and cannot be installed here (needs root and apt-get);" \
       "install it yourself, e.g. 'sudo apt-get install openmpi-bin libopenmpi-dev'" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
# Another apt-get may hold the lock for a while on a shared machine: wait for it rather than fail.
apt-get -o DPkg::Lock::Timeout=600 update -qq >/dev/null
apt-get -o DPkg::Lock::Timeout=600 install -y -qq openmpi-bin libopenmpi-dev >/dev/null
if ! present; then
  echo "error: apt-get installed openmpi-bin and libopenmpi-dev but mpirun or libmpi.so.40 is still missing" >&2
  exit 1
fi
echo "Open MPI installed: $(mpirun --version 2>/dev/null | head -1)"
