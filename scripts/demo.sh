#!/usr/bin/env bash
# The end-to-end tour that `make demo` runs: build the default image, launch a
# VM, run commands inside it, pause and resume it, stop it gracefully, delete it.
set -euo pipefail
cd "$(dirname "$0")/.."
popek() { .venv/bin/popek "$@"; }
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

NAME=${DEMO_NAME:-demo}
step "image: build the minimal guest from Debian packages (cached after the first run)"
popek image list --format json | grep -q '"name": "minimal"' || popek image build minimal
# popek signs what it builds; an image built by an older popek is signed here
popek image list --format json | grep -A12 '"name": "minimal"' | grep -q '"signer"' \
  || popek image sign minimal
popek image list
popek list --format json | grep -q "\"name\": \"$NAME\"" && popek delete --force "$NAME"

step "launch a VM (2 vCPUs, 256MiB)"
popek launch minimal "$NAME" --vcpus 2 --memory 256MiB
popek list

step "run commands inside it"
popek exec "$NAME" -- uname -a
popek exec "$NAME" -- sh -c 'echo "vCPUs: $(nproc)"; grep MemTotal /proc/meminfo'

step "pause and resume"
popek pause "$NAME"
popek list
popek resume "$NAME"
popek exec "$NAME" -- cat /proc/uptime

step "trust: a signed image, a measured launch, an attestation quote, an audit trail"
popek trust list
popek info "$NAME" | grep -E "label|image_trust|measurement"
NONCE=$(od -An -tx1 -N16 /dev/urandom | tr -d ' \n')
QUOTE=$(mktemp)
popek attest "$NAME" --nonce "$NONCE" > "$QUOTE"
popek attest verify "$QUOTE" --nonce "$NONCE" --expect "$QUOTE"
rm -f "$QUOTE"
popek audit log | tail -n 8
popek audit verify

step "stop it gracefully (ACPI power button), then look at its console"
popek stop "$NAME"
popek console --log "$NAME" | tail -n 4
popek info "$NAME"

step "delete it"
popek delete "$NAME"
popek list

step "a system container on an isolated network (port security always on), limits changed live"
NET=${DEMO_NET:-demonet}
popek network list --format json | grep -q "\"name\": \"$NET\"" && popek network delete --force "$NET"
popek network create "$NET"
popek launch minimal "$NAME-ct" --container --memory 128MiB --network "$NET"
popek exec "$NAME-ct" -- sh -c 'id; ip -4 addr show eth0 | grep inet'
popek config set "$NAME-ct" limits.memory 96MiB
popek info "$NAME-ct" | grep -E "memory used|processes|network"
popek delete --force "$NAME-ct"
popek network delete "$NET"

step "an application sandbox: no network, no secrets"
popek sandbox run -- sh -c 'echo "in the sandbox as $(id -u)"; ls /root 2>&1 | head -1'
step "the warm command server that ran these commands (it would exit after 10 idle minutes)"
popek command-server status || true
popek command-server stop
printf '\nDemo complete.\n'
