#!/bin/bash
# Build the vmbatch "tiny" test/demo guest from Debian packages only.
#
# Usage: guests/tiny/build.sh [CACHE_ROOT]        (default /var/cache/vmbatch/guests)
#
# Output contract:
# - key = first 16 hex chars of sha256 over: the bytes of guests/tiny/build.sh, the bytes of
#   guests/tiny/init, then the lines
#       kernel=<package> <version>
#       busybox-static=<version>
#       dropbear-bin=<version>
#       qemu-guest-agent=<version>
#   (exact Debian versions; the kernel package and version are what the apt candidate of
#   linux-image-cloud-amd64 depends on; busybox-static and dropbear-bin are the installed
#   packages whose binaries are copied; qemu-guest-agent is the apt candidate, downloaded).
# - If $CACHE_ROOT/tiny-<key>/ exists and is complete nothing is built; the symlink
#   $CACHE_ROOT/tiny is (re)pointed at it only if it points elsewhere.
# - Otherwise the guest is built in a temp dir inside CACHE_ROOT, renamed atomically to
#   $CACHE_ROOT/tiny-<key>/ and $CACHE_ROOT/tiny is switched to it atomically
#   (ln -sfn to a temp name + mv -T). Older tiny-* directories are left alone (jobs may use
#   them).
# - stdout: only the final directory path, as the last line. Progress goes to stderr.
# - Directory (0755, files 0644):
#     vmlinux         uncompressed ELF kernel with the PVH entry note (direct boot: -kernel)
#     initrd.cpio     uncompressed newc initramfs: busybox, dropbear, qemu-ga, modules, /init
#     disk.qcow2      blank 64 MiB qcow2, base for per-job overlays (guest's /dev/vda)
#     cmdline         one line, the recommended kernel command line
#     kernel-version  uname -r of the kernel
#     manifest.txt    key, package versions, modules, sha256 of the artefacts
#
# Needs: apt-get/apt-cache (the Debian archive reachable, `apt-get update` done), dpkg-deb,
# busybox-static and dropbear-bin installed, cpio, qemu-img, readelf and objcopy (binutils),
# modinfo and depmod (kmod), and the decompressor for the kernel's compression (lz4 for
# Debian 12's cloud kernel; xz, zstd, gzip, bzip2, lzma also handled). The kernel package is
# only downloaded and unpacked in the temp dir, never installed.
set -euo pipefail
umask 022
export LC_ALL=C

# Progress and tool chatter go to stderr; fd 3 keeps the real stdout for the final path.
exec 3>&1 1>&2

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE_ROOT=${1:-/var/cache/vmbatch/guests}
KERNEL_META=linux-image-cloud-amd64
# Kernel command line. The speed options (see docs/platform.md) skip the crypto
# self-tests and three slow initcalls; quiet keeps serial output (slow under TCG) short.
CMDLINE="console=ttyS0 quiet cryptomgr.notests"
CMDLINE+=" initcall_blacklist=init_kprobe_trace,crypto_kdf108_init,load_system_certificate_list"
# Modules for a q35/pc guest with virtio devices (dependencies are added automatically,
# built-in ones dropped). The cdrom set is loaded only when no seed is on a virtio disk: on
# q35 a cdrom must sit on virtio-scsi (the cloud kernel has no AHCI), on pc on IDE (ata_piix).
BOOT_MODULES="virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci
    failover net_failover virtio_net virtio_blk virtio_rng virtio_console cdrom isofs"
CDROM_MODULES="virtio_scsi ata_piix sr_mod"
DISK_SIZE=64M

