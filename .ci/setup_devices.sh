#!/usr/bin/env bash
# Installs what the device tests need (tests/test_devices_*.py): a real sshd for the SSH transport, the real
# adb client, and qemu-user-static + debootstrap for the emulated arm64 Debian and the x86-64 bullseye chroot
# (real Python 3.9 and 2.7, tests/bullseye_rootfs.py); libusb-1.0-0 for tflite-support's metadata reader
# (tests/test_ship.py's cross-check). Idempotent; root only (elsewhere it says so and does nothing: the tests
# then skip with the reason).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
PKGS=(openssh-server openssh-client adb qemu-user-static debootstrap libusb-1.0-0)
if [ "$(id -u)" != 0 ]; then
  echo "setup_devices.sh: not root; the device tests will skip (they need: ${PKGS[*]})" >&2
  exit 0
fi
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
