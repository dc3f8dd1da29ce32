#!/usr/bin/env bash
# Screenshot an artifact's report.html with headless Chromium (apt-get install chromium):
#   bash scripts/report-screenshot.sh build/local/<model>-<hash> [out.png]
set -euo pipefail
dir=$(cd "$1" && pwd)
out=${2:-report.png}
chromium --headless --no-sandbox --disable-gpu --window-size=1200,1500 \
    --screenshot="$out" "file://$dir/report.html" 2>/dev/null
echo "$out"