log() { printf 'tiny-build: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

for tool in apt-cache apt-get dpkg-deb dpkg-query sha256sum cpio qemu-img readelf objcopy \
        modinfo depmod ldd find sort; do
    command -v "$tool" >/dev/null || die "missing tool: $tool"
done
[ -f "$HERE/init" ] || die "missing $HERE/init"

pkg_installed_version() {
    local status
    status=$(dpkg-query -W -f='${db:Status-Abbrev}' "$1" 2>/dev/null) || true
    [[ $status == ii* ]] || die "package $1 is not installed (apt-get install $1)"
    dpkg-query -W -f='${Version}' "$1"
}

# --- versions and key -----------------------------------------------------------------------
# The metapackage's candidate depends on "linux-image-<abi>-cloud-amd64 (= <version>)": one
# apt-cache call gives both (apt-cache policy is the fallback if the version is not pinned).
read -r KPKG KVERSION < <(apt-cache show --no-all-versions "$KERNEL_META" 2>/dev/null |
    sed -n 's/^Depends: \(linux-image-[^ ,]*\)\( (= \([^)]*\))\)\{0,1\}.*/\1 \3/p' |
    head -n1) || true
[ -n "${KPKG:-}" ] || die "cannot resolve $KERNEL_META with apt-cache (run apt-get update)"
if [ -z "${KVERSION:-}" ]; then
    KVERSION=$(apt-cache policy "$KPKG" | awk '$1 == "Candidate:" { print $2; exit }')
fi
[ -n "$KVERSION" ] && [ "$KVERSION" != "(none)" ] ||
    die "no candidate version for $KPKG (run apt-get update)"
BB_VERSION=$(pkg_installed_version busybox-static)
DB_VERSION=$(pkg_installed_version dropbear-bin)
# The QEMU guest agent: the host sets the guest's clock through it after a pause
# (virDomainSetTime; docs/admin-guide.md, "Suspend and resume"). Downloaded and unpacked
# like the kernel, never installed on the host (its libraries are the host's).
QGA_VERSION=$(apt-cache policy qemu-guest-agent | awk '$1 == "Candidate:" && !v { v = $2 } END { print v }')
[ -n "$QGA_VERSION" ] && [ "$QGA_VERSION" != "(none)" ] ||
    die "no candidate version for qemu-guest-agent (run apt-get update)"

KEY=$({
    cat "$HERE/build.sh" "$HERE/init"
    printf 'kernel=%s %s\nbusybox-static=%s\ndropbear-bin=%s\nqemu-guest-agent=%s\n' \
        "$KPKG" "$KVERSION" "$BB_VERSION" "$DB_VERSION" "$QGA_VERSION"
} | sha256sum | cut -c1-16)
FINAL="$CACHE_ROOT/tiny-$KEY"
LINK="$CACHE_ROOT/tiny"
ARTEFACTS="vmlinux initrd.cpio disk.qcow2 cmdline kernel-version manifest.txt"

is_complete() {
    local f
    [ -d "$1" ] || return 1
    for f in $ARTEFACTS; do [ -s "$1/$f" ] || return 1; done
}

point_link() {
    [ "$(readlink "$LINK" 2>/dev/null || true)" = "tiny-$KEY" ] && return 0
    ln -sfn "tiny-$KEY" "$LINK.tmp.$$"
    mv -T "$LINK.tmp.$$" "$LINK"
    log "$LINK -> tiny-$KEY"
}

mkdir -p "$CACHE_ROOT"
if is_complete "$FINAL"; then
    log "up to date: $FINAL ($KPKG $KVERSION, busybox-static $BB_VERSION, dropbear-bin $DB_VERSION)"
    point_link
    echo "$FINAL" >&3
    exit 0
fi

TMP=$(mktemp -d "$CACHE_ROOT/.tiny-build.XXXXXX")
cleanup() { rm -rf "$TMP"; rm -f "$LINK.tmp.$$"; }
trap cleanup EXIT
trap 'exit 130' INT TERM HUP
OUT="$TMP/out"
ROOT="$TMP/root"
mkdir -p "$OUT" "$ROOT" "$TMP/dl" "$TMP/kpkg"
log "building tiny-$KEY in $TMP"

# --- kernel ---------------------------------------------------------------------------------
log "downloading $KPKG=$KVERSION"
(cd "$TMP/dl" && apt-get -q -o APT::Sandbox::User=root download "$KPKG=$KVERSION") ||
    die "apt-get download $KPKG=$KVERSION failed"
dpkg-deb -x "$TMP"/dl/*.deb "$TMP/kpkg"
VMLINUZ=$(find "$TMP/kpkg/boot" -maxdepth 1 -name 'vmlinuz-*' | head -n1)
[ -n "$VMLINUZ" ] || die "no /boot/vmlinuz-* in $KPKG"
KREL=${VMLINUZ##*/vmlinuz-}
KCONFIG="$TMP/kpkg/boot/config-$KREL"
MODSRC=
for d in "$TMP/kpkg/lib/modules/$KREL" "$TMP/kpkg/usr/lib/modules/$KREL"; do
    if [ -d "$d" ]; then MODSRC=$d; break; fi
