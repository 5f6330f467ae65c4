#!/bin/bash
# Build a test guest made the way distributions make their cloud images, from Debian
# packages only: vmbatch's stand-in for a stock Debian/Ubuntu/Alma/Rocky cloud image, which
# CI cannot download.
#
#   guests/cloud/build.sh [CACHE_ROOT]        (default /var/cache/vmbatch/guests)
#
# Result: $CACHE_ROOT/cloud-<key>/ with
#   disk.qcow2    the whole disk, 3 GiB virtual: a GPT with a BIOS boot partition (GRUB's
#                 core image) and an ext4 root partition; GRUB's boot sector in the
#                 protective MBR; the kernel and initramfs only in the image's /boot
#   manifest.txt  `dpkg -l` of the guest
#   build-info    key, suite, mirror, kernel version, partition layout, build date
# and the symlink $CACHE_ROOT/cloud -> cloud-<key>. There is deliberately no kernel, initrd
# or cmdline file: the image boots like a downloaded cloud image, firmware (SeaBIOS) ->
# GRUB in the MBR -> /boot/grub/grub.cfg -> the image's kernel, as `scripts/register-guest`
# registers it. The last line on stdout is the directory; progress goes to stderr.
# <key> = first 16 hex digits of the sha256 over this file and the package list. An existing
# complete directory is reused at once.
#
# What makes it "stock" (as Debian's own bookworm genericcloud image, built by the cloud
# team's debian-cloud-images/FAI): Debian's cloud-init with its default datasource list
# (ds-identify finds the NoCloud `cidata` volume), netplan + systemd-networkd configured by
# cloud-init at boot, systemd-resolved, no SSH host keys (cloud-init makes them at first
# boot), a locked root, the default "debian" user only if user-data asks for it, kernel
# arguments for a serial console. Nothing vmbatch-specific is configured inside.
#
# How the disk is made without partition devices (loop partition scanning does not work
# on these machines): sfdisk writes the GPT into a sparse file; mkfs.ext4 -d writes the
# root filesystem at the partition's offset (mke2fs -E offset=); the image's own GRUB then
# runs in a chroot: update-grub with a build-time grub-probe stand-in that reports the
# partition the image will have (the approach of debian-cloud-images, which replaces
# grub-probe the same way), grub-mkimage for the core image, and grub-bios-setup to write
# boot.img and the core image, with the disk file and a read-only loop device of the root
# partition named in a device map (grub-bios-setup needs the partition holding
# /boot/grub mounted).
#
# Needs root (debootstrap, chroot, losetup, mount). Environment: DEBIAN_MIRROR overrides
# the mirror otherwise taken from apt's configuration. Takes ~3 min here (debootstrap ~2
# min with downloads; downloaded packages are kept in $CACHE_ROOT/.cloud-debs for rebuilds).
set -euo pipefail
umask 022
export LC_ALL=C
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

SUITE=bookworm
ARCH=amd64
DISK_SIZE_MIB=3072
PACKAGES=(
    systemd systemd-sysv udev dbus libpam-systemd
    openssh-server openssh-sftp-server
    cloud-init python3-cffi-backend cloud-guest-utils
    netplan.io systemd-resolved
    linux-image-cloud-amd64 grub-pc
    e2fsprogs iproute2 netbase sudo ca-certificates less
)
# Partitions, in 512-byte sectors: BIOS boot partition (GRUB's core image) at 1 MiB, the
# root filesystem from 4 MiB to the end (GPT type GUIDs from the UEFI spec / GRUB manual).
BIOS_START=2048 BIOS_SECTORS=6144 ROOT_START=8192
BIOS_BOOT_TYPE=21686148-6449-6E6F-744E-656564454649
LINUX_FS_TYPE=0FC63DAF-8483-4772-8E79-3D69D8477DE4
# Debian cloud images' kernel arguments (serial console first for the console log).
CMDLINE="console=tty0 console=ttyS0,115200 earlyprintk=ttyS0,115200 consoleblank=0"
OUTPUTS=(disk.qcow2 manifest.txt build-info)

