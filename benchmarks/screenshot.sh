#!/usr/bin/env bash
# Render the published asv dashboard with headless Chromium, to check it by eye.
#
#   cd benchmarks && asv publish && ./screenshot.sh [OUTDIR]
#
# Saves PNGs of the overview page, three benchmark graph pages and the regressions
# page into OUTDIR (default html/screenshots, git-ignored with the rest of html/).
# Needs Debian's `chromium` (apt-get install chromium) or CHROMIUM=/path/to/chrome.
#
# asv's index.html loads jQuery, flot, bootstrap, md5 and stupidtable from CDNs, which
# this machine cannot reach. So the pages are served from a copy of html/ whose CDN
# links point at the same library versions vendored in asv 0.5.1's sdist (fetched once
# with pip into .asv/vendor, git-ignored), without the CDN tags' integrity hashes. The copy is served on 127.0.0.1 as
# `asv preview` would, because the dashboard loads its JSON with XHR, which file://
# refuses.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
html="$here/html"
out="${1:-$html/screenshots}"
port="${PORT:-8765}"
vendor="$here/.asv/vendor"
chromium="${CHROMIUM:-$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)}"
python="${PYTHON:-$(command -v python3 || command -v python)}"

[[ -f "$html/index.html" ]] || { echo "no $html/index.html: run 'asv publish' first" >&2; exit 1; }
[[ -n "$chromium" ]] || { echo "chromium not found (apt-get install chromium, or set CHROMIUM)" >&2; exit 1; }
mkdir -p "$out"
out="$(cd "$out" && pwd)"
site="$(mktemp -d)"
server=""
cleanup() { [[ -n "$server" ]] && kill "$server" 2>/dev/null; rm -rf "$site"; }
trap cleanup EXIT

if [[ ! -f "$vendor/jquery-3.3.1.min.js" ]]; then
    "$python" -m pip download -q --no-deps --no-binary :all: asv==0.5.1 -d "$site/sdist"
    mkdir -p "$vendor"
    tar -xzf "$site"/sdist/asv-0.5.1.tar.gz -C "$site" asv-0.5.1/asv/www/vendor
    cp "$site"/asv-0.5.1/asv/www/vendor/* "$vendor/"
fi

cp -r "$html"/. "$site/"
rm -rf "$site/screenshots"
cp -r "$vendor" "$site/vendor"
"$python" - "$site/index.html" <<'PY'
import re, sys
# CDN file name -> the same version in asv 0.5.1's www/vendor
local = {
    "jquery-3.3.1.min.js": "jquery-3.3.1.min.js",
    "jquery.flot.min.js": "jquery.flot-0.8.3.min.js",
    "jquery.flot.time.min.js": "jquery.flot-0.8.3.time.min.js",
    "jquery.flot.selection.min.js": "jquery.flot-0.8.3.selection.min.js",
    "jquery.flot.categories.min.js": "jquery.flot-0.8.3.categories.min.js",
    "jquery.flot.orderBars.js": "jquery.flot.orderBars.js",
    "stupidtable.min.js": "stupidtable.js",
    "md5.min.js": "md5.js",
    "bootstrap.min.js": "bootstrap-3.1.0.min.js",
    "bootstrap.min.css": "bootstrap-3.1.0.min.css",
}
path = sys.argv[1]
text = open(path, encoding="utf-8").read()
def swap(match):
    name = match.group(2).rsplit("/", 1)[-1]
    if name not in local:
        sys.exit(f"screenshot.sh: no vendored copy of {match.group(2)}")
    return f'{match.group(1)}="vendor/{local[name]}"'
text = re.sub(r'(src|href)="(https://(?:code\.jquery\.com|cdnjs\.cloudflare\.com|cdn\.jsdelivr\.net)/[^"]+)"',
              swap, text)
# The vendored files are the same versions but not the same bytes as the CDN's.
text = re.sub(r'\s+integrity="[^"]*"', "", text)
open(path, "w", encoding="utf-8").write(text)
PY

"$python" -m http.server "$port" --bind 127.0.0.1 --directory "$site" >/dev/null 2>&1 &
server=$!
for _ in $(seq 50); do
    "$python" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=1)" \
        "http://127.0.0.1:$port/index.html" 2>/dev/null && break
    sleep 0.2
done

base="http://127.0.0.1:$port"
# Graph pages are index.html#<benchmark>?p-<param>=<value>, string values quoted as asv
# stores them; parameters left out are all drawn, one line each.
pages=(
    "overview|index.html"
    "forward-resnet-3x3|index.html#conv.Forward.time_forward?p-shape=%27resnet-3x3%27&p-dtype=%27float32%27"
    "speedup-vs-reference|index.html#conv.SpeedupVsReference.track_speedup_vs_reference?p-pass=%27forward%27"
    "backward-peakmem-vgg-mid|index.html#conv.Backward.peakmem_backward?p-shape=%27vgg-mid%27&p-dtype=%27float32%27"
    "regressions|index.html#/regressions"
)
for page in "${pages[@]}"; do
    name="${page%%|*}"
    url="$base/${page#*|}"
    # The dashboard is drawn by JavaScript after load; virtual time lets it finish.
    "$chromium" --headless --no-sandbox --disable-gpu --disable-dev-shm-usage --hide-scrollbars \
        --window-size=1600,1000 --virtual-time-budget=20000 \
        --screenshot="$out/$name.png" "$url" >/dev/null 2>&1
    echo "$out/$name.png  <-  $url"
done
