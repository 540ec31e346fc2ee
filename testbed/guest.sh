#!/usr/bin/env bash
# Test bed guests: throw-away Debian 12 VMs on the 'bastion-test' network.
#
#   guest.sh up [--timeout SECS] [--label KEY=VALUE]... NAME [NAME...]
#       For each NAME (must match ^bt-[a-z0-9-]+$): qcow2 overlay of the cached
#       base image, domain definition, then start them all in parallel and wait
#       until every guest's agent answers guest-ping and its sshd sends a banner
#       on port 22 of its IP. Default timeout 480 s (a loaded 2-core machine boots TCG guests slowly: 5 minutes seen) (or $BASTION_TESTBED_BOOT_TIMEOUT).
#       Writes/merges $STATE/guests.json; prints the entries for NAMEs on stdout.
#       A NAME that already exists is reused (started if shut off).
#   guest.sh down NAME [NAME...]
#       Destroy, undefine, delete the overlay and the guests.json entry.
#   guest.sh ls
#       List the bt-* domains with state, IP and MAC.
#
# STATE is ${BASTION_TESTBED_STATE:-/var/lib/bastion-testbed}.
set -euo pipefail
BT_SCRIPT=guest
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

LABEL_NS="https://bastion.invalid/labels"

usage() { sed -n '2,17p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2; }

xml_escape() {
  local s="$1"
  s=${s//&/&amp;}
  s=${s//</&lt;}
  s=${s//>/&gt;}
  s=${s//\"/&quot;}
  s=${s//\'/&apos;}
  printf '%s' "$s"
}

# domain_xml NAME MAC OVERLAY BASEDIR LABELS... (labels as KEY=VALUE)
domain_xml() {
  local name=$1 mac=$2 overlay=$3 base=$4 kv
  shift 4
  cat <<EOF
<domain type='qemu'>
  <name>$name</name>
  <metadata>
    <bastion:labels xmlns:bastion="$LABEL_NS">
EOF
  for kv in "$@"; do
    printf '      <label key="%s">%s</label>\n' "$(xml_escape "${kv%%=*}")" "$(xml_escape "${kv#*=}")"
  done
  cat <<EOF
    </bastion:labels>
  </metadata>
  <memory unit='MiB'>256</memory>
  <currentMemory unit='MiB'>256</currentMemory>
  <vcpu placement='static'>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>$base/vmlinuz</kernel>
    <initrd>$base/initrd.img</initrd>
    <cmdline>root=/dev/vda rw console=ttyS0 net.ifnames=0 systemd.hostname=$name</cmdline>
  </os>
  <features>
    <acpi/>
    <tcg>
      <tb-cache unit='MiB'>64</tb-cache>
    </tcg>
  </features>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='$overlay'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <interface type='network'>
      <mac address='$mac'/>
      <source network='$BT_NET_NAME'/>
      <model type='virtio'/>
    </interface>
    <serial type='pty'>
      <log file='$BT_STATE/$name.console.log' append='off'/>
      <target port='0'/>
    </serial>
    <console type='pty'>
      <target type='serial' port='0'/>
    </console>
    <channel type='unix'>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
    <rng model='virtio'>
      <backend model='random'>/dev/urandom</backend>
    </rng>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
EOF
}

# Lowest guest index whose MAC no defined domain uses.
alloc_index() {
  local used=" " d mac i
  while read -r d; do
    [[ -n $d ]] || continue
    while read -r mac; do
      i=$(bt_mac_index "$mac") && used+="$i "
    done < <(bt_virsh dumpxml "$d" 2>/dev/null | grep -o "<mac address='[0-9a-fA-F:]*'" | cut -d"'" -f2)
  done < <(bt_virsh list --all --name)
  for ((i = 0; i <= BT_MAX_INDEX; i++)); do
    [[ $used == *" $i "* ]] || { echo "$i"; return 0; }
  done
  return 1
}

write_entry() {
  local name=$1 mac=$2 uuid ip
  uuid=$(bt_virsh domuuid "$name") || bt_die "virsh domuuid $name failed"
  ip=$(bt_index_ip "$(bt_mac_index "$mac")")
  mkdir -p "$BT_STATE/guests.d"
  printf '{"name":"%s","uuid":"%s","ip":"%s","mac":"%s"}\n' \
    "$(bt_json_escape "$name")" "$uuid" "$ip" "$mac" >"$BT_STATE/guests.d/$name.json"
}

domain_state() { bt_virsh domstate "$1" 2>/dev/null | head -n1; }

agent_ping() {
  bt_virsh qemu-agent-command "$1" --timeout 3 '{"execute":"guest-ping"}' >/dev/null 2>&1
}

ssh_banner() {
  local line
  # shellcheck disable=SC2016 # expanded by the inner bash
  line=$(timeout 4 bash -c 'exec 3<>"/dev/tcp/$0/22" && IFS= read -r -t 3 l <&3 && printf "%s" "$l"' "$1" 2>/dev/null) || return 1
  [[ $line == SSH-* ]]
}

# Runs in the background, one per guest: start (unless running), then wait
# for agent and sshd. Writes "ok START_S PING_S SSH_S" or "fail REASON" to $3.
boot_and_wait() {
  local name=$1 ip=$2 out=$3 deadline=$4 t0 t_ping t_ssh started=started
  t0=$(bt_now)
  if [[ $(domain_state "$name") == running ]]; then
    started=already-running
  elif ! err=$(bt_virsh start "$name" 2>&1); then
    echo "fail virsh start: ${err//$'\n'/ }" >"$out"
    return
  fi
  local t_start
  t_start=$(bt_elapsed "$t0")
  until agent_ping "$name"; do
    if (($(date +%s) >= deadline)); then
      echo "fail guest agent did not answer guest-ping before the deadline" >"$out"; return
    fi
    [[ $(domain_state "$name") == running ]] || { echo "fail domain is '$(domain_state "$name")', not running" >"$out"; return; }
    sleep 0.5
  done
  t_ping=$(bt_elapsed "$t0")
  until ssh_banner "$ip"; do
    if (($(date +%s) >= deadline)); then
      echo "fail no SSH banner from $ip:22 before the deadline" >"$out"; return
    fi
    sleep 0.5
  done
  t_ssh=$(bt_elapsed "$t0")
  echo "ok $started $t_start $t_ping $t_ssh" >"$out"
}

cmd_up() {
  local timeout="${BASTION_TESTBED_BOOT_TIMEOUT:-480}" labels=("testbed=true") names=() n
  while (($#)); do
    case $1 in
      --timeout) [[ ${2:-} =~ ^[0-9]+$ ]] || bt_die "--timeout needs a number of seconds"; timeout=$2; shift 2 ;;
      --timeout=*) timeout=${1#*=}; [[ $timeout =~ ^[0-9]+$ ]] || bt_die "--timeout needs a number of seconds"; shift ;;
      --label) [[ ${2:-} =~ ^[A-Za-z0-9._/-]+=.*$ ]] || bt_die "--label needs KEY=VALUE (KEY of [A-Za-z0-9._/-])"; labels+=("$2"); shift 2 ;;
      -*) bt_die "unknown option $1" ;;
      *) bt_check_name "$1"; [[ " ${names[*]} " == *" $1 "* ]] || names+=("$1"); shift ;;
    esac
  done
  ((${#names[@]})) || usage
  bt_need_root
  bt_ensure_libvirtd

  local base
  base=$("$BT_TESTBED_DIR/build-image.sh") || bt_die "build-image.sh failed"
  [[ -s $base/base.qcow2 ]] || bt_die "no base image in $base"
  "$BT_TESTBED_DIR/net.sh" up

  bt_lock_state
  local -A mac_of=()
  local idx mac overlay xml
  for n in "${names[@]}"; do
    if bt_domain_exists "$n"; then
      mac=$(bt_domain_mac "$n")
      [[ -n $mac ]] || bt_die "domain $n exists but has no test bed MAC ($BT_MAC_PREFIX:xx); not touching it"
      bt_log "$n: already defined (MAC $mac), reusing"
    else
      idx=$(alloc_index) || bt_die "no free guest index (0..$BT_MAX_INDEX all in use)"
      mac=$(bt_index_mac "$idx")
      overlay="$BT_STATE/$n.qcow2"
      rm -f "$overlay" "$BT_STATE/$n.console.log"
      qemu-img create -q -f qcow2 -b "$base/base.qcow2" -F qcow2 "$overlay" \
        || bt_die "qemu-img create of overlay $overlay failed"
      xml=$(mktemp)
      domain_xml "$n" "$mac" "$overlay" "$base" "${labels[@]}" >"$xml"
      if ! bt_virsh define "$xml" >/dev/null; then
        rm -f "$xml" "$overlay"
        bt_die "virsh define $n failed"
      fi
      rm -f "$xml"
      bt_log "$n: defined (MAC $mac, IP $(bt_index_ip "$idx"))"
    fi
    mac_of[$n]=$mac
  done
  bt_unlock_state

  local tmpd deadline
  tmpd=$(mktemp -d)
  deadline=$(($(date +%s) + timeout))
  bt_log "starting ${names[*]} in parallel; waiting up to ${timeout}s for agent + sshd"
  for n in "${names[@]}"; do
    boot_and_wait "$n" "$(bt_index_ip "$(bt_mac_index "${mac_of[$n]}")")" "$tmpd/$n" "$deadline" &
  done
  wait

  local failed=() res ready=()
  for n in "${names[@]}"; do
    res=$(cat "$tmpd/$n" 2>/dev/null || echo "fail no result")
    if [[ $res == ok* ]]; then
      read -r _ how t_start t_ping t_ssh <<<"$res"
      bt_log "$n: ready ($how) ip $(bt_index_ip "$(bt_mac_index "${mac_of[$n]}")"): virsh start ${t_start}s, agent ping ${t_ping}s, ssh banner ${t_ssh}s"
      ready+=("$n")
    else
      bt_log "$n: FAILED: ${res#fail }"
      if [[ -r $BT_STATE/$n.console.log ]]; then
        bt_log "$n: last console lines ($BT_STATE/$n.console.log):"
        tail -n 15 "$BT_STATE/$n.console.log" | sed "s/^/    [$n] /" >&2
      fi
      failed+=("$n")
    fi
  done
  rm -rf "$tmpd"

  bt_lock_state
  for n in "${ready[@]}"; do write_entry "$n" "${mac_of[$n]}"; done
  bt_write_guests_json
  bt_unlock_state

  if ((${#failed[@]})); then
    bt_die "guests not ready: ${failed[*]} (left defined for inspection; 'guest.sh down ${failed[*]}' removes them)"
  fi
  # The entries for the guests just brought up, as a JSON array.
  local first=1
  printf '['
  for n in "${ready[@]}"; do
    ((first)) && first=0 || printf ','
    printf '\n  %s' "$(tr -d '\n' <"$BT_STATE/guests.d/$n.json")"
  done
  printf '\n]\n'
}

cmd_down() {
  local n names=()
  for n in "$@"; do bt_check_name "$n"; names+=("$n"); done
  ((${#names[@]})) || usage
  bt_need_root
  bt_ensure_libvirtd
  bt_lock_state
  for n in "${names[@]}"; do
    if bt_domain_exists "$n"; then
      if [[ $(domain_state "$n") != "shut off" ]]; then
        bt_virsh destroy "$n" >/dev/null 2>&1 || [[ $(domain_state "$n") == "shut off" ]] \
          || bt_die "virsh destroy $n failed"
      fi
      bt_virsh undefine "$n" >/dev/null || bt_die "virsh undefine $n failed"
      bt_log "$n: destroyed and undefined"
    else
      bt_log "$n: no such domain"
    fi
    rm -f "$BT_STATE/$n.qcow2" "$BT_STATE/$n.console.log" "$BT_STATE/guests.d/$n.json"
  done
  bt_write_guests_json
  bt_unlock_state
}

cmd_ls() {
  bt_need_root
  bt_ensure_libvirtd
  local n mac ip state
  printf '%-24s %-10s %-16s %-18s %s\n' NAME STATE IP MAC UUID
  while read -r n; do
    [[ -n $n ]] || continue
    mac=$(bt_domain_mac "$n")
    ip=-
    [[ -n $mac ]] && ip=$(bt_index_ip "$(bt_mac_index "$mac")")
    state=$(domain_state "$n")
    printf '%-24s %-10s %-16s %-18s %s\n' "$n" "${state// /-}" "$ip" "${mac:--}" "$(bt_virsh domuuid "$n")"
  done < <(bt_domains)
}

(($#)) || usage
cmd=$1
shift
case $cmd in
  up) cmd_up "$@" ;;
  down) cmd_down "$@" ;;
  ls | list) (($# == 0)) || usage; cmd_ls ;;
  *) usage ;;
esac