log() { printf '[cloud-guest] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

CACHE_ROOT=${1:-/var/cache/vmbatch/guests}
[[ $CACHE_ROOT == /* ]] || CACHE_ROOT="$PWD/$CACHE_ROOT"
[[ $CACHE_ROOT != *[[:space:]]* ]] || die "CACHE_ROOT must not contain whitespace: $CACHE_ROOT"
CACHE_ROOT=${CACHE_ROOT%/}

SELF=$(readlink -f "${BASH_SOURCE[0]}")
KEY=$({ cat "$SELF"; printf '%s\n' "${PACKAGES[@]}"; } | sha256sum | cut -c1-16)
NAME="cloud-$KEY"
FINAL="$CACHE_ROOT/$NAME"
LINK="$CACHE_ROOT/cloud"

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

if is_complete "$FINAL"; then
    [[ -w $CACHE_ROOT ]] && finish
    printf '%s\n' "$FINAL"
    exit 0
fi

[[ $EUID -eq 0 ]] || die "must run as root (debootstrap, chroot, losetup)"

# --- tools ---------------------------------------------------------------------------
need=()
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
command -v qemu-img >/dev/null || need+=(qemu-utils)
command -v sfdisk >/dev/null || need+=(fdisk)
command -v flock >/dev/null || need+=(util-linux)
if ((${#need[@]})); then
    log "installing ${need[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >&2 ||
        { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >&2; }
fi

mkdir -p -m 0755 "$CACHE_ROOT"
exec 9>"$CACHE_ROOT/.cloud.lock"
flock 9
if is_complete "$FINAL"; then finish; fi

# --- clean-up ------------------------------------------------------------------------
WORK=""
DB_PID=""
LOOP=""
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
    fi
    [[ -n $LOOP ]] && losetup -d "$LOOP"
    if [[ -n $WORK && -d $WORK ]]; then
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

# --- mirror (as guests/debian/build.sh finds it) --------------------------------------
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
    if [[ -z $m ]]; then
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
WORK=$(mktemp -d "$CACHE_ROOT/.cloud-build.XXXXXX")
ROOT="$WORK/rootfs"
OUT="$WORK/out"
DEBS="$CACHE_ROOT/.cloud-debs"
mkdir -p "$ROOT/etc/dpkg/dpkg.cfg.d" "$OUT" "$DEBS"
echo force-unsafe-io >"$ROOT/etc/dpkg/dpkg.cfg.d/00vmbatch-unsafe-io"

include=$(IFS=,; echo "${PACKAGES[*]}")
log "key $KEY; debootstrap $SUITE ($ARCH, minbase) from $MIRROR into $ROOT"
SECONDS=0
setsid debootstrap --arch="$ARCH" --variant=minbase --cache-dir="$DEBS" --include="$include" \
    "$SUITE" "$ROOT" "$MIRROR" >&2 </dev/null &
DB_PID=$!
wait "$DB_PID"
DB_PID=""
log "debootstrap done in ${SECONDS}s"
for m in $(mounts_under "$ROOT"); do umount "$m" 2>/dev/null || umount -l "$m"; done
[[ -z $(mounts_under "$ROOT") ]] || die "mounts remain under $ROOT"
rm -f "$ROOT/etc/dpkg/dpkg.cfg.d/00vmbatch-unsafe-io"

in_root() { chroot "$ROOT" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C "$@"; }

# --- configure, as a distribution's image build does ---------------------------------
SECONDS=0
log "configuring"
KVER=$(cd "$ROOT/boot" && ls vmlinuz-* | sed 's/^vmlinuz-//' | sort -V | tail -n1)
[[ -n $KVER ]] || die "no kernel in $ROOT/boot"
FS_UUID=$(cat /proc/sys/kernel/random/uuid)

cat >"$ROOT/etc/fstab" <<EOF
UUID=$FS_UUID  /  ext4  rw,discard,errors=remount-ro,x-systemd.growfs  0 1
EOF
echo localhost >"$ROOT/etc/hostname"
cat >"$ROOT/etc/hosts" <<'EOF'
127.0.0.1	localhost
::1		localhost ip6-localhost ip6-loopback
ff02::1		ip6-allnodes
ff02::2		ip6-allrouters
EOF
ln -sfn /run/systemd/resolve/stub-resolv.conf "$ROOT/etc/resolv.conf"
# The system locale (cloud-init's locale module keeps it; without one it sets en_US.UTF-8,
# which Debian's locale-gen does not generate on request, and the module fails).
echo LANG=C.UTF-8 >"$ROOT/etc/default/locale"
in_root usermod -p '*' root
in_root systemctl enable systemd-networkd.service systemd-resolved.service >&2
# DHCP on any Ethernet NIC when nothing configures it, as NetworkManager's default
# connection gives Alma/Rocky images: the image then comes up without cloud-init too (no
# seed: ds-identify disables cloud-init), which vmbatch's offline injection relies on.
# cloud-init's netplan config (/run/systemd/network/10-netplan-*) sorts first and wins.
mkdir -p "$ROOT/etc/systemd/network"
cat >"$ROOT/etc/systemd/network/99-fallback-dhcp.network" <<'EOF'
[Match]
Type=ether

[Network]
DHCP=yes
EOF

# Each instance makes its own host keys (cloud-init's ssh module) and machine id.
rm -f "$ROOT"/etc/ssh/ssh_host_*
: >"$ROOT/etc/machine-id"
rm -f "$ROOT/var/lib/dbus/machine-id"
ln -s /etc/machine-id "$ROOT/var/lib/dbus/machine-id"

# The initramfs again, now that /etc/fstab names the root (its fsck hook copies fsck.ext4
# only then), as an installer's last step does.
in_root update-initramfs -u -k "$KVER" >&2

# --- bootloader: the image's own GRUB -------------------------------------------------
mkdir -p "$ROOT/etc/default/grub.d"
cat >"$ROOT/etc/default/grub.d/50-cloud.cfg" <<EOF
# Serial console, no menu wait: as in Debian's cloud images.
GRUB_CMDLINE_LINUX="$CMDLINE"
GRUB_CMDLINE_LINUX_DEFAULT=""
GRUB_TIMEOUT=0
GRUB_TERMINAL="console serial"
GRUB_SERIAL_COMMAND="serial --speed=115200"
EOF
# update-grub asks grub-probe about the filesystem under / and /boot; here that is the
# build host's. A stand-in answers for the partition the image will have, and a
# /dev/disk/by-uuid entry makes 10_linux use root=UUID=.
mv "$ROOT/usr/sbin/grub-probe" "$ROOT/usr/sbin/grub-probe.real"
cat >"$ROOT/usr/sbin/grub-probe" <<EOF
#!/bin/sh
# Build-time stand-in (guests/cloud/build.sh); removed before the image is made.
for a in "\$@"; do case \$a in --target=*) t=\${a#--target=};; esac; done
case \${t:-device} in
device) echo /dev/vda2;;
disk) echo /dev/vda;;
fs) echo ext2;;
fs_uuid) echo $FS_UUID;;
partmap) echo gpt;;
abstraction) ;;
compatibility_hint) echo hd0,gpt2;;
hints_string) echo '--hint-bios=hd0,gpt2 ';;
*) echo "grub-probe stand-in: no answer for --target=\$t" >&2; exit 1;;
esac
EOF
chmod 0755 "$ROOT/usr/sbin/grub-probe"
mkdir -p "$ROOT/dev/disk/by-uuid"
touch "$ROOT/dev/disk/by-uuid/$FS_UUID"
in_root update-grub >&2
rm -rf "$ROOT/dev/disk"
mv "$ROOT/usr/sbin/grub-probe.real" "$ROOT/usr/sbin/grub-probe"
grep -q "root=UUID=$FS_UUID" "$ROOT/boot/grub/grub.cfg" || die "grub.cfg does not boot the root"

# What grub-install puts into /boot/grub/i386-pc: the modules, boot.img and a core image
# that finds the root filesystem by its UUID.
GRUB_DIR="$ROOT/boot/grub/i386-pc"
mkdir -p "$GRUB_DIR"
cp "$ROOT"/usr/lib/grub/i386-pc/*.mod "$ROOT"/usr/lib/grub/i386-pc/*.lst \
    "$ROOT/usr/lib/grub/i386-pc/boot.img" "$GRUB_DIR/"
printf 'search.fs_uuid %s root hd0,gpt2\nset prefix=($root)/boot/grub\n' "$FS_UUID" \
    >"$GRUB_DIR/load.cfg"
in_root grub-mkimage -O i386-pc -d /usr/lib/grub/i386-pc -c /boot/grub/i386-pc/load.cfg \
    -p /boot/grub -o /boot/grub/i386-pc/core.img biosdisk part_gpt ext2 search_fs_uuid
in_root grub-editenv /boot/grub/grubenv create

# Periodic jobs and caches of the build go; logs are emptied.
rm -rf "$ROOT"/var/lib/cloud/* "$ROOT"/var/lib/apt/lists/* "$ROOT"/var/cache/apt/*.bin \
    "$ROOT"/var/cache/apt/archives/*.deb "$ROOT"/var/log/journal/* "$ROOT"/tmp/* \
    "$ROOT"/var/tmp/* "$ROOT"/root/.bash_history
find "$ROOT/var/log" -type f -exec truncate -s 0 {} +
[[ -z $(ls -A "$ROOT/proc") && -z $(ls -A "$ROOT/sys") ]] || die "$ROOT/proc or /sys not empty"
COLUMNS=200 dpkg-query --admindir="$ROOT/var/lib/dpkg" -l >"$OUT/manifest.txt"
log "configured in ${SECONDS}s"

# --- the disk ------------------------------------------------------------------------
SECONDS=0
DISK="$WORK/disk.raw"
truncate -s "${DISK_SIZE_MIB}M" "$DISK"
sfdisk -q "$DISK" >&2 <<EOF
label: gpt
start=$BIOS_START, size=$BIOS_SECTORS, type=$BIOS_BOOT_TYPE, name=bios
start=$ROOT_START, type=$LINUX_FS_TYPE, name=root
EOF
ROOT_SECTORS=$(sfdisk -l -o Start,Sectors "$DISK" | awk -v s="$ROOT_START" '$1 == s { print $2 }')
[[ -n $ROOT_SECTORS ]] || die "sfdisk made no root partition at sector $ROOT_START"
ROOT_KIB=$((ROOT_SECTORS / 2))
mkfs.ext4 -q -F -U "$FS_UUID" -L root -m 1 -E offset=$((ROOT_START * 512)) -d "$ROOT" \
    "$DISK" "${ROOT_KIB}k" >&2

# grub-bios-setup, from the image, writes boot.img into the protective MBR and the core
# image into the BIOS boot partition. It must find the filesystem holding the -d directory:
# the root partition, mounted read-only from a loop device over its byte range.
LOOP=$(losetup -f --show -r -o $((ROOT_START * 512)) --sizelimit $((ROOT_KIB * 1024)) "$DISK")
mkdir -p "$ROOT/run/vmbatch-build"
mount -o ro,noload "$LOOP" "$ROOT/mnt"
mount --bind /dev "$ROOT/dev"
mount -t proc proc "$ROOT/proc"
ln "$DISK" "$ROOT/run/vmbatch-build/disk.raw"
printf '(hd0) /run/vmbatch-build/disk.raw\n(hd1) %s\n' "$LOOP" >"$ROOT/run/vmbatch-build/device.map"
in_root grub-bios-setup -d /mnt/boot/grub/i386-pc -m /run/vmbatch-build/device.map \
    /run/vmbatch-build/disk.raw >&2
umount "$ROOT/proc" "$ROOT/dev" "$ROOT/mnt"
losetup -d "$LOOP"
LOOP=""
rm -rf "$ROOT/run/vmbatch-build"
[[ $(dd if="$DISK" bs=1 skip=510 count=2 status=none | od -An -tx1 | tr -d ' ') == 55aa ]] ||
    die "no boot signature in the MBR"
dd if="$DISK" bs=512 count=1 status=none | grep -aq GRUB || die "no GRUB boot sector in the MBR"

qemu-img convert -f raw -O qcow2 "$DISK" "$OUT/disk.qcow2"
rm -f "$DISK"
log "disk image done in ${SECONDS}s"

cat >"$OUT/build-info" <<EOF
key=$KEY
suite=$SUITE
arch=$ARCH
mirror=$MIRROR
kernel=$KVER
partitions=gpt: 1 bios_grub $BIOS_START+$BIOS_SECTORS, 2 ext4 root $ROOT_START+$ROOT_SECTORS uuid $FS_UUID
bootloader=grub-pc (boot.img in the MBR, core.img in partition 1)
built=$(date -u +%Y-%m-%dT%H:%M:%SZ)
EOF
chmod 0644 "$OUT"/*
chmod 0755 "$OUT"
is_complete "$OUT" || die "incomplete output in $OUT"

[[ -e $FINAL ]] && rm -rf --one-file-system "$FINAL"
mv -T "$OUT" "$FINAL"
log "built $FINAL"
finish
