#!/bin/bash
# Build a Debian bookworm guest for vmbatch with debootstrap.
#
#   guests/debian/build.sh [CACHE_ROOT]        (default /var/cache/vmbatch/guests)
#
# Result: $CACHE_ROOT/debian-<key>/ with
#   disk.qcow2   qcow2 of a bare ext4 root filesystem (no partition table), 3 GiB virtual, sparse
#   disk-plain.qcow2  the same system without cloud-init, as a stock image with no
#                contextualization agent: cloud-init purged, sshd with Debian's defaults
#                (password logins allowed, host keys of every type generated at build time)
#   disk-hepix.qcow2  the plain system plus guests/debian/hepix-context, a boot service
#                playing the guest's side of the HEPiX context CD contract (test image for
#                vmbatch's context = "cernvm"; no CernVM image can be downloaded here)
#   vmlinuz      kernel for direct kernel boot
#   initrd.img   initramfs (uncompressed cpio when possible: faster under TCG)
#   cmdline      one line of kernel arguments (root=/dev/vda ...)
#   manifest.txt `dpkg -l` of the guest
#   build-info   key, suite, mirror, kernel version, build date (informational)
# and the symlink $CACHE_ROOT/debian -> debian-<key>. The last line on stdout is the
# directory; progress goes to stderr. <key> = first 16 hex digits of the sha256 over this
# file's content and the package list. An existing complete directory is reused at once.
#
# The guest expects a NoCloud seed (volume label "cidata") that provides the SSH host key
# (ssh_keys: ed25519_private/ed25519_public) and authorized keys; it serves only an ed25519
# host key, gets its address by DHCP with systemd-networkd and has no DNS resolver (see
# below). Root has no password (locked); log in with a key.
#
# Needs root (debootstrap, chroot). Environment: DEBIAN_MIRROR overrides the mirror that
# is otherwise taken from apt's configuration (/etc/apt/sources.list{,.d}).
set -euo pipefail
umask 022
export LC_ALL=C
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

SUITE=bookworm
ARCH=amd64
DISK_SIZE=3G
PACKAGES=(
    systemd systemd-sysv udev dbus
    openssh-server openssh-sftp-server
    cloud-init python3-cffi-backend
    nfs-common
    linux-image-cloud-amd64
    iproute2 netbase sudo ca-certificates
)
# Kernel arguments. tsc=reliable: under TCG the kernel finds the vCPUs' TSCs
# "unsynchronized" and falls back to the emulated HPET, which makes every clock read a
# system call plus a device access (2-3x slower). cryptomgr.notests and the initcall
# blacklist skip crypto self-tests and kprobe tracing set-up.
CMDLINE="root=/dev/vda rootfstype=ext4 rw console=ttyS0,115200 net.ifnames=0 tsc=reliable"
CMDLINE+=" cryptomgr.notests initcall_blacklist=init_kprobe_trace,crypto_kdf108_init"
OUTPUTS=(disk.qcow2 disk-plain.qcow2 disk-hepix.qcow2 vmlinuz initrd.img cmdline manifest.txt)

