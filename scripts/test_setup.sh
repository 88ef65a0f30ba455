#!/usr/bin/env bash
# Test prerequisites that are not Python packages: Debian's Chromium and
# ChromeDriver for the viewer's end-to-end test. Idempotent; skipped when present.
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
  exit 0
fi
if [ "$(id -u)" != "0" ]; then
  echo "test_setup: chromium/chromedriver missing and not root; viewer tests will be skipped" >&2
  exit 0
fi
echo "test_setup: installing chromium and chromium-driver (Debian packages)..."
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
