#!/usr/bin/env bash
# make demo: install what is missing, build the bastion, boot one VM, start
# the bastion for the current user's SSH keys, and print the line to try.
# make demo-stop undoes it (the cached guest image stays).
set -euo pipefail
cd "$(dirname "$0")/.."
top=$PWD
demo=$top/.demo
vm=bt-demo
port=${BASTION_DEMO_PORT:-2222}

stop() {
  if [[ -f $demo/bastion.pid ]]; then
    kill "$(cat "$demo/bastion.pid")" 2>/dev/null || true
    rm -f "$demo/bastion.pid"
  fi
  testbed/guest.sh down "$vm" >/dev/null 2>&1 || true
  echo "demo stopped (the bastion, and the VM $vm)"
}
if [[ ${1:-} == stop ]]; then
  stop
  exit 0
fi

testbed/install-host.sh
go build -o bin/bastion ./cmd/bastion
mkdir -p "$demo"
chmod 700 "$demo"

# The current user's public keys: ~/.ssh/*.pub and the agent's. Without
# any, a demo key is made in .demo/.
account=${USER:-$(id -un)}
keys=$( { cat ~/.ssh/*.pub 2>/dev/null; ssh-add -L 2>/dev/null; } | grep -E '^(ssh-|ecdsa-|sk-)' | sort -u || true)
identity=()
if [[ -z $keys ]]; then
  [[ -f $demo/id_ed25519 ]] || ssh-keygen -q -t ed25519 -N '' -C "$account@bastion-demo" -f "$demo/id_ed25519"
  keys=$(cat "$demo/id_ed25519.pub")
  identity=(-i "$demo/id_ed25519")
fi
toml_keys=$(while read -r k; do printf '  "%s",\n' "$k"; done <<<"$keys")

cat >"$demo/bastion.toml" <<TOML
# Written by make demo.
[server]
listen = "127.0.0.1:$port"
state_dir = "$demo/state"
audit = "$demo/audit.jsonl"

[[hypervisor]]
uri = "qemu:///system"

[[account]]
name = "$account"
groups = ["demo"]
keys = [
$toml_keys
]

[[rule]]
name = "demo"
groups = ["demo"]
vms = ["bt-*"]
logins = ["root", "user"]
channels = ["shell", "exec", "sftp", "scp", "local-forward", "remote-forward"]
TOML
bin/bastion config check --config "$demo/bastion.toml" >/dev/null

echo "booting the VM $vm (the first time also builds the guest image: about two minutes)..."
testbed/guest.sh up "$vm" >/dev/null

if [[ -f $demo/bastion.pid ]]; then
  kill "$(cat "$demo/bastion.pid")" 2>/dev/null || true
  sleep 1
fi
nohup bin/bastion serve --config "$demo/bastion.toml" >"$demo/bastion.log" 2>&1 &
echo $! >"$demo/bastion.pid"
for _ in $(seq 1 50); do
  grep -q "listening on" "$demo/bastion.log" 2>/dev/null && break
  sleep 0.1
done
grep -q "listening on" "$demo/bastion.log" || { cat "$demo/bastion.log"; echo "the bastion did not start" >&2; exit 1; }

known=$(bin/bastion keys known-hosts --config "$demo/bastion.toml")
printf '%s\n' "$known" >"$demo/known_hosts"
cat >"$demo/ssh_config" <<CFG
Host bastion
  HostName 127.0.0.1
  Port $port
  User $account
Host *
  UserKnownHostsFile $demo/known_hosts
  StrictHostKeyChecking yes
${identity:+  IdentityFile ${identity[1]}}
CFG

cat <<MSG

The bastion listens on 127.0.0.1:$port and the VM $vm is up. Try:

  ssh -F $demo/ssh_config -J bastion root@$vm

(sftp and scp take the same -F and -J.) To use your own ssh configuration
instead, add this line to ~/.ssh/known_hosts once:

  $known

and run: ssh ${identity[*]:+${identity[*]} }-J $account@127.0.0.1:$port root@$vm

The bastion's log is $demo/bastion.log, its audit stream $demo/audit.jsonl.
Stop everything with: make demo-stop
MSG
