#!/usr/bin/env bash
# `make uninstall`: take popek off this host, as root.  First `popek admin
# reset` (the instances of POPEK_HOME, default /var/lib/popek, are stopped and
# its bridges, nftables tables, cgroups, dnsmasqs and what homes share are
# removed; its data stays unless PURGE=1), then what `make setup` installed:
# the boot and API units, the completion scripts, the command server and .venv.
# Debian packages and the download cache (.cache) stay.  DESTDIR prefixes the
# system paths (the unit, the completion scripts), as for an install.
set -euo pipefail
cd "$(dirname "$0")/.."

D=${DESTDIR:-}
UNIT=$D/etc/systemd/system/popek-boot.service
API_UNIT=$D/etc/systemd/system/popek-api.service
COMPLETIONS=(
  "$D/usr/share/bash-completion/completions/popek"
  "$D/usr/share/zsh/vendor-completions/_popek"
  "$D/usr/share/fish/vendor_completions.d/popek.fish"
)

if [ -x .venv/bin/popek ]; then
  if [ "${PURGE:-}" = 1 ]; then
    .venv/bin/popek admin reset --yes --purge
  else
    .venv/bin/popek admin reset --yes
  fi
  .venv/bin/popek command-server stop || true
  if [ -z "${DESTDIR:-}" ]; then  # this installation's socket and lock in /run/popek
    sock=$(.venv/bin/python -c 'from popek.cli.client import socket_path; print(socket_path())')
    rm -f "$sock" "$sock.lock"
  fi
fi
link=$D/usr/local/bin/popek  # the PATH link make setup made, if it points here
if [ -L "$link" ] && [ "$(readlink "$link")" = "$PWD/.venv/bin/popek" ]; then
  rm -f "$link"
  echo "uninstall: removed $link"
fi
if [ -f "$UNIT" ]; then
  if [ -z "$D" ] && [ "$(cat /proc/1/comm 2>/dev/null)" = systemd ]; then
    systemctl disable --quiet popek-boot.service || true
  fi
  rm -f "$UNIT" "$D/etc/systemd/system/multi-user.target.wants/popek-boot.service"
  echo "uninstall: removed $UNIT"
  if [ -z "$D" ] && [ "$(cat /proc/1/comm 2>/dev/null)" = systemd ]; then
    systemctl daemon-reload
  fi
fi
if [ -f "$API_UNIT" ]; then  # the REST API's unit (popek serve), if it was enabled
  if [ -z "$D" ] && [ "$(cat /proc/1/comm 2>/dev/null)" = systemd ]; then
    systemctl disable --now --quiet popek-api.service || true
  fi
  rm -f "$API_UNIT" "$D/etc/systemd/system/multi-user.target.wants/popek-api.service"
  echo "uninstall: removed $API_UNIT"
fi
for f in "${COMPLETIONS[@]}"; do
  if [ -e "$f" ]; then
    rm -f "$f"
    echo "uninstall: removed $f"
  fi
done
if [ -z "$D" ] && rmdir /run/popek 2>/dev/null; then echo "uninstall: removed /run/popek"; fi
rm -rf .venv build src/*.egg-info
echo "uninstall: removed .venv; Debian packages and .cache are left in place"
