#!/usr/bin/env bash
# Test prerequisites that are not Python packages: Debian's Chromium and
# ChromeDriver for the browser tests (viewer, offline pages). Idempotent; nothing to do when present;
# a missing browser that cannot be installed stops `make test` (never a silent skip).
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
  exit 0
fi
if [ "$(id -u)" != "0" ]; then
  echo "test_setup: chromium and chromedriver are missing and installing them needs root: apt-get install -y chromium chromium-driver" >&2
  exit 1
fi
echo "test_setup: installing chromium and chromium-driver (Debian packages)..."
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
