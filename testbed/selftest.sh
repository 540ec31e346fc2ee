#!/usr/bin/env bash
# End-to-end check of the test bed: host setup, image, network, two guests
# booted in parallel, unique SSH host keys, libvirt's authorized-keys API (for
# root and for 'user', whose ~/.ssh does not exist beforehand), key login,
# the agent's view of the network, the label metadata. Removes its two guests
# at the end (the network stays up; teardown.sh removes it).
#
#   selftest.sh [--keep]    --keep leaves bt-selftest-a/-b running
set -euo pipefail
BT_SCRIPT=selftest
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

keep=0
[[ ${1:-} == --keep ]] && keep=1
[[ $# -le $keep ]] || bt_die "usage: selftest.sh [--keep]"
bt_need_root

A=bt-selftest-a
B=bt-selftest-b
passed=0 failed=0
pass() { passed=$((passed + 1)); bt_log "PASS: $*"; }
fail() { failed=$((failed + 1)); bt_log "FAIL: $*"; }

work=$(mktemp -d)
cleanup() {
  local rc=$?
  if ((!keep)); then "$BT_TESTBED_DIR/guest.sh" down "$A" "$B" >/dev/null 2>&1 || true; fi
  rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT

"$BT_TESTBED_DIR/install-host.sh"
"$BT_TESTBED_DIR/build-image.sh" >/dev/null
"$BT_TESTBED_DIR/net.sh" up
"$BT_TESTBED_DIR/guest.sh" down "$A" "$B" >/dev/null 2>&1 || true

if "$BT_TESTBED_DIR/guest.sh" up "$A" "$B" >"$work/up.json"; then
  pass "guest.sh up $A $B"
else
  fail "guest.sh up $A $B"
  echo "$passed passed, $failed failed"
  exit 1
fi

json_field() { # json_field NAME FIELD < guests.json
  grep -F "\"name\":\"$1\"" | grep -o "\"$2\":\"[^\"]*\"" | cut -d'"' -f4
}
ipa=$(json_field "$A" ip <"$BT_STATE/guests.json")
ipb=$(json_field "$B" ip <"$BT_STATE/guests.json")
uuida=$(json_field "$A" uuid <"$work/up.json")
if [[ -n $ipa && -n $ipb && $uuida == "$(bt_virsh domuuid "$A")" ]]; then
  pass "guests.json lists $A ($ipa) and $B ($ipb)"
else
  fail "guests.json entries missing or wrong"
fi

fp() { ssh-keyscan -T 10 -t ed25519 "$1" 2>/dev/null | ssh-keygen -lf - 2>/dev/null | awk '{ print $2 }'; }
fpa=$(fp "$ipa")
fpb=$(fp "$ipb")
if [[ -n $fpa && -n $fpb && $fpa != "$fpb" ]]; then
  pass "distinct SSH host keys ($fpa vs $fpb)"
else
  fail "SSH host keys missing or shared: '$fpa' '$fpb'"
fi

ssh-keygen -q -t ed25519 -N '' -C bt-selftest -f "$work/key"
SSH=(ssh -i "$work/key" -o IdentitiesOnly=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null
  -o BatchMode=yes -o ConnectTimeout=10 -o LogLevel=ERROR)
for u in root user; do
  if bt_virsh set-user-sshkeys "$A" "$u" --file "$work/key.pub"; then
    pass "virsh set-user-sshkeys $A $u"
  else
    fail "virsh set-user-sshkeys $A $u"
  fi
  if out=$("${SSH[@]}" "$u@$ipa" 'id -un; stat -c %U:%a ~/.ssh' 2>&1) && [[ $out == "$u"$'\n'"$u:700" ]]; then
    pass "ssh $u@$ipa with the injected key"
  else
    fail "ssh $u@$ipa: $out"
  fi
done
if "${SSH[@]}" "root@$ipb" true 2>/dev/null; then
  fail "ssh root@$ipb worked without an injected key"
else
  pass "ssh root@$ipb refused without an injected key"
fi

if bt_virsh qemu-agent-command "$A" '{"execute":"guest-network-get-interfaces"}' | grep -q "\"ip-address\":\"$ipa\""; then
  pass "agent reports $ipa on $A"
else
  fail "agent does not report $ipa on $A"
fi

if bt_virsh metadata "$A" https://bastion.invalid/labels | grep -q '<label key="testbed">true</label>'; then
  pass "label metadata testbed=true"
else
  fail "label metadata testbed=true missing"
fi

echo "$passed passed, $failed failed"
((failed == 0))
