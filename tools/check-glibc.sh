#!/usr/bin/env bash
# The highest GLIBC_x.y symbol version a binary needs must not pass Kaggle's glibc (issue #18:
# Kaggle's image is Ubuntu 22.04, glibc 2.35; verdict is built on a newer Debian and stays
# under that only because of the symbols it happens to use). Prints the version found.
#
#   bash tools/check-glibc.sh [BINARY [MAX]]     # defaults: target/release/verdict, 2.35
#
# If this ever fails, build the Kaggle binary for an older glibc instead of raising MAX:
# cargo-zigbuild with ziglang (both on PyPI), `cargo zigbuild --release --target
# x86_64-unknown-linux-gnu.2.35`.
set -euo pipefail
cd "$(dirname "$0")/.."

binary="${1:-target/release/verdict}"
max="${2:-2.35}"
if [[ ! -f $binary ]]; then
    echo "check-glibc: no $binary (build it first: cargo build --release)" >&2
    exit 2
fi
if ! [[ $max =~ ^[0-9]+\.[0-9]+$ ]]; then
    echo "check-glibc: MAX must look like 2.35, found '$max'" >&2
    exit 2
fi
# readelf's version-needs section lists every GLIBC_x.y[.z] the binary asks for.
if command -v readelf >/dev/null; then
    versions=$(readelf --version-info --wide "$binary")
elif command -v objdump >/dev/null; then
    versions=$(objdump -T "$binary")
else
    echo "check-glibc: neither readelf nor objdump is installed (binutils)" >&2
    exit 2
fi
highest=$(grep -oE 'GLIBC_[0-9]+(\.[0-9]+)+' <<<"$versions" | sed 's/^GLIBC_//' | sort -uV | tail -n 1)
if [[ -z $highest ]]; then
    echo "check-glibc: $binary asks for no GLIBC_ version (not a dynamically linked glibc binary?)" >&2
    exit 1
fi
if [[ $(printf '%s\n%s\n' "$highest" "$max" | sort -V | tail -n 1) != "$max" ]]; then
    echo "check-glibc: $binary needs GLIBC_$highest, above the bound $max;" \
        "symbols that need it:" >&2
    grep -E "GLIBC_$highest\b" <<<"$(objdump -T "$binary" 2>/dev/null || true)" | head -n 20 >&2
    exit 1
fi
echo "check-glibc: $binary needs GLIBC_$highest at most (bound $max)"
