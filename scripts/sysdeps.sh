#!/bin/sh
# Install the Debian packages the napari and QC-report tests need — only those missing,
# without recommended packages, and only when that upgrades nothing already installed.
# Otherwise say what is missing and stop: those tests then skip with a reason.
# Usage: scripts/sysdeps.sh PACKAGE...
set -eu
missing=""
for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
done
if [ -z "$missing" ]; then
    echo "sysdeps: the $# Debian packages for the napari/report tests are installed"
    exit 0
fi
if [ "$(id -u)" = 0 ]; then SUDO=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"
else
    echo "sysdeps: not root, missing Debian packages:$missing (napari/report tests will skip)"
    exit 0
fi
echo "sysdeps: apt-get install --no-install-recommends$missing"
$SUDO apt-get update -qq 2>/dev/null || echo "sysdeps: apt-get update failed; trying the package lists there are"
# an upgrade of an installed package shows in the simulation as "Inst NAME [OLD-VERSION] (...)"
upgrades=$(LC_ALL=C $SUDO apt-get install -s --no-install-recommends $missing | awk '/^Inst [^ ]+ \[/ {print $2}' | tr '\n' ' ')
if [ -n "$upgrades" ]; then
    echo "sysdeps: not installing:$missing would upgrade installed packages: $upgrades(napari/report tests will skip)"
    exit 0
fi
# apt's own chatter (debconf notices) is shown only when the install fails
if ! log=$(DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing 2>&1); then
    echo "$log" >&2
    echo "sysdeps: apt-get install failed (napari/report tests will skip)" >&2
    exit 0
fi
