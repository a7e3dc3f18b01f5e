#!/usr/bin/env bash
# Fetches and builds what guests boot, into DEST (default: the data directory's guest/):
#   vmlinuz            Debian's cloud kernel (apt-get download; versioned dependency resolved)
#   smoke-initrd.img   a busybox initramfs whose init prints "furcate-smoke-ok" and powers off
# Idempotent: existing artifacts are kept. Artifacts never go into git.
set -euo pipefail
dest="${1:-${FURCATE_GUEST_DIR:-${XDG_DATA_HOME:-$HOME/.local/share}/furcate/guest}}"
mkdir -p "$dest"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

if [ ! -s "$dest/vmlinuz" ]; then
  pkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/ {print $2; exit}')
  [ -n "$pkg" ] || { echo "guest: cannot resolve linux-image-cloud-amd64 (run apt-get update)" >&2; exit 1; }
  echo "guest: downloading $pkg"
  (cd "$work" && apt-get download "$pkg" >/dev/null 2>&1 || apt-get download "$pkg")
  dpkg-deb -x "$work"/linux-image-*.deb "$work/k"
  cp "$work"/k/boot/vmlinuz-* "$dest/vmlinuz.tmp" && mv "$dest/vmlinuz.tmp" "$dest/vmlinuz"
fi

if [ ! -s "$dest/smoke-initrd.img" ]; then
  echo "guest: building smoke-initrd.img (busybox-static)"
  r="$work/smoke"
  mkdir -p "$r/bin" "$r/proc" "$r/sys" "$r/dev"
  cp /bin/busybox "$r/bin/busybox"
  cat > "$r/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
echo furcate-smoke-ok
/bin/busybox poweroff -f
INIT
  chmod +x "$r/init"
  (cd "$r" && find . | cpio -o -H newc --quiet | gzip -1) > "$dest/smoke-initrd.img.tmp"
  mv "$dest/smoke-initrd.img.tmp" "$dest/smoke-initrd.img"
fi
echo "guest: artifacts in $dest"
