#!/usr/bin/env bash
# The image/container walkthrough, on the embedded default pool
# ($XDG_DATA_HOME/cowblock/pool, made on first use; or $COWBLOCK_POOL).
#   make walkthrough      (or: bash examples/walkthrough.sh)
set -euo pipefail
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
tag=$$
say() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }

# A 64 MiB "image": some data, a zero region, a hole, and a second version of it.
python3 - "$work" <<'PY'
import os, sys
d = sys.argv[1]
with open(f"{d}/base.raw", "wb") as f:
    f.truncate(64 << 20)
    f.write(os.urandom(8 << 20))
    f.seek(32 << 20); f.write(os.urandom(4 << 20))
data = bytearray(open(f"{d}/base.raw", "rb").read())
data[1 << 20:(1 << 20) + 4096] = os.urandom(4096)      # one block changed
data[32 << 20:36 << 20] = bytes(4 << 20)               # a region zeroed
open(f"{d}/v2.raw", "wb").write(data)
PY

say cowblock image import "base-$tag" "$work/base.raw"   # the first write makes the pool
say cowblock pool info
say cowblock image layer "base-$tag" "v2-$tag" "$work/v2.raw"
say cowblock image ls
say cowblock container create "v2-$tag" "web-$tag"
say cowblock container create "v2-$tag" "db-$tag"
echo "hello from web" | say cowblock write "web-$tag" --offset 4096
head -c 3000000 /dev/urandom | say cowblock write "db-$tag" --offset 10M
say cowblock ls --usage
say cowblock container commit "web-$tag" "web-image-$tag"
say cowblock diff "v2-$tag" "web-image-$tag"
say cowblock export "web-image-$tag" "$work/web.raw"
cmp -n 4096 "$work/web.raw" "$work/v2.raw" && echo "first 4 KiB match the image"
[ "$(dd if="$work/web.raw" bs=1 skip=4096 count=14 status=none)" = "hello from web" ] \
  && echo "exported layer holds the container's write"
say cowblock container rm "web-$tag" "db-$tag"
say cowblock rm "web-image-$tag" "v2-$tag" "base-$tag"
say cowblock pool check

# Last, the quick comparison with overlayfs, fuse-overlayfs and qcow2 (about a minute;
# systems this machine cannot run are listed as skipped, with the reason).
say cowblock bench --quick
