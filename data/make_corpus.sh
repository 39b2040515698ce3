#!/usr/bin/env bash
# Rebuild data/corpus.txt.gz, the embedded default pretraining corpus, from the
# Debian packages bible-kjv-text (the King James Bible text, public domain) and
# bible-kjv (the `bible` program that decodes its compressed data file).
#
# Not run by CI: the corpus is committed. Run it by hand to audit or rebuild it:
#
#     bash data/make_corpus.sh            # writes data/corpus.txt.gz
#     bash data/make_corpus.sh OUT.gz     # writes OUT.gz instead
#
# Needs: a Debian/Ubuntu system with apt lists in place (`apt-get update` once),
# dpkg-deb, sed, gzip and sha256sum. Nothing is installed system-wide: the two
# .deb files are downloaded and unpacked into a temporary directory.
set -euo pipefail

# Step 0: settings. The version is pinned so the output is reproducible; on a
# release whose archive no longer carries it, set KJV_VERSION to what
# `apt-cache policy bible-kjv` offers (the text itself has not changed for decades,
# but the recorded sha256 below may then differ).
KJV_VERSION="${KJV_VERSION:-4.38}"
EXPECTED_SHA256="d6f7ff0df0755b16a5a8062733e5a87de713db6bb15cf5a4136b8fad108564bb"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${1:-$here/corpus.txt.gz}"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"

# Step 1: fetch both packages from the Debian archive through apt (signature-checked
# by apt) without installing them. Run as root, apt may warn that the download is
# "performed unsandboxed" because user _apt cannot write the private temporary
# directory; that warning is harmless.
if ! apt-get download "bible-kjv-text=$KJV_VERSION" "bible-kjv=$KJV_VERSION"; then
    echo "make_corpus.sh: apt-get could not download bible-kjv(-text) $KJV_VERSION;" \
        "run 'apt-get update', or set KJV_VERSION to a version listed by" \
        "'apt-cache policy bible-kjv'" >&2
    exit 1
fi

# Step 2: unpack them. root/usr/lib/bible.data is the text in the package's own
# compressed format; root/usr/bin/bible decodes it.
for deb in ./*.deb; do
    dpkg-deb -x "$deb" root
done

# Step 3: print the whole Bible, Genesis 1:1 to Revelation 22:21, in the program's
# default "pretty" layout with a very wide line limit so no verse is wrapped:
#
#     <blank>
#     Genesis 1
#     <blank>
#       1 In the beginning God created the heaven and the earth.
#       2 And the earth was without form, ...
#
# -p points the program at the unpacked data file; stdin is closed so it does not
# fall into its interactive prompt.
root/usr/bin/bible -l 1000000 -p "$work/root/usr/lib" 'Gen1:1-Rev22:21' \
    </dev/null >kjv_raw.txt

# Step 4: light cleanup, nothing else:
#   - drop the verse numbers and their indentation ("  12 And ..." -> "And ..."),
#     so every verse is one line of plain prose;
#   - collapse runs of spaces to one and strip trailing spaces (three verses in
#     the source carry a double space or a trailing space);
#   - delete the blank first line.
# Chapter headings ("Genesis 1") and the blank lines around them are kept.
sed -E \
    -e 's/^  [0-9]+ //' \
    -e 's/ +/ /g' \
    -e 's/ +$//' \
    kjv_raw.txt | sed '1{/^$/d;}' >corpus.txt

# Step 5: sanity checks on the extracted text: 1,189 chapters and 31,102 verses
# (the standard KJV counts), and pure printable ASCII plus newlines.
heading='^([1-3] )?[A-Z][A-Za-z ]* [0-9]+$'
chapters="$(grep -cE "$heading" corpus.txt || true)"
verses="$(grep -cvE "^$|$heading" corpus.txt || true)"
if [[ "$chapters" != 1189 || "$verses" != 31102 ]]; then
    echo "make_corpus.sh: expected 1189 chapters and 31102 verses," \
        "got $chapters and $verses" >&2
    exit 1
fi
if LC_ALL=C grep -qP '[^\x20-\x7e]' corpus.txt; then
    echo "make_corpus.sh: unexpected non-printable or non-ASCII byte in the text" >&2
    exit 1
fi

# Step 6: compress reproducibly. -n stores neither the file name nor a timestamp
# (mtime field 0), so the same text and gzip version give the same bytes.
gzip -9 -n -c corpus.txt >"$out"

# Step 7: report. A different sha256 means a different package version or gzip
# build; the text checks above still passed.
raw_bytes="$(wc -c <corpus.txt)"
gz_bytes="$(wc -c <"$out")"
sha="$(sha256sum "$out" | cut -d' ' -f1)"
echo "wrote $out: $raw_bytes bytes raw, $gz_bytes bytes gzip, sha256 $sha"
if [[ "$sha" != "$EXPECTED_SHA256" ]]; then
    echo "make_corpus.sh: note: sha256 differs from the recorded $EXPECTED_SHA256" >&2
fi
