#!/usr/bin/env bash
# Fetches and builds what guests boot, into DEST (default: the data directory's guest/):
#   vmlinuz            Debian's cloud kernel (apt-get download; versioned dependency resolved)
#   initrd.img         Furcate's boot initramfs: busybox + the kernel's virtio modules; its init
#                      loads them, mounts the rootfs (ext4 on virtio-blk) and switches root
#   smoke-initrd.img   a busybox initramfs whose init prints "furcate-smoke-ok" and powers off
#   debian-12-systemd.tar  Debian 12 minbase with systemd (mmdebstrap), the default image
#   test-rootfs.ext4   a tiny busybox rootfs for tests, with the guest agent (DEST/furcate-agent,
#                      from scripts/build-agent.sh) at /.furcate/agent; its init also serves a
#                      debug shell on the virtio-serial port named furcate.shell
# Idempotent: existing artifacts are kept (delete one to rebuild it). Never goes into git.
set -euo pipefail
dest="${1:-${FURCATE_GUEST_DIR:-${FURCATE_DATA:-${XDG_DATA_HOME:-$HOME/.local/share}/furcate}/guest}}"
mkdir -p "$dest"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
busybox=/bin/busybox
# Bump when what this script builds changes: older initramfs and rootfs images are rebuilt.
version=7
if [ "$(cat "$dest/.version" 2>/dev/null)" != "$version" ]; then
  rm -f "$dest/initrd.img" "$dest/smoke-initrd.img" "$dest/test-rootfs.ext4"
fi
# The test rootfs carries the agent: rebuild it when the agent changed.
agent="$dest/furcate-agent"
if [ -x "$agent" ]; then
  sum=$(sha256sum "$agent" | cut -c1-64)
  [ "$(cat "$dest/.agent-sha" 2>/dev/null)" = "$sum" ] || rm -f "$dest/test-rootfs.ext4"
fi
[ -x "$busybox" ] || { echo "guest: $busybox is missing (apt-get install busybox-static)" >&2; exit 1; }

# Modules the initramfs loads, in dependency order (Debian ships no modules.dep for a bare
# insmod). ext4 is built into the cloud kernel.
modules=(
  virtio_ring virtio virtio_mmio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci
  virtio_blk virtio_console failover net_failover virtio_net virtio-rng
  vsock vmw_vsock_virtio_transport_common vmw_vsock_virtio_transport
)

pack_cpio() {  # DIR OUT
  (cd "$1" && find . | cpio -o -H newc --quiet | gzip -1) > "$2.tmp"
  mv "$2.tmp" "$2"
}

if [ ! -s "$dest/vmlinuz" ] || [ ! -d "$dest/modules" ]; then
  pkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/ {print $2; exit}')
  [ -n "$pkg" ] || { echo "guest: cannot resolve linux-image-cloud-amd64 (run apt-get update)" >&2; exit 1; }
  echo "guest: downloading $pkg"
  (cd "$work" && apt-get download "$pkg" >/dev/null 2>&1 || apt-get download "$pkg")
  dpkg-deb -x "$work"/linux-image-*.deb "$work/k"
  rm -rf "$dest/modules.tmp" && mkdir -p "$dest/modules.tmp"
  for m in "${modules[@]}"; do
    f=$(find "$work/k/lib/modules" -name "$m.ko" | head -1)
    [ -n "$f" ] || { echo "guest: module $m not found in $pkg" >&2; exit 1; }
    cp "$f" "$dest/modules.tmp/"
  done
  rm -rf "$dest/modules" && mv "$dest/modules.tmp" "$dest/modules"
  cp "$work"/k/boot/vmlinuz-* "$dest/vmlinuz.tmp" && mv "$dest/vmlinuz.tmp" "$dest/vmlinuz"
  rm -f "$dest/initrd.img"  # built against these modules
fi

