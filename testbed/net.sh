#!/usr/bin/env bash
# The test bed's isolated libvirt network (no forwarding, no NAT).
#
#   net.sh up      define + start 'bastion-test' (bridge virbr-bt, 192.168.214.0/24)
#   net.sh down    stop + undefine it
#   net.sh status  print whether it is defined/active
#
# The host is 192.168.214.1. Guest index N (0..179) has the fixed DHCP lease
# MAC 52:54:00:b7:00:<N in hex> -> 192.168.214.(10+N); .200-.250 are dynamic.
set -euo pipefail
BT_SCRIPT=net
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() { sed -n '2,9p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2; }

net_xml() {
  local i
  cat <<EOF
<network>
  <name>$BT_NET_NAME</name>
  <bridge name='$BT_NET_BRIDGE' stp='off' delay='0'/>
  <ip address='$BT_NET_GATEWAY' netmask='255.255.255.0'>
    <dhcp>
      <range start='$BT_DHCP_START' end='$BT_DHCP_END'/>
EOF
  for ((i = 0; i <= BT_MAX_INDEX; i++)); do
    printf "      <host mac='%s' ip='%s'/>\n" "$(bt_index_mac "$i")" "$(bt_index_ip "$i")"
  done
  cat <<EOF
    </dhcp>
  </ip>
</network>
EOF
}

net_defined() { bt_virsh net-info "$BT_NET_NAME" >/dev/null 2>&1; }
net_active() { [[ $(bt_virsh net-info "$BT_NET_NAME" 2>/dev/null | awk '$1 == "Active:" { print $2 }') == yes ]]; }

net_up() {
  local tmp
  if ! net_defined; then
    tmp=$(mktemp)
    net_xml >"$tmp"
    bt_virsh net-define "$tmp" >/dev/null || { rm -f "$tmp"; bt_die "virsh net-define $BT_NET_NAME failed"; }
    rm -f "$tmp"
    bt_log "defined network $BT_NET_NAME"
  fi
  # A network defined by an older version of this script: warn, keep it.
  if ! bt_virsh net-dumpxml "$BT_NET_NAME" | grep -q "<host mac='$(bt_index_mac "$BT_MAX_INDEX")'"; then
    bt_log "warning: $BT_NET_NAME lacks the expected DHCP host entries; run 'net.sh down' then 'net.sh up' to recreate it"
  fi
  if ! net_active; then
    if ip link show "$BT_NET_BRIDGE" >/dev/null 2>&1; then
      bt_die "bridge $BT_NET_BRIDGE already exists but network $BT_NET_NAME is not active; remove it (ip link del $BT_NET_BRIDGE)"
    fi
    bt_virsh net-start "$BT_NET_NAME" >/dev/null || bt_die "virsh net-start $BT_NET_NAME failed (is dnsmasq-base installed?)"
    bt_log "started network $BT_NET_NAME on $BT_NET_BRIDGE ($BT_NET_GATEWAY/24)"
  else
    bt_log "network $BT_NET_NAME already active"
  fi
  net_active || bt_die "network $BT_NET_NAME is not active after net-start"
}

net_down() {
  if net_defined; then
    if net_active; then
      bt_virsh net-destroy "$BT_NET_NAME" >/dev/null || bt_die "virsh net-destroy $BT_NET_NAME failed"
    fi
    bt_virsh net-undefine "$BT_NET_NAME" >/dev/null || bt_die "virsh net-undefine $BT_NET_NAME failed"
    bt_log "removed network $BT_NET_NAME"
  else
    bt_log "network $BT_NET_NAME not defined; nothing to do"
  fi
}

[[ $# -eq 1 ]] || usage
bt_need_root
bt_ensure_libvirtd
case $1 in
  up) net_up ;;
  down) net_down ;;
  status)
    if net_active; then echo "$BT_NET_NAME active ($BT_NET_BRIDGE, $BT_NET_GATEWAY/24)"
    elif net_defined; then echo "$BT_NET_NAME defined, inactive"
    else echo "$BT_NET_NAME not defined"; fi
    ;;
  *) usage ;;
esac
