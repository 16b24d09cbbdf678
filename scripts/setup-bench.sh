#!/usr/bin/env bash
# Installs what the benchmarks compare popek against (bench/containers.py), as root,
# from Debian's packages only: podman, LXC, bubblewrap, runc.  Idempotent: apt-get
# runs only when a package is missing.  Does not configure anything globally; the
# benchmark passes every setting it needs on the command line (see bench/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."

DEB_PACKAGES=(
  runc bubblewrap util-linux          # raw OCI runtime, raw sandbox, prlimit
  podman uidmap fuse-overlayfs slirp4netns catatonit containernetworking-plugins
  lxc                                 # lxc-start / lxc-execute (no lxc-templates)
  python3-venv
)

missing=()
for p in "${DEB_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup-bench: installing Debian packages: ${missing[*]}"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
else
  echo "setup-bench: Debian packages already installed"
fi
for tool in runc podman lxc-start lxc-execute bwrap prlimit; do
  command -v "$tool" >/dev/null || { echo "setup-bench: $tool missing after install" >&2; exit 1; }
done
echo "setup-bench: ready"
