#!/usr/bin/env bash
# Debian packages that napari's Qt tests need under a virtual X server (xvfb).
# Installs only what is missing, so a re-run costs one dpkg query.
set -euo pipefail
pkgs=(xvfb xauth libgl1 libegl1 libgl1-mesa-dri libxcb-icccm4 libxcb-keysyms1 libxcb-image0
      libxcb-render-util0 libxcb-xinerama0 libxcb-xkb1 libxkbcommon-x11-0 libxcb-cursor0
      libxcb-shape0 libxcb-randr0 libdbus-1-3 libfontconfig1)
command -v dpkg-query >/dev/null || { echo "system-deps: not a Debian system, skipping (install Xvfb and Qt's xcb libraries yourself)"; exit 0; }
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "system-deps: installing ${missing[*]}"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