if [ ! -s "$dest/initrd.img" ]; then
  echo "guest: building initrd.img (busybox-static + ${#modules[@]} modules)"
  r="$work/initrd"
  mkdir -p "$r/bin" "$r/proc" "$r/sys" "$r/dev" "$r/newroot" "$r/lib/modules"
  cp "$busybox" "$r/bin/busybox"
  cp "$dest"/modules/*.ko "$r/lib/modules/"
  printf '%s\n' "${modules[@]}" > "$r/lib/modules/order"
  cat > "$r/init" <<'INIT'
#!/bin/busybox sh
# Furcate's boot initramfs: load the virtio modules, mount the rootfs, switch to it.
# Kernel parameters: furcate.root=DEV (default /dev/vda), furcate.init=PATH (default /sbin/init),
# furcate.net=ADDR/PREFIX,GATEWAY,DNS (configure eth0; absent: no network).
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /lib/modules/order); do insmod /lib/modules/$m.ko 2>/dev/null; done
root=/dev/vda
init=/sbin/init
net=""
dns=""
for a in $(cat /proc/cmdline); do
  case "$a" in
    furcate.root=*) root="${a#furcate.root=}" ;;
    furcate.init=*) init="${a#furcate.init=}" ;;
    furcate.net=*) net="${a#furcate.net=}" ;;
  esac
done
i=0
while [ ! -b "$root" ] && [ $i -lt 500 ]; do sleep 0.01; i=$((i+1)); done
# furcate.net=ADDR/PREFIX,GATEWAY,DNS: the user-mode NIC (eth0), configured before the image's
# init runs; an image that manages its own network may reconfigure it.
ip link set lo up 2>/dev/null
j=0
while [ -n "$net" ] && [ ! -d /sys/class/net/eth0 ] && [ $j -lt 200 ]; do sleep 0.01; j=$((j+1)); done
if [ -n "$net" ] && [ -d /sys/class/net/eth0 ]; then
  addr="${net%%,*}"; rest="${net#*,}"; gw="${rest%%,*}"; dns="${rest#*,}"
  ip link set eth0 up && ip addr add "$addr" dev eth0 && ip route add default via "$gw" \
    || echo "furcate-initrd: cannot configure eth0 ($net)"
fi
if ! mount -t ext4 "$root" /newroot; then
  echo "furcate-initrd: cannot mount $root; powering off"
  poweroff -f
fi
mkdir -p /newroot/dev /newroot/proc /newroot/sys
# DNS through slirp's forwarder, unless the image points resolv.conf elsewhere (a symlink).
if [ -n "$dns" ] && [ ! -L /newroot/etc/resolv.conf ] && [ -d /newroot/etc ]; then
  echo "nameserver $dns" > /newroot/etc/resolv.conf
fi
mount --move /dev /newroot/dev
mount --move /proc /newroot/proc
mount --move /sys /newroot/sys
# The guest agent starts first (supervised, in its own session), then becomes the image's init.
if [ -x /newroot/.furcate/agent ]; then
  exec switch_root /newroot /.furcate/agent --then "$init"
fi
exec switch_root /newroot "$init"
INIT
  chmod +x "$r/init"
  pack_cpio "$r" "$dest/initrd.img"
fi

if [ ! -s "$dest/smoke-initrd.img" ]; then
  echo "guest: building smoke-initrd.img (busybox-static)"
  r="$work/smoke"
  mkdir -p "$r/bin" "$r/proc" "$r/sys" "$r/dev"
  cp "$busybox" "$r/bin/busybox"
  cat > "$r/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
echo furcate-smoke-ok
/bin/busybox poweroff -f
INIT
  chmod +x "$r/init"
  pack_cpio "$r" "$dest/smoke-initrd.img"
fi

if [ ! -s "$dest/test-rootfs.ext4" ]; then
  echo "guest: building test-rootfs.ext4 (busybox-static, mkfs.ext4 -d)"
  r="$work/rootfs"
  mkdir -p "$r/bin" "$r/sbin" "$r/proc" "$r/sys" "$r/dev" "$r/tmp" "$r/root" "$r/etc" "$r/.furcate"
  cp "$busybox" "$r/bin/busybox"
  if [ -x "$agent" ]; then cp "$agent" "$r/.furcate/agent"; else echo "guest: no furcate-agent (scripts/build-agent.sh); test rootfs without agent"; fi
  for a in sh ls cat echo mount sleep sync hostname poweroff find grep mkdir rm head od tr wc; do
    ln -s busybox "$r/bin/$a"
  done
  cat > "$r/sbin/init" <<'INIT'
#!/bin/busybox sh
# Test rootfs init: a debug shell on the virtio-serial port named furcate.shell (the agent has
# furcate.0), restarted whenever the host side closes (after a restore the host reconnects).
# Every command line it reads runs in one long-lived shell, so background jobs persist.
/bin/busybox --install -s /bin
mount -t proc proc /proc 2>/dev/null
mount -t sysfs sysfs /sys 2>/dev/null
mount -t tmpfs tmpfs /tmp
mkdir -p /dev/pts && mount -t devpts -o ptmxmode=666 devpts /dev/pts
hostname furcate-test
echo "furcate-test-rootfs: init up"
port=""
i=0
while [ -z "$port" ] && [ $i -lt 500 ]; do
  for p in /sys/class/virtio-ports/*; do
    [ "$(cat "$p/name" 2>/dev/null)" = furcate.shell ] && port="/dev/${p##*/}"
  done
  [ -z "$port" ] && sleep 0.01
  i=$((i+1))