done
[ -n "$MODSRC" ] || die "no modules directory for $KREL in $KPKG"

# ELF with the Xen PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY = 18): what QEMU's -kernel needs
# to boot an uncompressed vmlinux directly.
has_pvh_note() {
    readelf -h "$1" >/dev/null 2>&1 || return 1
    readelf -Wn "$1" 2>/dev/null |
        grep -Eq '^[[:space:]]*Xen[[:space:]]+0x[0-9a-f]+[[:space:]].*(\(0x00000012\)|PHYS32)'
}

# Same idea as the kernel's scripts/extract-vmlinux: find the compressed payload by its magic
# and decompress from there (decompressors complain about the trailing data; the result is
# judged by readelf, not by their exit status). The format named in the kernel config is tried
# first, then the others.
extract_vmlinux() {
    local in=$1 out=$2 fmt f magic cmd off order=""
    declare -A MAGIC=(
        [LZ4]='\x02\x21\x4c\x18' [XZ]='\xfd\x37\x7a\x58\x5a\x00' [ZSTD]='\x28\xb5\x2f\xfd'
        [GZIP]='\x1f\x8b\x08' [BZIP2]='BZh' [LZMA]='\x5d\x00\x00\x00'
    )
    declare -A DECOMP=(
        [LZ4]='lz4 -dc' [XZ]='xz -dc' [ZSTD]='zstd -dcq' [GZIP]='gzip -dc'
        [BZIP2]='bzip2 -dc' [LZMA]='xz -dc --format=lzma'
    )
    if has_pvh_note "$in"; then cp "$in" "$out"; return 0; fi
    fmt=$(sed -n 's/^CONFIG_KERNEL_\([A-Z0-9]*\)=y$/\1/p' "$KCONFIG" 2>/dev/null | head -n1)
    [ -n "$fmt" ] && [ -n "${MAGIC[$fmt]:-}" ] && order=$fmt
    for f in LZ4 XZ ZSTD GZIP BZIP2 LZMA; do [ "$f" = "$fmt" ] || order="$order $f"; done
    for fmt in $order; do
        magic=${MAGIC[$fmt]}
        cmd=${DECOMP[$fmt]}
        command -v "${cmd%% *}" >/dev/null || { log "skipping $fmt: no ${cmd%% *}"; continue; }
        for off in $(grep -obUaP "$magic" "$in" | cut -d: -f1 | head -n 20); do
            tail -c "+$((off + 1))" "$in" | $cmd >"$out" 2>/dev/null || true
            if has_pvh_note "$out"; then
                log "vmlinux: $fmt payload at offset $off"
                return 0
            fi
        done
    done
    rm -f "$out"
    return 1
}
log "extracting vmlinux from ${VMLINUZ##*/}"
extract_vmlinux "$VMLINUZ" "$OUT/vmlinux" ||
    die "could not extract an ELF vmlinux with a PVH note from $VMLINUZ"

# --- initramfs tree -------------------------------------------------------------------------
log "assembling initramfs"
mkdir -p "$ROOT"/{bin,sbin,etc/tiny,etc/dropbear,dev,proc,sys,run,tmp,mnt/seed,root,var/log,usr}
mkdir -p "$ROOT/lib/modules/$KREL"
chmod 1777 "$ROOT/tmp"
chmod 0700 "$ROOT/root" "$ROOT/etc/dropbear"
ln -s ../run "$ROOT/var/run"
# merged-/usr style: every applet lives in /bin or /sbin, /usr/{bin,sbin} point there.
ln -s ../bin "$ROOT/usr/bin"
ln -s ../sbin "$ROOT/usr/sbin"

