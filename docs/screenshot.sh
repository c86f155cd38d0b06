#!/usr/bin/env bash
# Screenshots of a leuko HTML report in a real headless browser (Chromium), section by section.
#
#   docs/screenshot.sh runs/demo/report.html docs/report        # writes docs/report_<section>.png
#   SECTIONS="calibration review" docs/screenshot.sh runs/demo/report.html docs/report
#
# Each section is shown alone (the page's #anchor, with the others hidden), so one PNG per section.
# Needs chromium (Debian: apt-get install chromium); nothing else of the report's machinery.
set -euo pipefail
report=${1:?usage: docs/screenshot.sh REPORT.html OUT_PREFIX}
prefix=${2:?usage: docs/screenshot.sh REPORT.html OUT_PREFIX}
sections=${SECTIONS:-"metrics calibration review intervals leakage saliency deployment"}
width=${WIDTH:-1200}
height=${HEIGHT:-1400}
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
if [ -z "$browser" ]; then
  echo "docs/screenshot.sh: no Chromium found; install it (Debian: apt-get install chromium)" >&2
  exit 1
fi
[ -f "$report" ] || { echo "docs/screenshot.sh: $report does not exist; make it with leuko report" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for section in $sections; do
  if ! grep -q "id=\"$section\"" "$report"; then
    echo "skip $section: the report has no section with id=\"$section\"" >&2
    continue
  fi
  # the report with only this section visible
  python3 - "$report" "$section" "$tmp/$section.html" <<'PY'
import sys
src, section, out = sys.argv[1:]
html = open(src, encoding="utf-8").read()
style = f"<style>section {{display: none !important}} section#{section} {{display: block !important}} nav {{display: none !important}}</style>"
open(out, "w", encoding="utf-8").write(html.replace("</head>", style + "</head>", 1))
PY
  "$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size="$width,$height" \
    --screenshot="${prefix}_${section}.png" "file://$tmp/$section.html" >/dev/null 2>&1
  echo "${prefix}_${section}.png"
done
