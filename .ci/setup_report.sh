#!/usr/bin/env bash
# Headless Chromium for tests/test_report_html.py (renders the HTML report and checks every image loaded).
# Idempotent; quiet; installs only as root (otherwise says what to run). The test skips when chromium is absent.
set -euo pipefail
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "setup_report: chromium missing; run 'sudo apt-get install chromium' (the report test skips without it)" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
