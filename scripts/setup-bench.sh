#!/usr/bin/env bash
# Installs what bench/containers.py compares popek against, as root, from Debian's
# packages only: runc, podman, LXC, bubblewrap (and prlimit from util-linux).
# Idempotent: apt-get runs only when a package is missing.  Changes no global
# configuration: the benchmark passes every setting on the command line or in its
# own config files (private podman store, LXC network "empty"; see bench/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."

# Rootful podman and LXC need neither uidmap nor fuse-overlayfs, slirp4netns or
# catatonit (those are for rootless use, --network slirp4netns and --init).
DEB_PACKAGES=(runc podman lxc bubblewrap util-linux)

. "$(dirname "$0")/lib/debs.sh"
install_debs setup-bench "${DEB_PACKAGES[@]}"
for tool in runc podman lxc-start lxc-stop bwrap prlimit; do
  command -v "$tool" >/dev/null || { echo "setup-bench: $tool missing after install" >&2; exit 1; }
done
# With shadow's newuidmap present, LXC insists on /etc/subuid ranges even for root.
if command -v newuidmap >/dev/null && ! grep -qs '^root:' /etc/subuid; then
  echo "setup-bench: warning: newuidmap (package uidmap) is installed and /etc/subuid has" \
       "no range for root: LXC will refuse its id map and the benchmark skips LXC" >&2
fi
echo "setup-bench: ready"
