#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# Fetches the long English texts of the quality evaluation (resa-eval, docs/quality.md)
# from Debian's archive and writes them as plain UTF-8 files, checked against pinned
# sha256 sums.  Idempotent: texts already present with the right sum are kept.
#
#   scripts/fetch-texts.sh [DIR]     DIR default: ${RESA_TEXTS:-$HOME/.cache/resa/texts}
#
# Needs apt-get (Debian 12 "bookworm" sources), dpkg-deb and python3; no root install:
# the packages are downloaded with `apt-get download` and unpacked with `dpkg-deb -x`
# into a temporary folder (apt-get update runs first only when the pinned version is
# unknown to apt, which needs root).
#
# Texts, their source packages and licences:
#   austen-persuasion.txt  Jane Austen, "Persuasion" (1818), 466,770 characters.
#   austen-emma.txt        Jane Austen, "Emma" (1815), 882,676 characters.
#       Debian package r-cran-janeaustenr 1.0.0-1 (bookworm, main): the R package
#       janeaustenr by Julia Silge, MIT licence; the novels are public domain (Project
#       Gutenberg texts).  Read from its R lazy-load database, hard-wrapped lines joined
#       into paragraphs (bindings/python/resa/eval/texts.py).
#   debian-reference.txt   Osamu Aoki, "Debian Reference" v2.100 (plain-text edition),
#       840,879 characters, from the Preface on.  Debian package debian-reference-en
#       2.100 (bookworm, main), GPL-2+.
#   kjv-genesis.txt        The King James Version (1611), the book of Genesis, 196,867
#       characters.  Debian packages bible-kjv-text 4.38 (the text, public domain) and
#       bible-kjv 4.38 (its reader program `bible`, GPL-2+, amd64 build; used only to
#       decode the text).  Skipped with a note on other architectures.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
texts_py="$here/../bindings/python/resa/eval/texts.py"
out=${1:-${RESA_TEXTS:-$HOME/.cache/resa/texts}}
mkdir -p "$out"

# package=version  sha256 of the .deb (Debian's archive, bookworm)
debs=(
  "r-cran-janeaustenr=1.0.0-1 df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95"
  "debian-reference-en=2.100 9f31d3a17df505de09689ca255512ea58c1fc47c59bb1b0c7bf1c23362e9743f"
  "bible-kjv-text=4.38 d61b6aad4c51ba9e2800b825325fa6a09e99a0d02a9bb6dc4724fcc4995a1b7a"
  "bible-kjv=4.38 75a49c032a6efa9faa2beb4a9acb70974380122906329d0e100de36cc88ff02d"
)
# text file  sha256 of the text written
texts=(
  "austen-persuasion.txt cfc2fcde0bc3980c4672a6dddccbe772166974cd30888e1abda183d23bf8ffaf"
  "austen-emma.txt 600020e05915a18cc44f7cfd60305c8462df063f4e826e4b7e95831c9dc90b91"
  "debian-reference.txt 3faba3590e53bf97b1ac4865197188f191f2b8b91dd67c00a0436582984d0cc9"
  "kjv-genesis.txt 037cbb491e232356eaa005801cd5a2676667952fda9dd6b2db3c37625eaf7784"
)

sum_of() { sha256sum "$1" | cut -d' ' -f1; }
want_sum() { local t; for t in "${texts[@]}"; do [ "${t%% *}" = "$1" ] && echo "${t##* }"; done; }
have() { [ -f "$out/$1" ] && [ "$(sum_of "$out/$1")" = "$(want_sum "$1")" ]; }

missing=0
for t in "${texts[@]}"; do have "${t%% *}" || missing=1; done
if [ $missing = 0 ]; then
  echo "fetch-texts: all texts present in $out"
  exit 0
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
chmod 755 "$tmp"   # apt-get download as root hands the file to the _apt user

fetch_deb() { # package=version sha256 -> unpacks into $tmp/root
  local spec=$1 sum=$2 pkg=${1%%=*} ver=${1##*=}
  if ! apt-cache show "$spec" >/dev/null 2>&1; then
    echo "fetch-texts: $spec unknown to apt; running apt-get update"
    apt-get update -qq
  fi
  (cd "$tmp" && apt-get download -q "$spec" 2>&1 | grep -v '^W: Download is performed unsandboxed' || true)
  local deb
  deb=$(ls "$tmp/${pkg}_${ver}_"*.deb 2>/dev/null | head -n1)
  [ -n "$deb" ] || { echo "fetch-texts: apt-get download $spec failed" >&2; exit 1; }
  if [ "$(sum_of "$deb")" != "$sum" ]; then
    echo "fetch-texts: $deb: sha256 $(sum_of "$deb") != pinned $sum" >&2
    exit 1
  fi
  dpkg-deb -x "$deb" "$tmp/root"
}

for d in "${debs[@]}"; do
  spec=${d%% *}
  if [ "${spec%%=*}" = bible-kjv ] && [ "$(dpkg --print-architecture 2>/dev/null)" != amd64 ]; then
    echo "fetch-texts: bible-kjv is an amd64 build; kjv-genesis.txt skipped on this machine"
    continue
  fi
  fetch_deb "$spec" "${d##* }"
done

r=$tmp/root
rdata=$r/usr/lib/R/site-library/janeaustenr/data
make_text() { # name, then texts.py arguments (output path appended)
  local name=$1; shift
  have "$name" && return 0
  python3 "$texts_py" "$@" "$tmp/$name"
  local got; got=$(sum_of "$tmp/$name")
  if [ "$got" != "$(want_sum "$name")" ]; then
    echo "fetch-texts: $name: sha256 $got != pinned $(want_sum "$name")" >&2
    exit 1
  fi
  mv "$tmp/$name" "$out/$name"
}
make_text austen-persuasion.txt austen "$rdata/Rdata.rdx" "$rdata/Rdata.rdb" persuasion
make_text austen-emma.txt austen "$rdata/Rdata.rdx" "$rdata/Rdata.rdb" emma
make_text debian-reference.txt debian-reference "$r/usr/share/debian-reference/debian-reference.en.txt.gz"
if [ -x "$r/usr/bin/bible" ]; then
  make_text kjv-genesis.txt kjv "$r/usr/bin/bible" "$r/usr/lib" "Gen1:1-Gen50:26"
fi
echo "fetch-texts: texts in $out:"
(cd "$out" && sha256sum ./*.txt)
