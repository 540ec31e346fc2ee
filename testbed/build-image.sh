#!/usr/bin/env bash
# Build (once) and cache a small Debian 12 (bookworm) guest image for the
# bastion VM test bed: base.qcow2 + vmlinuz + initrd.img for direct kernel boot.
#
#   build-image.sh              build if needed; print the cache entry's path on stdout
#   build-image.sh --print-dir  print the path; exit 1 (without building) if not built
#   build-image.sh --rebuild    throw away the current entry and build again
#   build-image.sh --prune      also delete cache entries of other (older) recipes
#
# The cache entry is ${BASTION_TESTBED_CACHE:-/var/cache/bastion-testbed}/<recipe-hash>/
# where <recipe-hash> is the sha256 of this file: changing the recipe rebuilds.
# The entry appears atomically (rename of a fully built temp dir) or not at all.
#
# This file is self-contained on purpose (it does not source lib.sh), so that
# its hash is the whole recipe.
set -euo pipefail

SUITE=bookworm
IMAGE_SIZE=2G
PACKAGES=systemd-sysv,udev,kmod,dbus,iproute2,netbase,openssh-server,qemu-guest-agent,linux-image-amd64,procps,rsync,python3,git
INITRD_MODULES=(virtio_pci virtio_blk virtio_net virtio_console virtio_rng ext4 crc32c_generic)
GUEST_USER=user
BASE_HOSTNAME=bt-guest

CACHE="${BASTION_TESTBED_CACHE:-/var/cache/bastion-testbed}"
SELF="$(readlink -f "${BASH_SOURCE[0]}")"

log() { printf '[build-image] %s\n' "$*" >&2; }
die() { printf '[build-image] ERROR: %s\n' "$*" >&2; exit 1; }

mode=build prune=0
for arg in "$@"; do
  case $arg in
    --print-dir) mode=print ;;
    --rebuild) mode=rebuild ;;
    --prune) prune=1 ;;
    -h | --help) sed -n '2,15p' "$SELF" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$arg' (try --help)" ;;
  esac
done

HASH=$(sha256sum "$SELF" | cut -c1-16)
DEST="$CACHE/$HASH"

is_built() { [[ -s $DEST/base.qcow2 && -s $DEST/vmlinuz && -s $DEST/initrd.img ]]; }

if [[ $mode == print ]]; then
  echo "$DEST"
  is_built
  exit
fi

[[ $(id -u) -eq 0 ]] || die "must run as root (debootstrap, chroot, file ownership)"
for tool in debootstrap mkfs.ext4 qemu-img truncate sha256sum flock chroot; do
  command -v "$tool" >/dev/null || die "'$tool' not found: run testbed/install-host.sh first"
done

mkdir -p "$CACHE"
chmod 0755 "$CACHE"
exec {lockfd}>"$CACHE/.lock"
if ! flock -n "$lockfd"; then
  log "another build holds $CACHE/.lock; waiting (up to 15 min)"
  flock -w 900 "$lockfd" || die "timed out waiting for $CACHE/.lock"
fi

