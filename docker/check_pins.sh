#!/bin/sh
# The image build's last check of its Python environment: every distribution installed (flare-rt and pip
# aside) is pinned, at the installed version, in the constraints files given. pip's --constraint only
# bounds what is named; a dependency nobody pinned (say one a newer NVIDIA wheel declares) would install
# at whatever version is newest. This makes it a build failure instead.
#
#   sh check_pins.sh CONSTRAINTS_FILE...        (python3 on PATH: the environment checked)
#
# Exit 0: all pinned. Exit 1: one line per unpinned or off-pin distribution, on stderr. Exit 2: usage.
set -eu

if [ "$#" -eq 0 ]; then
    echo "usage: check_pins.sh CONSTRAINTS_FILE..." >&2
    exit 2
fi
for f in "$@"; do
    if [ ! -r "$f" ]; then
        echo "check_pins.sh: cannot read constraints file $f" >&2
        exit 2
    fi
done

# name==version with the name normalised as PEP 503 does (case, runs of - _ .), one per line, sorted
normalise() {
    sed 's/#.*//' | awk -F'==' 'NF == 2 {
        name = tolower($1); gsub(/[-_.]+/, "-", name); gsub(/[ \t]/, "", name)
        version = $2; gsub(/[ \t]/, "", version)
        print name "==" version }' | LC_ALL=C sort -u
}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cat "$@" | normalise >"$tmp/pinned"
python3 -m pip freeze --all --disable-pip-version-check >"$tmp/freeze"
# flare-rt is installed from its own wheel ("flare-rt @ file://..."); pip is the environment's bootstrap
grep -v -i -E '^(flare[-_.]rt|pip)( @ |==)' "$tmp/freeze" >"$tmp/others" || true
grep '==' "$tmp/others" | normalise >"$tmp/installed" || true
# anything else not "name==version" (a direct URL, an editable checkout) cannot match a pin
grep -v '==' "$tmp/others" >"$tmp/unpinned" || true
LC_ALL=C comm -23 "$tmp/installed" "$tmp/pinned" >>"$tmp/unpinned"
if [ -s "$tmp/unpinned" ]; then
    echo "check_pins.sh: installed but not pinned at that version in $*:" >&2
    sed 's/^/  /' "$tmp/unpinned" >&2
    echo "check_pins.sh: pin them in docker/constraints/" \
        "(tests/container/test_image_resolution.py lists what resolves)" >&2
    exit 1
fi
echo "check_pins.sh: $(wc -l <"$tmp/installed") distributions, all pinned"