log() { printf '[debian-guest] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

CACHE_ROOT=${1:-/var/cache/vmbatch/guests}
[[ $CACHE_ROOT == /* ]] || CACHE_ROOT="$PWD/$CACHE_ROOT"
[[ $CACHE_ROOT != *[[:space:]]* ]] || die "CACHE_ROOT must not contain whitespace: $CACHE_ROOT"
CACHE_ROOT=${CACHE_ROOT%/}

SELF=$(readlink -f "${BASH_SOURCE[0]}")
HEPIX=$(dirname "$SELF")/hepix-context
KEY=$({ cat "$SELF" "$HEPIX"; printf '%s\n' "${PACKAGES[@]}"; } | sha256sum | cut -c1-16)
NAME="debian-$KEY"
FINAL="$CACHE_ROOT/$NAME"
LINK="$CACHE_ROOT/debian"

is_complete() {
    local f
    [[ -d $1 ]] || return 1
    for f in "${OUTPUTS[@]}"; do [[ -s $1/$f ]] || return 1; done
}

point_link() {
    [[ $(readlink "$LINK" 2>/dev/null || true) == "$NAME" ]] && return 0
    ln -sfn "$NAME" "$LINK.tmp.$$"
    mv -T "$LINK.tmp.$$" "$LINK"
}

finish() {
    point_link
    printf '%s\n' "$FINAL"
    exit 0
}

# Fast path: nothing to do.
if is_complete "$FINAL"; then
    [[ -w $CACHE_ROOT ]] && finish
    printf '%s\n' "$FINAL"
    exit 0
fi

[[ $EUID -eq 0 ]] || die "must run as root (debootstrap, chroot)"

# --- tools ---------------------------------------------------------------------------
need=()
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
command -v qemu-img >/dev/null || need+=(qemu-utils)
command -v flock >/dev/null || need+=(util-linux)
if ((${#need[@]})); then
    log "installing ${need[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >&2 ||
        { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >&2; }
fi

mkdir -p -m 0755 "$CACHE_ROOT"

# One build at a time per cache; a waiting run reuses the result of the one before it.
exec 9>"$CACHE_ROOT/.debian.lock"
flock 9
if is_complete "$FINAL"; then finish; fi

# --- clean-up ------------------------------------------------------------------------
WORK=""
DB_PID=""
mounts_under() { awk -v p="$1/" 'index($2, p) == 1 { print $2 }' /proc/self/mounts | sort -r; }
cleanup() {
    local rc=$? m
    trap - EXIT INT TERM HUP
    set +e
    if [[ -n $DB_PID ]]; then # interrupted debootstrap: stop it and everything it started
        kill -TERM -- "-$DB_PID" 2>/dev/null
        wait "$DB_PID" 2>/dev/null
    fi
    if [[ -n $WORK && -d $WORK ]]; then
        for m in $(mounts_under "$WORK"); do
            umount "$m" 2>/dev/null || umount -l "$m" || true
        done
        if [[ -n $(mounts_under "$WORK") ]]; then
            log "mounts remain under $WORK; not deleting it"
        else
            rm -rf --one-file-system "$WORK" || log "could not remove $WORK"
        fi
    fi
    rm -f "$LINK.tmp.$$"
    ((rc == 0)) || log "build failed (exit $rc)"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

# --- mirror --------------------------------------------------------------------------
detect_mirror() {
    local m="" f
    if [[ -n ${DEBIAN_MIRROR:-} ]]; then
        printf '%s\n' "$DEBIAN_MIRROR"
        return
    fi
    if command -v apt-get >/dev/null; then
        m=$(apt-get indextargets --format '$(REPO_URI)' "Release: $SUITE" 'Target-Of: deb' \
            'Identifier: Packages' 2>/dev/null | head -n1) || true
        [[ -n $m ]] || m=$(apt-get indextargets --format '$(REPO_URI)' "Codename: $SUITE" \
            'Target-Of: deb' 'Identifier: Packages' 2>/dev/null | grep -v -- '-security' |
            head -n1) || true
    fi
    if [[ -z $m ]]; then # parse the files ourselves: one-line and deb822 formats
        for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
            [[ -r $f ]] || continue
            m=$(awk -v s="$SUITE" '$1 == "deb" { i = 2; if ($2 ~ /^\[/) while ($i !~ /\]$/) i++;
                if ($2 ~ /^\[/) i++; if ($(i + 1) == s) { print $i; exit } }' "$f")
            [[ -n $m ]] && break
        done
    fi
    if [[ -z $m ]]; then
        for f in /etc/apt/sources.list.d/*.sources; do
            [[ -r $f ]] || continue
            m=$(awk -v s="$SUITE" 'BEGIN { RS = ""; FS = "\n" }
                { uri = ""; ok = 0; deb = 0
                  for (j = 1; j <= NF; j++) {
                    if ($j ~ /^URIs:/) { split($j, a, /[ \t]+/); uri = a[2] }
                    if ($j ~ /^Suites:/ && (" " $j " ") ~ (" " s " ")) ok = 1
                    if ($j ~ /^Types:/ && $j ~ /(^|[ \t])deb([ \t]|$)/) deb = 1 }
                  if (ok && deb && uri != "") { print uri; exit } }' "$f")
            [[ -n $m ]] && break
        done
    fi
    [[ -n $m ]] || die "no apt source for '$SUITE' found in /etc/apt; set DEBIAN_MIRROR"
    printf '%s\n' "$m"
}
MIRROR=$(detect_mirror)

# --- debootstrap ---------------------------------------------------------------------
WORK=$(mktemp -d "$CACHE_ROOT/.debian-build.XXXXXX")
ROOT="$WORK/rootfs"
OUT="$WORK/out"
mkdir -p "$ROOT/etc/dpkg/dpkg.cfg.d" "$OUT"
# No fsync per package while building (removed again below).
echo force-unsafe-io >"$ROOT/etc/dpkg/dpkg.cfg.d/00vmbatch-unsafe-io"

include=$(IFS=,; echo "${PACKAGES[*]}")
log "key $KEY; debootstrap $SUITE ($ARCH, minbase) from $MIRROR into $ROOT"
SECONDS=0
# In its own process group, waited for with `wait` so that a signal to this script is
# handled at once and the clean-up can stop debootstrap together with its dpkg children.
setsid debootstrap --arch="$ARCH" --variant=minbase --include="$include" \
    "$SUITE" "$ROOT" "$MIRROR" >&2 </dev/null &
DB_PID=$!
wait "$DB_PID"
DB_PID=""
log "debootstrap done in ${SECONDS}s"
# debootstrap unmounts what it mounted; make sure before touching the tree.
for m in $(mounts_under "$ROOT"); do umount "$m" 2>/dev/null || umount -l "$m"; done
[[ -z $(mounts_under "$ROOT") ]] || die "mounts remain under $ROOT"
rm -f "$ROOT/etc/dpkg/dpkg.cfg.d/00vmbatch-unsafe-io"

in_root() { chroot "$ROOT" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C "$@"; }

# --- configure -----------------------------------------------------------------------
log "configuring"
KVER=$(cd "$ROOT/boot" && ls vmlinuz-* | sed 's/^vmlinuz-//' | sort -V | tail -n1)
[[ -n $KVER ]] || die "no kernel in $ROOT/boot"

# Filesystem, console, hostname, resolver.
cat >"$ROOT/etc/fstab" <<'EOF'
# vmbatch guest: the root filesystem is the whole virtio disk (no partition table).
/dev/vda  /  ext4  rw,noatime,errors=remount-ro  0 0
EOF
echo localhost >"$ROOT/etc/hostname"
cat >"$ROOT/etc/hosts" <<'EOF'
127.0.0.1	localhost
::1		localhost ip6-localhost ip6-loopback
ff02::1		ip6-allnodes
ff02::2		ip6-allrouters
EOF
# No resolver (no systemd-resolved either). QEMU's user-mode DNS at 10.0.2.3 relays to the
# host's resolver, a private address on the test machines; NFS tests run this guest with
# outbound traffic allowed (restrict=off), and a lookup must never leave the machine. The
# tests address servers by IP (the gateway 10.0.2.2); glibc then queries 127.0.0.1 only.
rm -f "$ROOT/etc/resolv.conf"
printf '# vmbatch test image: no resolver on purpose (see guests/debian/build.sh)\n' \
    >"$ROOT/etc/resolv.conf"

# Root: no password (locked: only key logins).
in_root usermod -p '*' root

# Network: DHCP on any Ethernet NIC with systemd-networkd (IPv4 only).
mkdir -p "$ROOT/etc/systemd/network"
cat >"$ROOT/etc/systemd/network/20-vmbatch-dhcp.network" <<'EOF'
[Match]
Type=ether

[Network]
DHCP=ipv4
LinkLocalAddressing=no
IPv6AcceptRA=no

[DHCPv4]
UseDomains=yes
EOF
in_root systemctl enable systemd-networkd.service >&2
# network-online.target (and so cloud-init's init stage, e.g. NFS "mounts:") waits for the
# first IPv4 lease on any NIC, for 30 s at most.
mkdir -p "$ROOT/etc/systemd/system/systemd-networkd-wait-online.service.d"
cat >"$ROOT/etc/systemd/system/systemd-networkd-wait-online.service.d/10-vmbatch.conf" <<'EOF2'
[Service]
ExecStart=
ExecStart=/lib/systemd/systemd-networkd-wait-online --any --ipv4 --timeout=30
EOF2

# Periodic maintenance is useless in a throw-away VM and costs CPU at boot.
for u in apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer e2scrub_all.timer \
    e2scrub_reap.service fstrim.timer; do
    in_root systemctl disable "$u" >&2 2>&1 || true
done
for u in apt-daily.service apt-daily-upgrade.service e2scrub_all.service \
    modprobe@drm.service modprobe@efi_pstore.service modprobe@dm_mod.service; do
    in_root systemctl mask "$u" >&2
done
# No pstore backend, no VGA console (the serial getty comes from console=ttyS0);
# rpcbind (NFSv3 only) stays socket-activated. nfs-client.target would load sunrpc and
# mount rpc_pipefs at every boot for Kerberos helpers; mount.nfs needs none of it for
# NFSv4 with sec=sys, and starts rpc-statd itself for NFSv3.
for u in systemd-pstore.service getty@tty1.service rpcbind.service nfs-client.target; do
    in_root systemctl disable "$u" >&2 2>&1 || true
done
# Generators for things this guest never has (encrypted/verity/GPT-auto disks, resume,
# offline updates, rc.local, SysV-only services): each costs ~0.2 s of CPU at boot.
mkdir -p "$ROOT/etc/systemd/system-generators"
for g in systemd-cryptsetup-generator systemd-veritysetup-generator \
    systemd-integritysetup-generator systemd-gpt-auto-generator \
    systemd-hibernate-resume-generator systemd-system-update-generator \
    systemd-rc-local-generator systemd-sysv-generator; do
    ln -sfn /dev/null "$ROOT/etc/systemd/system-generators/$g"
done

# sshd: serve only the ed25519 host key cloud-init installs from the seed; keys only.
rm -f "$ROOT"/etc/ssh/ssh_host_*
mkdir -p "$ROOT/etc/ssh/sshd_config.d"
cat >"$ROOT/etc/ssh/sshd_config.d/10-vmbatch.conf" <<'EOF'
# vmbatch: the host pins the per-job ed25519 key from the cloud-init seed.
HostKey /etc/ssh/ssh_host_ed25519_key
PermitRootLogin prohibit-password
KbdInteractiveAuthentication no
UseDNS no
PrintLastLog no
EOF
# No motd at login (pam_motd runs the update-motd.d scripts on every session).
sed -i 's/^\(session[[:space:]]\+optional[[:space:]]\+pam_motd\.so.*\)$/# \1/' \
    "$ROOT/etc/pam.d/sshd"
# cloud-init's set-passwords module edits this file for ssh_pwauth and restarts sshd when
# it changes it; pre-set the usual value so the first job's SSH is not cut by a restart.
install -m 0600 /dev/null "$ROOT/etc/ssh/sshd_config.d/50-cloud-init.conf"
echo 'PasswordAuthentication no' >"$ROOT/etc/ssh/sshd_config.d/50-cloud-init.conf"
# sshd must not start before cloud-init has written the host key.
mkdir -p "$ROOT/etc/systemd/system/ssh.service.d"
cat >"$ROOT/etc/systemd/system/ssh.service.d/10-vmbatch.conf" <<'EOF'
[Unit]
After=cloud-init.service
EOF

# cloud-init: NoCloud only, no network config of its own, only the modules a job uses.
cat >"$ROOT/etc/cloud/cloud.cfg.d/90-vmbatch.cfg" <<'EOF'
# vmbatch guest
datasource_list: [ NoCloud, None ]
# No default "debian" user (creating it costs ~2 s of boot under TCG; vmbatch logs in as
# root; user-data may still set "users"). Root already exists: a schema-valid no-op.
users:
 - name: root
   lock_passwd: false
network: {config: disabled}
# /etc/hosts gets "127.0.1.1 <hostname>" (else e.g. sudo complains it cannot resolve it).
manage_etc_hosts: true
# The seed provides ssh_keys; generate an ed25519 key only if it did not.
ssh_genkeytypes: [ed25519]
ssh_quiet_keygen: true
no_ssh_fingerprints: true
ssh:
  emit_keys_to_console: false
cloud_init_modules:
 - seed_random
 - bootcmd
 - write-files
 - resizefs
 - mounts
 - set_hostname
 - update_hostname
 - update_etc_hosts
 - users-groups
 - ssh
cloud_config_modules:
 - set-passwords
 - timezone
 - runcmd
cloud_final_modules:
 - write-files-deferred
 - scripts-vendor
 - scripts-per-once
 - scripts-per-boot
 - scripts-per-instance
 - scripts-user
 - phone-home
 - final-message
 - power-state-change
EOF

# initramfs: only what mounting /dev/vda needs (ext4 is built in); regenerate.
sed -i 's/^MODULES=.*/MODULES=list/' "$ROOT/etc/initramfs-tools/initramfs.conf"
printf '%s\n' virtio_pci virtio_blk >>"$ROOT/etc/initramfs-tools/modules"
in_root update-initramfs -u -k "$KVER" >&2

# Identity and caches: every VM gets its own machine-id; no host keys, logs or apt lists.
: >"$ROOT/etc/machine-id"
rm -f "$ROOT/var/lib/dbus/machine-id"
ln -s /etc/machine-id "$ROOT/var/lib/dbus/machine-id"
rm -rf "$ROOT"/var/lib/cloud/* "$ROOT"/var/lib/apt/lists/* "$ROOT"/var/cache/apt/*.bin \
    "$ROOT"/var/cache/apt/archives/*.deb "$ROOT"/var/log/journal/* "$ROOT"/tmp/* \
    "$ROOT"/var/tmp/* "$ROOT"/root/.bash_history
find "$ROOT/var/log" -type f -exec truncate -s 0 {} +
[[ -z $(ls -A "$ROOT/proc") && -z $(ls -A "$ROOT/sys") ]] || die "$ROOT/proc or /sys not empty"

# --- outputs -------------------------------------------------------------------------
log "writing outputs"
cp "$ROOT/boot/vmlinuz-$KVER" "$OUT/vmlinuz"
# An uncompressed initramfs unpacks faster under TCG than a compressed one.
initrd="$ROOT/boot/initrd.img-$KVER"
if gzip -t "$initrd" 2>/dev/null && gzip -dc "$initrd" >"$OUT/initrd.img" &&
    [[ $(head -c 6 "$OUT/initrd.img") == 070701 ]]; then
    :
else
    cp "$initrd" "$OUT/initrd.img"
fi
printf '%s\n' "$CMDLINE" >"$OUT/cmdline"
COLUMNS=200 dpkg-query --admindir="$ROOT/var/lib/dpkg" -l >"$OUT/manifest.txt"
cat >"$OUT/build-info" <<EOF
key=$KEY
suite=$SUITE
arch=$ARCH
mirror=$MIRROR
kernel=$KVER
built=$(date -u +%Y-%m-%dT%H:%M:%SZ)
EOF

make_disk() { # make_disk OUT.qcow2: the tree $ROOT as a bare ext4 filesystem
    truncate -s "$DISK_SIZE" "$WORK/root.ext4"
    mkfs.ext4 -q -F -L vmbatch-root -m 1 -d "$ROOT" "$WORK/root.ext4" >&2
    qemu-img convert -f raw -O qcow2 "$WORK/root.ext4" "$1"
    rm -f "$WORK/root.ext4"
}
SECONDS=0
make_disk "$OUT/disk.qcow2"
log "disk image done in ${SECONDS}s"

# The "plain" variant: what a stock image with no contextualization agent looks like, for
# vmbatch's offline injection (context = "inject"). cloud-init goes, and with it vmbatch's
# sshd settings: Debian's defaults come back (password logins allowed) and sshd gets host
# keys of every type, as after a normal install. Injection has to undo all of that.
SECONDS=0
in_root dpkg --purge cloud-init >&2
rm -rf "$ROOT/etc/cloud" "$ROOT/var/lib/cloud" "$ROOT/etc/systemd/system/ssh.service.d"
rm -f "$ROOT/etc/ssh/sshd_config.d/10-vmbatch.conf" "$ROOT/etc/ssh/sshd_config.d/50-cloud-init.conf"
printf '# vmbatch test image: no reverse DNS lookups at login (slow without a resolver).\nUseDNS no\n' \
    >"$ROOT/etc/ssh/sshd_config.d/10-plain.conf"
in_root ssh-keygen -A >&2
COLUMNS=200 dpkg-query --admindir="$ROOT/var/lib/dpkg" -l >"$OUT/manifest-plain.txt"
make_disk "$OUT/disk-plain.qcow2"
log "plain disk image done in ${SECONDS}s"

SECONDS=0
install -m 0755 "$HEPIX" "$ROOT/usr/local/sbin/hepix-context"
cat >"$ROOT/etc/systemd/system/hepix-context.service" <<'EOF'
[Unit]
Description=HEPiX contextualization CD (vmbatch test image)
DefaultDependencies=no
After=local-fs.target systemd-udevd.service
Before=ssh.service systemd-user-sessions.service network.target
ConditionPathExists=!/var/lib/hepix/context

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/local/sbin/hepix-context
StandardOutput=journal+console
StandardError=journal+console

[Install]
WantedBy=multi-user.target
EOF
in_root systemctl enable hepix-context.service >&2
make_disk "$OUT/disk-hepix.qcow2"
log "hepix disk image done in ${SECONDS}s"

chmod 0644 "$OUT"/*
chmod 0755 "$OUT"
is_complete "$OUT" || die "incomplete output in $OUT"

# --- publish -------------------------------------------------------------------------
[[ -e $FINAL ]] && rm -rf --one-file-system "$FINAL" # incomplete leftover (we hold the lock)
mv -T "$OUT" "$FINAL"
log "built $FINAL"
finish
