#!/usr/bin/env bash
# Installs everything popek needs on a Debian 12 host, as root.  Idempotent:
# a second run installs and downloads nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."

DEB_PACKAGES=(
  qemu-system-x86 qemu-utils busybox-static kmod cpio zstd xz-utils xfsprogs
  swtpm           # the virtual TPM of each VM (launch measurement in PCR 15)
  python3-venv util-linux procps iproute2 socat
  runc crun bubblewrap debootstrap
  slirp4netns     # user-mode networking of sandboxes run with --net
  nftables dnsmasq-base iperf3 tcpdump
  gcc libc6-dev   # the guest verifier and the security tests' attack tool are built static
  zsh fish        # popek's completion scripts are tested in each shell (bash is there)
  prometheus      # tests/integration/test_metrics.py scrapes popek's /metrics with it
  # The ceph storage driver: librados/librbd's Python bindings (management),
  # QEMU's rbd block driver (data), and the daemons of the tests' own cluster.
  python3-rados python3-rbd qemu-block-extra ceph-mon ceph-osd ceph-mgr
)

. scripts/lib/debs.sh
prometheus_before=$(dpkg-query -W -f='${Status}' prometheus 2>/dev/null || true)
install_debs setup "${DEB_PACKAGES[@]}"
# Debian's package enables a system Prometheus listening on every address (:9090);
# popek's tests run one of their own, so one installed here is not left enabled.
if [ "$prometheus_before" != "install ok installed" ]; then
  if [ "$(cat /proc/1/comm 2>/dev/null)" = systemd ]; then
    systemctl disable --now --quiet prometheus.service || true
  else
    rm -f /etc/systemd/system/multi-user.target.wants/prometheus.service
  fi
fi
# apt-get download (image builds) needs package lists.
if [ -z "$(ls -A /var/lib/apt/lists/ 2>/dev/null | grep -v -e lock -e partial)" ]; then
  apt-get update -q
fi

# The boot unit (popek admin boot: networks back, boot.autostart instances
# started) where systemd is, or may come: PID 1 or /etc/systemd/system.
if [ "$(cat /proc/1/comm 2>/dev/null)" = systemd ] || [ -d /etc/systemd/system ]; then
  unit=/etc/systemd/system/popek-boot.service
  sed "s|@POPEK@|$PWD/.venv/bin/popek|" contrib/systemd/popek-boot.service.in > "$unit.new"
  if cmp -s "$unit.new" "$unit"; then rm "$unit.new"; else
    mv "$unit.new" "$unit"
    echo "setup: installed $unit"
    if [ "$(cat /proc/1/comm 2>/dev/null)" = systemd ]; then
      systemctl daemon-reload && systemctl enable --quiet popek-boot.service
    else
      mkdir -p /etc/systemd/system/multi-user.target.wants
      ln -sf "$unit" /etc/systemd/system/multi-user.target.wants/popek-boot.service
    fi
  fi
fi
# The REST API's unit (popek serve), installed but not enabled: an operator
# turns it on with `systemctl enable --now popek-api`.
if [ -d /etc/systemd/system ]; then
  unit=/etc/systemd/system/popek-api.service
  sed "s|@POPEK@|$PWD/.venv/bin/popek|" contrib/systemd/popek-api.service.in > "$unit.new"
  if cmp -s "$unit.new" "$unit"; then rm "$unit.new"; else
    mv "$unit.new" "$unit"
    echo "setup: installed $unit (not enabled: systemctl enable --now popek-api)"
    if [ "$(cat /proc/1/comm 2>/dev/null)" = systemd ]; then systemctl daemon-reload; fi
  fi
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.popek-installed
want=$(cat pyproject.toml requirements.lock | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup: installing Python packages into .venv"
  .venv/bin/pip install -q --upgrade pip==24.3.1
  .venv/bin/pip install -q -c requirements.lock -e '.[dev]'
  echo "$want" > "$stamp"
fi
# The ceph driver's bindings come from Debian (python3-rados, python3-rbd: built
# against the librados/librbd the host runs, not on PyPI): a link to each of
# the two modules in the venv, nothing else of Debian's dist-packages on its path.
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["platlib"])')
suffix=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
for mod in rados rbd; do
  so=/usr/lib/python3/dist-packages/$mod$suffix
  if [ -f "$so" ]; then ln -sfn "$so" "$site/$mod$suffix"
  else echo "setup: $so missing (Debian's python3-$mod is for another Python): the ceph driver is unavailable"; fi
done
# Byte-compile popek's sources: the editable install leaves them as .py, and
# where PYTHONDONTWRITEBYTECODE is set every command would compile them again
# (about 50 ms of each launch here). compileall only redoes changed files.
.venv/bin/python -m compileall -q src >/dev/null
# The popek command itself: pip's console script starts Python with site and
# re (about 40 ms here); the native client (popek/cli/client.c) hands the
# command to the warm command server, or runs the Python client, which runs
# it in-process (popek/cli/client.py, docs/ARCHITECTURE.md).
.venv/bin/python -m popek.cli.client .venv/bin/popek
# `popek` on root's PATH: a link in /usr/local/bin to this checkout's command,
# unless a file of another installation is there (then say so and leave it).
link=/usr/local/bin/popek
if [ -L "$link" ] || [ ! -e "$link" ]; then
  ln -sfn "$PWD/.venv/bin/popek" "$link"
else
  echo "setup: $link exists and is not a link: left as it is (use $PWD/.venv/bin/popek)"
fi
# Completion of the command `popek` for bash, zsh and fish, in each shell's
# completion directory that exists (popek/cli/completion.py: INSTALL_DIRS).
.venv/bin/python -m popek.cli.completion
echo "setup: ready"