# Delete other recipes' entries, except those an overlay in the state dir still uses.
prune_others() {
  local d o in_use
  for d in "$CACHE"/*/; do
    d=${d%/}
    [[ -d $d && $d != "$DEST" && $(basename "$d") =~ ^[0-9a-f]{16}$ ]] || continue
    in_use=
    for o in "${BASTION_TESTBED_STATE:-/var/lib/bastion-testbed}"/*.qcow2; do
      [[ -e $o ]] || continue
      if qemu-img info -U "$o" 2>/dev/null | grep -q "^backing file: $d/"; then in_use=$o; break; fi
    done
    if [[ -n $in_use ]]; then
      log "keeping old cache entry $d: $in_use uses it"
      continue
    fi
    log "pruning old cache entry $d"
    rm -rf --one-file-system "$d"
  done
}

if [[ $mode == rebuild && -e $DEST ]]; then
  log "removing $DEST for rebuild"
  rm -rf --one-file-system "$DEST"
fi

if is_built; then
  log "cached image: $DEST"
  ((prune)) && prune_others
  echo "$DEST"
  exit 0
fi
[[ -e $DEST ]] && die "$DEST exists but is incomplete; remove it (or use --rebuild)"

# --- mirror: whatever this host's apt already uses ---------------------------
# Prefer an entry for $SUITE; else any Debian (non-security) mirror; else the default.
find_mirror() {
  local files=() f
  [[ -r /etc/apt/sources.list ]] && files+=(/etc/apt/sources.list)
  for f in /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [[ -r $f ]] && files+=("$f")
  done
  ((${#files[@]})) || return 1
  awk -v suite="$SUITE" '
    function consider(uri, suites, comps,   n, s, i) {
      if (uri !~ /^https?:\/\//) return
      n = split(suites, s, /[ \t]+/)
      for (i = 1; i <= n; i++) {
        if (s[i] == suite && comps ~ /(^|[ \t])main([ \t]|$)/ && best == "") best = uri
        if (s[i] !~ /security/ && uri ~ /\/debian\/?$/ && fallback == "") fallback = uri
      }
    }
    function flush() {
      if (types ~ /(^|[ \t])deb([ \t]|$)/ && enabled !~ /^[Nn]o/) {
        n = split(uris, u, /[ \t]+/)
        for (i = 1; i <= n; i++) if (u[i] != "") consider(u[i], suites, comps)
      }
      types = uris = suites = comps = enabled = ""
    }
    FILENAME ~ /\.sources$/ {
      if (FILENAME != cur) { flush(); cur = FILENAME }
      if ($0 ~ /^[ \t]*$/) { flush(); next }
      if ($0 ~ /^#/) next
      key = tolower($1); sub(/:$/, "", key); val = $0; sub(/^[^:]*:[ \t]*/, "", val)
      if (key == "types") types = val
      else if (key == "uris") uris = val
      else if (key == "suites") suites = val
      else if (key == "components") comps = val
      else if (key == "enabled") enabled = val
      next
    }
    {
      if (cur != "") { flush(); cur = "" }
      line = $0; sub(/#.*/, "", line)
      if (line !~ /^[ \t]*deb[ \t]/) next
      sub(/^[ \t]*deb[ \t]+/, "", line)
      if (line ~ /^\[/) sub(/^\[[^]]*\][ \t]*/, "", line)
      n = split(line, w, /[ \t]+/)
      c = ""; for (i = 3; i <= n; i++) c = c " " w[i]
      consider(w[1], w[2], c)
    }
    END {
      flush()
      if (best != "") print best; else if (fallback != "") print fallback; else exit 1
    }' "${files[@]}"
}
MIRROR="${BASTION_TESTBED_MIRROR:-}"
if [[ -z $MIRROR ]]; then
  MIRROR=$(find_mirror) || {
    MIRROR=http://deb.debian.org/debian
    log "warning: no Debian mirror found in the host's apt sources; using $MIRROR"
  }
fi

# --- build in a temp dir next to the destination ------------------------------
T0=$(date +%s.%N)
since() { awk -v s="$1" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }'; }

