#!/usr/bin/env bash
# What the playground's browser test needs besides the venv: Debian's chromium and chromium-driver (the test drives
# them with Selenium, offline). Installed with apt when missing and running as root (CI, containers); otherwise it
# says what to install and the browser test then fails loudly (it never skips). Idempotent: a no-op when present.
set -euo pipefail
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "[setup_browser] chromium + chromium-driver are missing and cannot be installed here (needs root and apt):" >&2
  echo "[setup_browser]   sudo apt-get install -y chromium chromium-driver   # or the browser test will fail" >&2
  exit 0
fi
echo "[setup_browser] installing chromium and chromium-driver with apt"
START=$SECONDS
apt-get update -q >/dev/null
DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null
echo "[setup_browser] done in $((SECONDS - START)) s: $(chromium --version 2>/dev/null | head -1)"
