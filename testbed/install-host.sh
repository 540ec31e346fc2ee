#!/usr/bin/env bash
# Install (only if missing) the host packages the VM test bed needs, then make
# sure virtlogd and libvirtd run and answer on qemu:///system. Idempotent; the
# common case (everything installed and running) costs two dpkg/virsh calls.
set -euo pipefail
BT_SCRIPT=install-host
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

PACKAGES=(
  libvirt-daemon-system libvirt-dev qemu-system-x86 qemu-utils qemu-guest-agent
  ansible-core asciinema debootstrap dnsmasq-base git haproxy openssh-client openssh-server pkg-config prometheus rsync
  e2fsprogs util-linux coreutils iptables
)

bt_need_root

missing=()
for p in "${PACKAGES[@]}"; do
  status=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
  [[ $status == installed ]] || missing+=("$p")
done

if ((${#missing[@]})); then
  bt_log "installing missing packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q || bt_die "apt-get update failed"
  apt-get install -y -q --no-install-recommends "${missing[@]}" \
    || bt_die "apt-get install failed for: ${missing[*]}"
  for p in "${missing[@]}"; do
    status=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
    [[ $status == installed ]] || bt_die "package $p is still not installed after apt-get install"
  done
else
  bt_log "host packages already installed"
fi

# mkfs.ext4 -d (populate from a directory) needs e2fsprogs >= 1.43.
mkfs.ext4 -V 2>&1 | awk 'NR == 1 { split($2, v, "."); exit !(v[1] > 1 || (v[1] == 1 && v[2] >= 43)) }' \
  || bt_die "mkfs.ext4 from e2fsprogs >= 1.43 is required (for -d)"

# Users of the libvirt group reach qemu:///system (the installed bastion's
# service user is one). libvirtd asks polkit over the system bus whether a
# user may; a machine with no system bus has no polkit to ask, so there the
# socket's group is the gate, as Debian's polkit rule for that group has it.
conf=/etc/libvirt/libvirtd.conf
if [[ ! -S /run/dbus/system_bus_socket ]] && ! grep -q '^auth_unix_rw = "none"' "$conf"; then
  bt_log "no system bus (no polkit): qemu:///system for root and the libvirt group, by the socket's group"
  printf '\n# bastion test bed (testbed/install-host.sh): no polkit here; the group is the gate.\nunix_sock_group = "libvirt"\nunix_sock_rw_perms = "0770"\nauth_unix_rw = "none"\n' >>"$conf"
  if bt_pidfile_alive /run/libvirtd.pid; then
    pid=$(tr -dc '0-9' </run/libvirtd.pid)
    bt_log "restarting libvirtd for it (running guests go on)"
    kill "$pid"
    for _ in $(seq 100); do bt_pidfile_alive /run/libvirtd.pid || break; sleep 0.1; done
  fi
fi

bt_ensure_libvirtd
bt_log "libvirt ready: $(virsh -c "$BT_URI" version 2>/dev/null | awk -F': ' '/Running hypervisor/ { print $2 }')"

if [[ -e /dev/kvm ]]; then
  bt_log "note: /dev/kvm exists but the test bed always uses TCG (<domain type='qemu'>)"
fi