install -m 0755 /bin/busybox "$ROOT/bin/busybox"
/bin/busybox --list-full | while read -r applet; do
    case $applet in
    bin/busybox | linuxrc | */init.d/*) continue ;;
    esac
    dest=${applet#usr/}
    case $dest in
    bin/*) ln -sfn busybox "$ROOT/$dest" ;;
    sbin/*) ln -sfn ../bin/busybox "$ROOT/$dest" ;;
    esac
done
[ -L "$ROOT/sbin/init" ] && [ -L "$ROOT/bin/sh" ] || die "busybox lacks init or sh applets"

install -m 0755 /usr/sbin/dropbear "$ROOT/sbin/dropbear"
install -m 0755 "$(readlink -f /usr/bin/dropbearconvert)" "$ROOT/bin/dropbearconvert"
install -m 0755 "$(readlink -f /usr/bin/dropbearkey)" "$ROOT/bin/dropbearkey"
log "downloading qemu-guest-agent=$QGA_VERSION"
mkdir -p "$TMP/qga"
(cd "$TMP/dl" && apt-get -q -o APT::Sandbox::User=root download "qemu-guest-agent=$QGA_VERSION") ||
    die "apt-get download qemu-guest-agent=$QGA_VERSION failed"
dpkg-deb -x "$TMP"/dl/qemu-guest-agent_*.deb "$TMP/qga"
install -m 0755 "$TMP/qga/usr/sbin/qemu-ga" "$ROOT/sbin/qemu-ga"
# Shared libraries and the loader, at the paths ldd reports.
LIBS=$(for b in /usr/sbin/dropbear /usr/bin/dropbearconvert /usr/bin/dropbearkey \
    "$TMP/qga/usr/sbin/qemu-ga"; do
    ldd "$b" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }'
done | sort -u)
for lib in $LIBS; do
    mkdir -p "$ROOT$(dirname "$lib")"
    cp -L "$lib" "$ROOT$lib"
    chmod 0755 "$ROOT$lib"
done

install -m 0755 "$HERE/init" "$ROOT/init"

cat >"$ROOT/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
EOF
cat >"$ROOT/etc/group" <<'EOF'
root:x:0:
tty:x:5:
nogroup:x:65534:
EOF
cat >"$ROOT/etc/shadow" <<'EOF'
root:*:19000:0:99999:7:::
nobody:*:19000:0:99999:7:::
EOF
chmod 0640 "$ROOT/etc/shadow"
printf '/bin/sh\n/bin/ash\n' >"$ROOT/etc/shells"
printf 'passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n' >"$ROOT/etc/nsswitch.conf"
echo 'export PS1='"'"'\u@\h:\w\$ '"'" >"$ROOT/etc/profile"

# Modules: resolve dependencies with modinfo, drop built-ins, emit in load order.
declare -A KO=() BUILTIN=() SEEN=()
while read -r f; do
    n=${f##*/}
    n=${n%%.ko*}
    KO[${n//-/_}]=$f
done < <(find "$MODSRC/kernel" -name '*.ko*')
while read -r b; do
    n=${b##*/}
    n=${n%.ko}
    BUILTIN[${n//-/_}]=1
done <"$MODSRC/modules.builtin"
ORDER=()
visit() {
    local m=${1//-/_} dep
    [ -n "${SEEN[$m]:-}" ] && return 0
    SEEN[$m]=1
    [ -n "${BUILTIN[$m]:-}" ] && return 0
    [ -n "${KO[$m]:-}" ] || die "module $m not found in $KPKG"
    for dep in $(modinfo -F depends "${KO[$m]}" | tr ',' ' '); do visit "$dep"; done
    ORDER+=("$m")
}
for m in $BOOT_MODULES; do visit "$m"; done
BOOT_ORDER=("${ORDER[@]}")
ORDER=()
for m in $CDROM_MODULES; do visit "$m"; done
CDROM_ORDER=("${ORDER[@]}")
printf '%s\n' "${BOOT_ORDER[@]}" >"$ROOT/etc/tiny/modules.boot"
printf '%s\n' "${CDROM_ORDER[@]}" >"$ROOT/etc/tiny/modules.cdrom"
for m in "${BOOT_ORDER[@]}" "${CDROM_ORDER[@]}"; do
    src=${KO[$m]}
    dst="$ROOT/lib/modules/$KREL/$m.ko"
    # busybox insmod wants plain .ko files.
    case $src in
    *.ko) cp "$src" "$dst.orig" ;;
    *.ko.xz) xz -dc "$src" >"$dst.orig" ;;
    *.ko.zst) zstd -dcq "$src" >"$dst.orig" ;;
    *.ko.gz) gzip -dc "$src" >"$dst.orig" ;;
    *) die "unknown module compression: $src" ;;
    esac
    # Drop the module's BTF (only used by BPF tooling): parsing it at insmod costs ~30-40 % of
    # the load time under TCG. This also drops the appended signature, which the guest cannot
    # check anyway (its certificate list is not loaded, see CMDLINE) and does not enforce.
    objcopy --remove-section=.BTF "$dst.orig" "$dst"
    rm -f "$dst.orig"
done
for f in modules.builtin modules.builtin.modinfo modules.order; do
    if [ -f "$MODSRC/$f" ]; then cp "$MODSRC/$f" "$ROOT/lib/modules/$KREL/"; fi
done
# modules.dep so that modprobe works inside the guest too (debugging).
depmod -b "$ROOT" "$KREL"
log "modules: ${BOOT_ORDER[*]} (cdrom fallback: ${CDROM_ORDER[*]})"

if [ "$(id -u)" = 0 ]; then
    # The kernel opens /dev/console before /init runs; without the node early messages of
    # /init are lost (the init reopens it after mounting devtmpfs anyway).
    mknod -m 0600 "$ROOT/dev/console" c 5 1
else
    log "warning: not root, initramfs has no /dev/console node"
fi

find "$ROOT" -exec touch -h -d @0 {} +
(cd "$ROOT" && find . -mindepth 1 | sort | cpio --quiet -o -H newc -R 0:0 --reproducible) \
    >"$OUT/initrd.cpio"

# --- the rest -------------------------------------------------------------------------------
qemu-img create -q -f qcow2 "$OUT/disk.qcow2" "$DISK_SIZE"
echo "$CMDLINE" >"$OUT/cmdline"
echo "$KREL" >"$OUT/kernel-version"

pkg_of() { dpkg-query -S "$1" 2>/dev/null | head -n1 | cut -d: -f1; }
{
    echo "# vmbatch tiny guest, built $(date -u +%Y-%m-%dT%H:%M:%SZ) by guests/tiny/build.sh"
    echo "key: $KEY"
    echo "kernel-release: $KREL"
    echo "package: $KPKG $KVERSION"
    echo "package: busybox-static $BB_VERSION"
    echo "package: dropbear-bin $DB_VERSION"
    echo "package: qemu-guest-agent $QGA_VERSION"
    for lib in $LIBS; do
        p=$(pkg_of "$lib" || true)
        [ -n "$p" ] || p=$(pkg_of "$(readlink -f "$lib")" || true)
        [ -n "$p" ] && echo "package: $p $(dpkg-query -W -f='${Version}' "$p") ($lib)"
    done
    echo "modules: ${BOOT_ORDER[*]}"
    echo "modules-cdrom: ${CDROM_ORDER[*]}"
    echo "cmdline: $CMDLINE"
    (cd "$OUT" && sha256sum vmlinux initrd.cpio disk.qcow2 cmdline kernel-version) |
        sed 's/^/sha256: /'
} >"$OUT/manifest.txt"

chmod 0644 "$OUT"/*
chmod 0755 "$OUT"
is_complete "$OUT" || die "internal error: incomplete output"

# --- publish ----------------------------------------------------------------------------------
if [ -e "$FINAL" ] && ! is_complete "$FINAL"; then
    log "replacing incomplete $FINAL"
    mv -T "$FINAL" "$TMP/old"
fi
if ! mv -T "$OUT" "$FINAL" 2>/dev/null; then
    # A concurrent build of the same key won the race: use its result.
    is_complete "$FINAL" || die "cannot rename $OUT to $FINAL"
    log "$FINAL was built concurrently; keeping it"
fi
point_link
log "done: $FINAL"
echo "$FINAL" >&3
