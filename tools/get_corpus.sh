#!/usr/bin/env bash
# Install the benchmark corpus: Debian's dict-gcide 0.48.5+nmu2 (the GNU Collaborative International
# Dictionary of English, GPL-3+; about 40 MB of real English), unpacked and cleaned to plain text,
# one dictionary entry per paragraph.
#   bash tools/get_corpus.sh [OUT]          (default: data/gcide.txt)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-data/gcide.txt}"
VERSION="0.48.5+nmu2"
if [ -s "$OUT" ]; then echo "$OUT exists"; exit 0; fi
work="$(mktemp -d)"; trap 'rm -rf "$work"' EXIT
chmod 755 "$work"
if ! (cd "$work" && apt-get download "dict-gcide=$VERSION" >/dev/null 2>&1); then
  [ "$(id -u)" = 0 ] && apt-get update -qq
  (cd "$work" && apt-get download "dict-gcide=$VERSION")
fi
dpkg-deb -x "$work"/dict-gcide_*.deb "$work/x"
mkdir -p "$(dirname "$OUT")"
zcat "$work/x/usr/share/dictd/gcide.dict.dz" | python3 tools/clean_gcide.py > "$OUT.partial"
mv "$OUT.partial" "$OUT"
echo "wrote $OUT ($(wc -c < "$OUT") bytes)"
