#!/usr/bin/env bash
# Installs the Debian packages Furcate needs (idempotent: apt runs only when one is missing).
# Sourced by setup.sh and test.sh; the list grows as layers land.
set -euo pipefail

FURCATE_PACKAGES=(
  pkg-config        # system-library targets find their libraries through it
  libzstd-dev       # block compression (zstd)
  liblz4-dev        # block compression (lz4)
  zlib1g-dev        # crc32 of pack records
  libsqlite3-dev    # the store index, through GRDB
  util-linux        # mount/umount for the full-disk test's tmpfs
  fuse3             # /dev/fuse tools (fusermount3) for StoreFS
  libfuse3-dev      # the CFuse system-library target
  e2fsprogs         # mkfs.ext4, e2fsck and debugfs in the StoreFS tests
  qemu-system-x86   # the hypervisor (TCG here, KVM where the CPU has vmx/svm)
  busybox-static    # guest initramfs
  cpio              # packing the initramfs
  fio               # `furcate bench fs`
  wrk               # `furcate bench api`
  docker-registry   # image tests: a real OCI registry on loopback
  skopeo            # image tests: pushing test images to it, docker-archive files
  apache2-utils     # image tests: htpasswd for the registry's basic auth
  zstd              # image tests: zstd-compressed layers
  mmdebstrap        # the default Debian 12 image (scripts/guest-artifacts.sh)
  iproute2          # VM networks: namespaces, veth pairs, taps (ip)
  nftables          # VM networks: isolation and egress policy (nft)
  curl              # network tests: reaching servers from inside a VM's namespace
)

install_packages() {
  local missing=()
  for p in "${FURCATE_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -eq 0 ]; then
    echo "packages: all ${#FURCATE_PACKAGES[@]} present"
    return
  fi
  echo "packages: installing ${missing[*]}"
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
}
