#!/usr/bin/env bash
# A libvirt directory storage pool for VMs the bastion dispenses:
# 'bastion-test' at $BASTION_TESTBED_STATE/pool. up | down | path. Idempotent.
set -euo pipefail
BT_SCRIPT=pool
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

pool=bastion-test
dir=$BT_STATE/pool

case ${1:-} in
up)
  bt_need_root
  bt_ensure_libvirtd
  mkdir -p "$dir"
  if ! bt_virsh pool-info "$pool" >/dev/null 2>&1; then
    bt_virsh pool-define-as "$pool" dir --target "$dir" >/dev/null || bt_die "could not define storage pool $pool"
  fi
  if [[ $(bt_virsh pool-info "$pool" | awk '/^State:/ { print $2 }') != running ]]; then
    bt_virsh pool-start "$pool" >/dev/null || bt_die "could not start storage pool $pool"
  fi
  bt_log "storage pool $pool at $dir"
  ;;
down)
  bt_need_root
  bt_ensure_libvirtd
  if bt_virsh pool-info "$pool" >/dev/null 2>&1; then
    bt_virsh pool-destroy "$pool" >/dev/null 2>&1 || true
    bt_virsh pool-undefine "$pool" >/dev/null || bt_die "could not undefine storage pool $pool"
  fi
  rm -rf "$dir"
  bt_log "storage pool $pool removed"
  ;;
path)
  echo "$dir"
  ;;
*)
  echo "usage: $0 up|down|path" >&2
  exit 2
  ;;
esac
