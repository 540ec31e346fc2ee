# shellcheck shell=bash disable=SC2034
# Shared helpers for the bastion VM test bed scripts. Sourced, never run.
# (build-image.sh deliberately does NOT source this file: its recipe hash
# covers only its own content.)

BT_TESTBED_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BT_CACHE="${BASTION_TESTBED_CACHE:-/var/cache/bastion-testbed}"
BT_STATE="${BASTION_TESTBED_STATE:-/var/lib/bastion-testbed}"
BT_URI="qemu:///system"
BT_NET_NAME="bastion-test"
BT_NET_BRIDGE="virbr-bt"
BT_NET_PREFIX="192.168.214"
BT_NET_GATEWAY="${BT_NET_PREFIX}.1"
BT_MAC_PREFIX="52:54:00:b7:00"
# Guest index N (0..BT_MAX_INDEX) -> MAC 52:54:00:b7:00:<N as 2 hex digits>,
# IP 192.168.214.(10+N). Dynamic (unreserved) leases: .200-.250.
BT_MAX_INDEX=179
BT_DHCP_START="${BT_NET_PREFIX}.200"
BT_DHCP_END="${BT_NET_PREFIX}.250"
BT_NAME_RE='^bt-[a-z0-9-]+$'

bt_log() { printf '[%s] %s\n' "${BT_SCRIPT:-testbed}" "$*" >&2; }
bt_die() { printf '[%s] ERROR: %s\n' "${BT_SCRIPT:-testbed}" "$*" >&2; exit 1; }

bt_need_root() {
  [[ $(id -u) -eq 0 ]] || bt_die "must run as root (libvirt qemu:///system, image cache in $BT_CACHE)"
}

bt_virsh() { virsh -q -c "$BT_URI" "$@"; }

bt_now() { date +%s.%N; }
# bt_elapsed START -> seconds since START with one decimal
bt_elapsed() { awk -v s="$1" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }'; }

# True if the process recorded in pidfile $1 is alive (and not a zombie).
bt_pidfile_alive() {
  local pid state
  [[ -r $1 ]] || return 1
  pid=$(tr -dc '0-9' <"$1")
  [[ -n $pid && -r /proc/$pid/stat ]] || return 1
  state=$(awk '{ print $3 }' "/proc/$pid/stat" 2>/dev/null) || return 1
  [[ $state != Z && $state != X ]]
}

# Start virtlogd and libvirtd (as daemons, no systemd needed) unless they
# already answer, then wait until `virsh -c qemu:///system version` works.
# Deadline: $BASTION_TESTBED_LIBVIRTD_TIMEOUT seconds (default 60).
bt_ensure_libvirtd() {
  local timeout="${BASTION_TESTBED_LIBVIRTD_TIMEOUT:-60}" deadline
  if virsh -c "$BT_URI" version >/dev/null 2>&1; then
    return 0
  fi
  command -v virtlogd >/dev/null || bt_die "virtlogd not found: run testbed/install-host.sh"
  command -v libvirtd >/dev/null || bt_die "libvirtd not found: run testbed/install-host.sh"
  if ! bt_pidfile_alive /run/virtlogd.pid; then
    bt_log "starting virtlogd"
    virtlogd -d || bt_die "could not start virtlogd (virtlogd -d failed)"
  fi
  if ! bt_pidfile_alive /run/libvirtd.pid; then
    bt_log "starting libvirtd"
    libvirtd -d || bt_die "could not start libvirtd (libvirtd -d failed)"
  fi
  deadline=$(($(date +%s) + timeout))
  until virsh -c "$BT_URI" version >/dev/null 2>&1; do
    if (($(date +%s) >= deadline)); then
      virsh -c "$BT_URI" version >&2 || true
      bt_die "libvirtd did not answer on $BT_URI within ${timeout}s"
    fi
    sleep 0.5
  done
  bt_pidfile_alive /run/virtlogd.pid || bt_die "virtlogd is not running (needed for serial console logs)"
}

bt_check_name() {
  [[ $1 =~ $BT_NAME_RE ]] || bt_die "refusing guest name '$1': must match $BT_NAME_RE"
  ((${#1} <= 63)) || bt_die "refusing guest name '$1': longer than 63 characters"
}

bt_index_mac() { printf '%s:%02x' "$BT_MAC_PREFIX" "$1"; }
bt_index_ip() { printf '%s.%d' "$BT_NET_PREFIX" $((10 + $1)); }
# MAC -> index, or fail if the MAC is not one of ours.
bt_mac_index() {
  local mac="${1,,}"
  [[ $mac == "$BT_MAC_PREFIX":[0-9a-f][0-9a-f] ]] || return 1
  echo $((16#${mac##*:}))
}

# Names of all defined bt-* domains (running or not).
bt_domains() {
  bt_virsh list --all --name | awk -v re="$BT_NAME_RE" '$0 ~ re'| sort
}

bt_domain_exists() { bt_virsh dominfo "$1" >/dev/null 2>&1; }

bt_domain_mac() {
  bt_virsh dumpxml "$1" | grep -o "<mac address='$BT_MAC_PREFIX:[0-9a-f][0-9a-f]'" | head -n1 | cut -d"'" -f2
}

bt_json_escape() {
  local s="$1"
  s=${s//\\/\\\\}
  s=${s//\"/\\\"}
  printf '%s' "$s"
}

# Rebuild $BT_STATE/guests.json from the per-guest entries in guests.d/.
bt_write_guests_json() {
  local d="$BT_STATE/guests.d" f first=1 tmp
  mkdir -p "$d"
  tmp=$(mktemp "$BT_STATE/.guests.json.XXXXXX")
  {
    printf '['
    for f in "$d"/*.json; do
      [[ -e $f ]] || continue
      if ((first)); then first=0; printf '\n  '; else printf ',\n  '; fi
      tr -d '\n' <"$f"
    done
    if ((first)); then printf ']\n'; else printf '\n]\n'; fi
  } >"$tmp"
  chmod 0644 "$tmp"
  mv -f "$tmp" "$BT_STATE/guests.json"
}

# Serialise state changes between concurrent invocations.
bt_lock_state() {
  mkdir -p "$BT_STATE"
  chmod 0755 "$BT_STATE"
  exec {BT_LOCK_FD}>"$BT_STATE/.lock"
  flock -w 120 "$BT_LOCK_FD" || bt_die "could not lock $BT_STATE/.lock within 120s (another testbed script running?)"
}
bt_unlock_state() {
  if [[ -n ${BT_LOCK_FD:-} ]]; then
    exec {BT_LOCK_FD}>&-
    BT_LOCK_FD=
  fi
}