WORK=$(mktemp -d "$CACHE/.build-$HASH.XXXXXX")
ROOT="$WORK/rootfs"
OUT="$WORK/out"
cleanup() {
  local rc=$? m
  # debootstrap may leave /proc, /sys, ... mounted inside the rootfs on failure.
  while read -r m; do
    umount -l "$m" 2>/dev/null || true
  done < <(awk -v w="$WORK/" 'index($2, w) == 1 { print $2 }' /proc/self/mounts | sort -r)
  rm -rf --one-file-system "$WORK" || log "warning: could not remove $WORK"
  ((rc == 0)) || log "build FAILED (exit $rc); nothing was added to the cache"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
mkdir -p "$ROOT" "$OUT"

# Pre-seed the initramfs configuration so the initrd that linux-image's
# postinst builds during debootstrap is already the small one (MODULES=list).
mkdir -p "$ROOT/etc/initramfs-tools/conf.d" "$ROOT/usr/share/initramfs-tools/modules.d"
printf 'MODULES=list\n' >"$ROOT/etc/initramfs-tools/conf.d/bastion-testbed.conf"
printf '%s\n' "${INITRD_MODULES[@]}" >"$ROOT/usr/share/initramfs-tools/modules.d/bastion-testbed"

log "recipe $HASH: debootstrap $SUITE from $MIRROR (minbase) into $ROOT"
t=$(date +%s.%N)
if ! debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$ROOT" "$MIRROR" >"$WORK/debootstrap.log" 2>&1; then
  tail -n 40 "$WORK/debootstrap.log" >&2
  [[ -r $ROOT/debootstrap/debootstrap.log ]] && tail -n 40 "$ROOT/debootstrap/debootstrap.log" >&2
  die "debootstrap failed (see output above)"
fi
T_DEBOOTSTRAP=$(since "$t")
log "debootstrap done in ${T_DEBOOTSTRAP}s"

# --- guest configuration ------------------------------------------------------
t=$(date +%s.%N)
echo "$BASE_HOSTNAME" >"$ROOT/etc/hostname"
cat >"$ROOT/etc/hosts" <<EOF
127.0.0.1	localhost
127.0.1.1	$BASE_HOSTNAME
::1	localhost ip6-localhost ip6-loopback
ff02::1	ip6-allnodes
ff02::2	ip6-allrouters
EOF
cat >"$ROOT/etc/fstab" <<'EOF'
# The root file system is the VM's whole virtio disk (no partition table).
/dev/vda	/	ext4	rw,errors=remount-ro	0	1
EOF

mkdir -p "$ROOT/etc/systemd/network"
cat >"$ROOT/etc/systemd/network/99-dhcp.network" <<'EOF'
# Sorts after 90-*, so a network file generated from a static ip= on the
# kernel command line takes precedence.
[Match]
Name=eth0

[Network]
DHCP=ipv4
LinkLocalAddressing=no
IPv6AcceptRA=no
EOF

mkdir -p "$ROOT/etc/ssh/sshd_config.d"
cat >"$ROOT/etc/ssh/sshd_config.d/10-bastion-testbed.conf" <<'EOF'
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitEmptyPasswords no
PermitRootLogin prohibit-password
UseDNS no
EOF

# Overlays all share this image: no host keys and no machine-id in it. Each VM
# makes its own on first boot.
rm -f "$ROOT"/etc/ssh/ssh_host_*
cat >"$ROOT/etc/systemd/system/bastion-ssh-hostkeys.service" <<'EOF'
# ssh-keygen -A only creates the keys that are missing: a no-op after first boot.
# (Under TCG the RSA key takes 3 s on an idle vCPU, 10-15 s during boot.)
[Unit]
Description=Generate this VM's own SSH host keys
Before=ssh.service

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/bin/ssh-keygen -A

[Install]
WantedBy=multi-user.target
RequiredBy=ssh.service
EOF
: >"$ROOT/etc/machine-id"
rm -f "$ROOT/var/lib/dbus/machine-id"
ln -s /etc/machine-id "$ROOT/var/lib/dbus/machine-id"

# qemu-guest-agent is started by udev when the virtio port appears (a rule in
# the package); also pull it in explicitly from the device unit.
agent_dev='dev-virtio\x2dports-org.qemu.guest_agent.0.device'
[[ -e $ROOT/lib/systemd/system/qemu-guest-agent.service ]] || die "qemu-guest-agent.service missing from the rootfs"
mkdir -p "$ROOT/etc/systemd/system/$agent_dev.wants"
ln -sf /lib/systemd/system/qemu-guest-agent.service "$ROOT/etc/systemd/system/$agent_dev.wants/qemu-guest-agent.service"

chroot "$ROOT" /bin/systemctl enable systemd-networkd.service bastion-ssh-hostkeys.service ssh.service >/dev/null 2>&1 \
  || die "systemctl enable (in chroot) failed"
# Nothing on the isolated test network needs these; under TCG they only cost time.
chroot "$ROOT" /bin/systemctl mask systemd-firstboot.service systemd-networkd-wait-online.service \
  apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer e2scrub_reap.service fstrim.timer \
  >/dev/null 2>&1 || die "systemctl mask (in chroot) failed"

# Fewer kernel modules to load under TCG: nothing here uses KVM, wifi, DRM,
# the PC speaker, the ICH watchdog/SMBus/LPC or PS/2 mice (blacklist stops
# udev's autoloading), nor device-mapper, loop or EFI pstore (modprobe@ units).
mkdir -p "$ROOT/etc/modprobe.d"
printf 'blacklist %s\n' kvm kvm_amd kvm_intel ccp cfg80211 pcspkr iTCO_wdt lpc_ich i2c_i801 \
  psmouse serio_raw drm bochs >"$ROOT/etc/modprobe.d/bastion-testbed-blacklist.conf"
chroot "$ROOT" /bin/systemctl mask modprobe@drm.service modprobe@dm_mod.service modprobe@loop.service \
  modprobe@efi_pstore.service >/dev/null 2>&1 || die "systemctl mask modprobe@... (in chroot) failed"

# Users: root keeps no usable password; 'user' is unprivileged, has a home but
# no password. Neither has ~/.ssh: the guest agent creates it on demand.
chroot "$ROOT" /usr/sbin/usermod -p '*' root || die "usermod root failed"
chroot "$ROOT" /usr/sbin/useradd --create-home --shell /bin/bash "$GUEST_USER" || die "useradd $GUEST_USER failed"
rm -rf "$ROOT/root/.ssh" "$ROOT/home/$GUEST_USER/.ssh"

# Initramfs: make sure it is the small one with the virtio modules.
kver=$(find "$ROOT/lib/modules" -mindepth 1 -maxdepth 1 -type d -printf '%f\n' | sort -V | tail -n1)
[[ -n $kver ]] || die "no kernel modules directory in the rootfs"
[[ -e $ROOT/boot/vmlinuz-$kver ]] || die "no kernel /boot/vmlinuz-$kver in the rootfs"
initrd_ok() {
  local listing
  listing=$(chroot "$ROOT" /usr/bin/lsinitramfs "/boot/initrd.img-$kver" 2>/dev/null) || return 1
  local m
  for m in virtio_blk virtio_pci ext4; do
    grep -q "/$m\.ko" <<<"$listing" || return 1
  done
}
if ! initrd_ok; then
  log "initrd lacks the virtio modules; regenerating"
  chroot "$ROOT" /usr/sbin/update-initramfs -u -k "$kver" >"$WORK/initramfs.log" 2>&1 \
    || { tail -n 20 "$WORK/initramfs.log" >&2; die "update-initramfs failed"; }
  initrd_ok || die "initrd still lacks virtio_blk/virtio_pci/ext4 after update-initramfs"
fi
install -m 0644 "$ROOT/boot/vmlinuz-$kver" "$OUT/vmlinuz"
install -m 0644 "$ROOT/boot/initrd.img-$kver" "$OUT/initrd.img"

# Slim the tree.
chroot "$ROOT" /usr/bin/apt-get clean >/dev/null 2>&1 || true
rm -rf "${ROOT:?}"/var/lib/apt/lists/* "$ROOT"/var/cache/apt/*.bin "$ROOT"/usr/share/doc/* \
  "$ROOT"/usr/share/man/* "$ROOT"/usr/share/info/* "$ROOT"/var/log/*.log "$ROOT/debootstrap" \
  "${ROOT:?}"/tmp/* "${ROOT:?}"/boot/*
T_CONFIG=$(since "$t")
log "configured in ${T_CONFIG}s (kernel $kver)"

# --- disk image, without loop mounts ------------------------------------------
t=$(date +%s.%N)
truncate -s "$IMAGE_SIZE" "$WORK/root.raw"
mkfs.ext4 -q -F -L bt-root -d "$ROOT" "$WORK/root.raw" >"$WORK/mkfs.log" 2>&1 \
  || { cat "$WORK/mkfs.log" >&2; die "mkfs.ext4 -d failed"; }
qemu-img convert -O qcow2 "$WORK/root.raw" "$OUT/base.qcow2" || die "qemu-img convert failed"
rm -f "$WORK/root.raw"
chmod 0644 "$OUT/base.qcow2"
T_IMAGE=$(since "$t")
log "disk image in ${T_IMAGE}s ($(du -h "$OUT/base.qcow2" | cut -f1) qcow2, $IMAGE_SIZE virtual)"

T_TOTAL=$(since "$T0")
cat >"$OUT/recipe.txt" <<EOF
recipe_hash=$HASH
built=$(date -u +%Y-%m-%dT%H:%M:%SZ)
suite=$SUITE
mirror=$MIRROR
kernel=$kver
image_size=$IMAGE_SIZE
seconds_debootstrap=$T_DEBOOTSTRAP
seconds_configure=$T_CONFIG
seconds_image=$T_IMAGE
seconds_total=$T_TOTAL
EOF
chmod 0755 "$OUT"
mv -T "$OUT" "$DEST" || die "could not move the built image into place at $DEST"
log "built $DEST in ${T_TOTAL}s (debootstrap ${T_DEBOOTSTRAP}s, configure ${T_CONFIG}s, image ${T_IMAGE}s)"
((prune)) && prune_others
echo "$DEST"
