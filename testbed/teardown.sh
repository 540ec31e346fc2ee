#!/usr/bin/env bash
# Remove everything the test bed runs: every bt-* domain (destroyed and
# undefined), their overlays and console logs, guests.json entries, and the
# 'bastion-test' network. The image cache is left alone. Idempotent.
set -euo pipefail
BT_SCRIPT=teardown
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

bt_need_root
bt_ensure_libvirtd

mapfile -t doms < <(bt_domains)
if ((${#doms[@]})); then
  "$BT_TESTBED_DIR/guest.sh" down "${doms[@]}"
else
  bt_log "no bt-* domains"
fi

# Leftovers whose domain is already gone (e.g. after a crash).
if [[ -d $BT_STATE ]]; then
  bt_lock_state
  shopt -s nullglob
  for f in "$BT_STATE"/bt-*.qcow2 "$BT_STATE"/bt-*.console.log "$BT_STATE"/guests.d/bt-*.json; do
    bt_log "removing leftover $f"
    rm -f "$f"
  done
  bt_write_guests_json
  bt_unlock_state
fi

"$BT_TESTBED_DIR/pool.sh" down
"$BT_TESTBED_DIR/net.sh" down
bt_log "done (image cache in $BT_CACHE kept)"