done
[ -n "$port" ] || { echo "furcate-test-rootfs: no furcate.shell port"; sleep 3600; }
echo "furcate-test-rootfs: serving a shell on $port"
# A port opens only once at a time (EBUSY), and background jobs inherit it: open it once here
# and hand the same descriptor to every shell. While no host is connected the port reads
# end-of-file at once: the agent starts a shell each time the host connects and sleeps in
# between (the driver's SIGIO) — a shell started every 50 ms took ~30% of a host CPU in every
# idle VM. Without the agent, that loop.
exec 3<>"$port"
[ -x /.furcate/agent ] && /.furcate/agent --shell-on 3 2>/dev/null
while true; do
  sh <&3 >&3 2>&3
  sleep 0.05
done
INIT
  chmod +x "$r/sbin/init"
  echo "root:x:0:0:root:/root:/bin/sh" > "$r/etc/passwd"
  rm -f "$dest/test-rootfs.ext4.tmp"
  # Inode tables written now (as images are, RootfsBuilder): else every VM's kernel spends its
  # first seconds zeroing them (ext4lazyinit), and a VM snapshotted then has its forks go on
  # doing it, each into pages of its own.
  mkfs.ext4 -q -F -L furcate-test -E lazy_itable_init=0 -d "$r" "$dest/test-rootfs.ext4.tmp" 64M
  mv "$dest/test-rootfs.ext4.tmp" "$dest/test-rootfs.ext4"
  [ -x "$agent" ] && sha256sum "$agent" | cut -c1-64 > "$dest/.agent-sha"
fi
# Debian 12 with systemd: the default image (`furcate serve`) and the systemd tests' image. Needs
# Debian's mirror; without it the rest still works and those tests skip.
# (--format: mmdebstrap otherwise picks the format from the name, and "….tar.tmp" made a
# directory; one left by that is removed and rebuilt.)
if [ -d "$dest/debian-12-systemd.tar" ]; then rm -rf "$dest/debian-12-systemd.tar"; fi
if [ ! -s "$dest/debian-12-systemd.tar" ] && [ "${FURCATE_SKIP_DEBIAN_IMAGE:-}" != 1 ]; then
  echo "guest: building debian-12-systemd.tar (mmdebstrap minbase + systemd, udev, dbus, iproute2)"
  rm -rf "$dest/debian-12-systemd.tar.tmp"
  if mmdebstrap --quiet --format=tar --variant=minbase --include=systemd-sysv,udev,dbus,iproute2,ca-certificates \
      bookworm "$dest/debian-12-systemd.tar.tmp" http://deb.debian.org/debian; then
    mv "$dest/debian-12-systemd.tar.tmp" "$dest/debian-12-systemd.tar"
  else
    rm -rf "$dest/debian-12-systemd.tar.tmp"
    echo "guest: mmdebstrap failed (no Debian mirror?); the default image and systemd tests are unavailable" >&2
  fi
fi
echo "$version" > "$dest/.version"
echo "guest: artifacts in $dest"
