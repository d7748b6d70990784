#!/bin/sh
# Debian's Chromium for tests/test_demo_browser.py. Playwright launches it by path
# (/usr/bin/chromium); no `playwright install`, no browser download.
set -eu
if [ -x /usr/bin/chromium ]; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update
$SUDO apt-get install -y chromium
