#!/bin/sh
# Build the libFuzzer harnesses with AddressSanitizer and UBSan into OUT
# (default fuzz/libfuzzer/out).  Needs clang and its runtime (Debian: clang,
# libclang-rt-14-dev).
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
OUT=${OUT:-$HERE/out}
CC=${CC:-clang}
mkdir -p "$OUT"
FLAGS="-std=gnu11 -D_GNU_SOURCE -g -O1 -fno-omit-frame-pointer -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined -pthread -I$ROOT/csrc"
for harness in "$HERE"/fuzz_*.c; do
    name=$(basename "$harness" .c)
    $CC $FLAGS -o "$OUT/$name" "$harness" "$ROOT"/csrc/*.c "$ROOT"/csrc/nbd/transmit.c
done
echo "built: $(ls "$OUT")"
