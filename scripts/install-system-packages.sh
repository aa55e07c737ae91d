#!/usr/bin/env bash
# Installs the Debian packages listed in requirements/apt*.txt that are missing (root only),
# then creates the unprivileged user the VMMs run as (scripts/create-vmm-user.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
want=$(cat requirements/apt*.txt | sed 's/#.*//' | tr -s ' \n' '\n' | sort -u | grep -v '^$')
missing=()
# The dashboard's browser libraries are installed with npm; any Node.js with npm will do.
command -v npm >/dev/null || want="$want nodejs npm"
for pkg in $want; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -ne 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "Missing Debian packages (run as root to install): ${missing[*]}" >&2
    exit 1
  fi
  echo "Installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
./scripts/create-vmm-user.sh
