#!/usr/bin/env bash
# Look at a report as a user would: headless Chromium (Debian package `chromium`), one screenshot.
#   bash docs/scripts/screenshot_report.sh runs/reproduce-<time>/report.html shot.png
set -euo pipefail
chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1200,1300 \
  --screenshot="${2:-report.png}" "file://$(realpath "$1")"
