#!/usr/bin/env bash
# make install: the bastion binary, its configuration (from the example, if
# there is none), its state directory, the systemd unit and bash completion.
# As root. DESTDIR stages the files under another root (packaging) and
# skips the user; PREFIX is /usr/local.
#
#   make install                     # then: systemctl enable --now bastion
#   runuser -u bastion -- bastion serve --config /etc/bastion/bastion.toml   # without systemd
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:?usage: install.sh BINARY}
root=${DESTDIR:-}
prefix=${PREFIX:-/usr/local}

[[ $(id -u) -eq 0 || -n $root ]] || { echo "install.sh: run as root (or set DESTDIR)" >&2; exit 1; }
[[ -x $bin ]] || { echo "install.sh: $bin is not a built binary (make build)" >&2; exit 1; }

say() { echo "[install] $*"; }

# The service's user: no shell, its home the state directory (where a
# qemu+ssh:// hypervisor's ~/.ssh goes). The libvirt group reaches
# qemu:///system.
if [[ -z $root ]] && ! id bastion >/dev/null 2>&1; then
  useradd --system --user-group --home-dir /var/lib/bastion --no-create-home --shell /usr/sbin/nologin bastion
  say "user bastion"
fi
if [[ -z $root ]] && getent group libvirt >/dev/null; then
  usermod -a -G libvirt bastion
fi
# Owners: root's files and the service user's state. Staged by a user who
# is not root, the files are that user's (a package build sets owners).
owner=(-o root -g root)
state=(-o bastion -g bastion)
config=(-o root -g bastion)
if [[ -n $root ]]; then
  state=(-o root -g root)
  config=(-o root -g root)
fi
if [[ $(id -u) -ne 0 ]]; then
  owner=() state=() config=()
fi

install -D -m 0755 "${owner[@]}" "$bin" "$root$prefix/bin/bastion"
say "$prefix/bin/bastion"

install -d -m 0700 "${state[@]}" "$root/var/lib/bastion"
say "/var/lib/bastion (mode 0700)"

# The configuration: never overwritten. Readable by the service's group,
# writable by root only (the bastion refuses a configuration others could
# change).
install -d -m 0750 "${config[@]}" "$root/etc/bastion"
file=$root/etc/bastion/bastion.toml
if [[ -e $file ]]; then
  say "/etc/bastion/bastion.toml exists: kept as it is"
else
  tmp=$(mktemp)
  sed -e 's|^state_dir = "state"$|state_dir = "/var/lib/bastion"|' bastion.toml.example >"$tmp"
  grep -q '^state_dir = "/var/lib/bastion"$' "$tmp" || { rm -f "$tmp"; echo "install.sh: the example's state_dir line changed; update install.sh" >&2; exit 1; }
  install -m 0640 "${config[@]}" "$tmp" "$file"
  rm -f "$tmp"
  say "/etc/bastion/bastion.toml (from bastion.toml.example: add accounts, rules and [[hypervisor]])"
fi

install -D -m 0644 "${owner[@]}" scripts/bastion.service "$root/etc/systemd/system/bastion.service"
if [[ $prefix != /usr/local ]]; then
  sed -i "s|/usr/local/bin/bastion|$prefix/bin/bastion|g" "$root/etc/systemd/system/bastion.service"
fi
say "/etc/systemd/system/bastion.service"

install -d -m 0755 "$root$prefix/share/bash-completion/completions"
"$bin" completion bash >"$root$prefix/share/bash-completion/completions/bastion"
say "$prefix/share/bash-completion/completions/bastion"

say "next: edit /etc/bastion/bastion.toml, then \`bastion doctor --config /etc/bastion/bastion.toml\`"
say "start: systemctl daemon-reload && systemctl enable --now bastion"
say "   or, without systemd: runuser -u bastion -- $prefix/bin/bastion serve --config /etc/bastion/bastion.toml"
