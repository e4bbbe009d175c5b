#!/bin/bash
# build-image.sh OUTDIR — build the real-guest test image for vhost-target.
#
# Produces OUTDIR/vmlinux (Debian's kernel, uncompressed so QEMU boots it
# through the PVH entry without a decompression pass), OUTDIR/initramfs.cpio.gz
# (busybox-static userland, the virtio-scsi module chain, a static fio,
# sg3_utils and a few util-linux tools) and OUTDIR/stamp (sha256 of this
# script). Re-running with an unchanged script and a present QEMU is a no-op.
#
# Runs as root on Debian 12: host packages come from apt, the guest kernel and
# tools from Debian .debs extracted with dpkg-deb (never installed on the
# host), fio from Debian's source package. Nothing else is downloaded.
set -euo pipefail

OUT=${1:?usage: build-image.sh OUTDIR}
SELF=$(readlink -f "$0")
HASH=$(sha256sum "$SELF" | cut -d' ' -f1)
mkdir -p "$OUT"
OUT=$(readlink -f "$OUT")

log() { echo "[build-image $(date +%T)] $*" >&2; }

if [[ -f $OUT/stamp && $(cat "$OUT/stamp") == "$HASH" && -f $OUT/vmlinux && -f $OUT/initramfs.cpio.gz ]] &&
	command -v qemu-system-x86_64 >/dev/null; then
	log "cached image in $OUT is current"
	exit 0
fi
if [[ $(id -u) != 0 ]]; then
	echo "build-image.sh: must run as root (apt-get); or point VHOST_TARGET_GUEST_CACHE at a built image" >&2
	exit 1
fi
export DEBIAN_FRONTEND=noninteractive
START=$(date +%s)

# ---------------------------------------------------------------- host packages
APT_UPDATED=0
apt_update() {
	if [[ $APT_UPDATED == 0 ]]; then
		log "apt-get update"
		apt-get update -qq
		APT_UPDATED=1
	fi
}
# apt_retry CMD...: run an apt command; on failure refresh the lists once and retry.
apt_retry() {
	if ! "$@"; then
		apt_update
		"$@"
	fi
}
HOST_PKGS=(qemu-system-x86 cpio busybox-static gcc make libc6-dev libaio-dev liburing-dev zlib1g-dev
	dpkg-dev binutils xz-utils zstd kmod)
missing=()
for p in "${HOST_PKGS[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
	log "installing host packages: ${missing[*]}"
	apt_retry apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# deb-src for fio's source package, same mirror as the binary lines.
SRC_LIST=/etc/apt/sources.list.d/vhost-target-guest-src.sources
if ! apt-get source --print-uris -qq fio >/dev/null 2>&1; then
	# Reuse the mirror and keyring of the existing bookworm entry: apt rejects
	# two entries for one URI and suite with different Signed-By values.
	mirror= keyring=
	if ls /etc/apt/sources.list.d/*.sources >/dev/null 2>&1; then
		read -r mirror keyring < <(awk '
			/^URIs:/ { u = $2 } /^Signed-By:/ { k = $2 } /^Suites:/ { s = $0 }
			/^$/ { if (u ~ /\/debian\/?$/ && s ~ /bookworm( |$)/) { print u, k; exit } u = k = s = "" }
			END { if (u ~ /\/debian\/?$/ && s ~ /bookworm( |$)/) print u, k }' /etc/apt/sources.list.d/*.sources | head -1) || true
	fi
	if [[ -z $mirror ]]; then
		line=$(grep -hE '^deb .*/debian/? bookworm ' /etc/apt/sources.list 2>/dev/null | head -1 || true)
		mirror=$(sed -E 's/^deb (\[[^]]*\] )?//' <<<"$line" | awk '{print $1}')
		keyring=$(grep -oE 'signed-by=[^] ]+' <<<"$line" | cut -d= -f2 || true)
	fi
	[[ -n $mirror ]] || mirror=http://deb.debian.org/debian
	log "adding deb-src bookworm from $mirror"
	{
		echo "Types: deb-src"
		echo "URIs: $mirror"
		echo "Suites: bookworm"
		echo "Components: main"
		[[ -z $keyring ]] || echo "Signed-By: $keyring"
	} >"$SRC_LIST"
	APT_UPDATED=0
	apt_update
fi

WORK=$(mktemp -d /tmp/vhost-target-guest.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
chmod 755 "$WORK" # lets apt's _apt user write downloads here
cd "$WORK"
ROOT=$WORK/root
mkdir -p "$ROOT"/{bin,sbin,usr/bin,usr/sbin,usr/local/bin,proc,sys,dev,tmp,run,etc,lib64,lib/x86_64-linux-gnu}

# ---------------------------------------------------------------- kernel
KPKG=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
[[ -n $KPKG ]] || { apt_update; KPKG=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}'); }
[[ -n $KPKG ]] || { echo "cannot resolve the package behind linux-image-amd64" >&2; exit 1; }
log "kernel package $KPKG"
mkdir -p dl
(cd dl && apt_retry apt-get download -qq "$KPKG" sg3-utils 'libsgutils2-1.46-2' util-linux 2>&1 | grep -v unsandboxed || true)
for f in dl/*.deb; do [[ -f $f ]] || { echo "apt-get download failed" >&2; exit 1; }; done
mkdir -p kpkg
dpkg-deb -x dl/"$KPKG"_*.deb kpkg
KVER=$(ls kpkg/lib/modules | head -1)
log "kernel $KVER"

# extract_vmlinux IMG OUT: find the compressed payload inside bzImage and
# decompress it (the approach of the kernel's scripts/extract-vmlinux).
extract_vmlinux() {
	local img=$1 out=$2 magic pat dec pos
	for spec in '\037\213\010:xy:gunzip' '\3757zXZ\000:abcde:unxz' '\002!L\030:xxx:unlz4' \
		'(\265/\375:xxx:unzstd' 'BZh:xy:bunzip2' '\135\0\0\0:xxx:unlzma'; do
		IFS=: read -r magic pat dec <<<"$spec"
		command -v "$dec" >/dev/null || continue
		for pos in $(tr "$magic\n$pat" "\n$pat=" <"$img" | grep -abo "^$pat" | cut -d: -f1); do
			tail -c+"$pos" "$img" | $dec >"$out" 2>/dev/null || true
			if readelf -h "$out" >/dev/null 2>&1; then return 0; fi
		done
	done
	return 1
}
extract_vmlinux kpkg/boot/vmlinuz-"$KVER" vmlinux || { echo "could not extract vmlinux" >&2; exit 1; }
strip --strip-debug -o vmlinux.s vmlinux 2>/dev/null && mv vmlinux.s vmlinux || true

# Modules: the virtio-scsi / sd / sg chain and virtio_blk, dependencies first
# (modules.dep), virtio_scsi last so sd and sg bind during its synchronous scan.
MODDIR=kpkg/lib/modules/$KVER
# The package ships no modules.dep (its postinst runs depmod): generate it.
depmod -b "$WORK/kpkg" "$KVER"
WANT="scsi_common scsi_mod crct10dif_common crct10dif_generic crct10dif_pclmul crc_t10dif crc64_rocksoft_generic crc64_rocksoft t10_pi sd_mod sg virtio virtio_ring virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk virtio_scsi"
awk -v want="$WANT" -v builtin="$MODDIR/modules.builtin" '
function base(p,   b) { b = p; sub(/.*\//, "", b); sub(/\.ko(\.xz|\.zst|\.gz)?$/, "", b); gsub(/-/, "_", b); return b }
function visit(m,   n, i, d) {
	if (m in seen) return
	seen[m] = 1
	if (!(m in path)) { if (!(m in isbuiltin)) print "missing " m > "/dev/stderr"; return }
	n = split(deps[m], d, " ")
	for (i = n; i >= 1; i--) visit(base(d[i]))
	print path[m]
}
BEGIN { while ((getline l < builtin) > 0) isbuiltin[base(l)] = 1 }
{ p = $1; sub(/:$/, "", p); m = base(p); path[m] = p; $1 = ""; deps[m] = $0 }
END { n = split(want, w, " "); for (i = 1; i <= n; i++) visit(w[i]) }
' "$MODDIR/modules.dep" >modules.order
mkdir -p "$ROOT/lib/modules"
: >"$ROOT/etc/modules.load"
while read -r p; do
	b=$(basename "$p")
	case $b in
	*.ko.xz) xz -dc "$MODDIR/$p" >"$ROOT/lib/modules/${b%.xz}"; b=${b%.xz} ;;
	*.ko.zst) zstd -qdc "$MODDIR/$p" >"$ROOT/lib/modules/${b%.zst}"; b=${b%.zst} ;;
	*.ko.gz) gzip -dc "$MODDIR/$p" >"$ROOT/lib/modules/${b%.gz}"; b=${b%.gz} ;;
	*) cp "$MODDIR/$p" "$ROOT/lib/modules/$b" ;;
	esac
	echo "$b" >>"$ROOT/etc/modules.load"
done <modules.order
for m in sd_mod virtio_scsi virtio_blk virtio_pci; do
	grep -q "^$m.ko" "$ROOT/etc/modules.load" || grep -q "/$m.ko" "$MODDIR/modules.builtin" ||
		{ echo "module $m neither found nor built in" >&2; exit 1; }
done
log "modules: $(tr '\n' ' ' <"$ROOT/etc/modules.load")"

# ---------------------------------------------------------------- busybox
cp /bin/busybox "$ROOT/bin/busybox"
for a in $("$ROOT/bin/busybox" --list-full); do
	[[ -e $ROOT/$a ]] || ln -s /bin/busybox "$ROOT/$a"
done

# ---------------------------------------------------------------- sg3_utils, util-linux
mkdir -p x
for f in dl/sg3-utils_*.deb dl/libsgutils2-*.deb dl/util-linux_*.deb; do dpkg-deb -x "$f" x; done
TOOLS=()
for t in sg_inq sg_vpd sg_readcap sg_luns sg_turs sg_unmap sg_sync sg_write_same sg_opcodes sg_raw sg_persist \
	sg_reset sg_modes sg_get_lba_status sg_requests sg_rtpg sg_senddiag sg_start sg_verify sg_dd; do
	TOOLS+=("x/usr/bin/$t")
done
TOOLS+=(x/bin/lsblk x/sbin/blkdiscard x/sbin/blockdev)
for t in "${TOOLS[@]}"; do
	[[ -f $t ]] || { echo "tool $t not found in the .debs" >&2; exit 1; }
	install -m 755 "$t" "$ROOT/usr/local/bin/"
done
# Shared libraries (and the dynamic loader) the tools need, resolved with ldd
# against the extracted packages first, then the host's identical Debian libs.
export LD_LIBRARY_PATH=$WORK/x/usr/lib/x86_64-linux-gnu:$WORK/x/lib/x86_64-linux-gnu
libs=$(for t in "${TOOLS[@]}"; do ldd "$t"; done | awk '/=>/ && $3 ~ /^\// {print $3} /^\t\/.*ld-linux/ {print $1}' | sort -u)
unset LD_LIBRARY_PATH
for l in $libs; do
	if [[ $l == */ld-linux* ]]; then
		cp -L "$l" "$ROOT/lib64/$(basename "$l")"
	else
		cp -L "$l" "$ROOT/lib/x86_64-linux-gnu/$(basename "$l")"
	fi
done
strip --strip-unneeded "$ROOT"/usr/local/bin/* "$ROOT"/lib/x86_64-linux-gnu/* 2>/dev/null || true

# ---------------------------------------------------------------- static fio
log "building static fio from Debian's source package"
mkdir -p fiosrc
(cd fiosrc && apt_retry apt-get source -qq fio >/dev/null 2>&1) || { apt_update; (cd fiosrc && apt-get source -qq fio >/dev/null); }
FIODIR=$(find fiosrc -maxdepth 1 -mindepth 1 -type d -name 'fio-*' | head -1)
[[ -n $FIODIR ]] || { echo "apt-get source fio produced no tree" >&2; exit 1; }
(
	cd "$FIODIR"
	disable=()
	for o in numa rdma rados rbd http gfapi libnfs pmem xnvme libiscsi nbd dfs tcmalloc libblkio native shm \
		gfio libzbc dynamic-engines; do
		if ./configure --help 2>&1 | grep -q -- "--disable-$o"; then disable+=("--disable-$o"); fi
	done
	./configure --build-static "${disable[@]}" >configure.log 2>&1 || { cat configure.log >&2; exit 1; }
	grep -Eq '^Linux AIO support +yes' configure.log || { cat configure.log >&2; echo "fio configure: no libaio" >&2; exit 1; }
	make -s -j"$(nproc)" fio >make.log 2>&1 || { tail -50 make.log >&2; exit 1; }
	strip fio
)
install -m 755 "$FIODIR/fio" "$ROOT/usr/local/bin/fio"
engines=$("$ROOT/usr/local/bin/fio" --enghelp)
for e in libaio io_uring psync sg; do
	grep -qw "$e" <<<"$engines" || { echo "static fio lacks the $e engine" >&2; exit 1; }
done

# ---------------------------------------------------------------- /init
cat >"$ROOT/init" <<'EOF'
#!/bin/sh
# vhost-target test guest init: mount, load the virtio-scsi chain, run
# /test.sh (appended per run), report its status on the console, power off.
export PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin HOME=/root TERM=dumb
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm /root
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
token=none
boots=1
for a in $(cat /proc/cmdline); do
	case $a in
	vt_token=*) token=${a#vt_token=} ;;
	vt_boots=*) boots=${a#vt_boots=} ;;
	esac
done
echo 0 >/proc/sys/kernel/printk_ratelimit 2>/dev/null
while read -r m; do
	insmod /lib/modules/$m || echo "GUEST-WARN insmod $m failed"
done </etc/modules.load
# sd binds asynchronously; give disks found by the scan a moment to appear.
i=0
while [ $i -lt 50 ]; do
	pending=0
	for d in /sys/bus/scsi/devices/*:*:*:*; do
		[ -e "$d/type" ] || continue
		[ "$(cat $d/type)" = 0 ] && [ ! -d "$d/block" ] && pending=1
	done
	[ $pending = 0 ] && break
	sleep 0.1
	i=$((i + 1))
done
BOOT=1
if [ "$boots" -gt 1 ]; then
	# The host counts boots of this QEMU and answers on the serial line.
	echo "GUEST-BOOT? $token"
	read -r BOOT </dev/console || BOOT=1
	case $BOOT in *[!0-9]* | '') BOOT=1 ;; esac
fi
export BOOT GUEST_TOKEN=$token
echo "GUEST-START $token boot=$BOOT"
if [ -f /test.sh ]; then
	/bin/sh /test.sh </dev/null
	rc=$?
else
	echo "no /test.sh in the initramfs"
	rc=127
fi
sync
echo "GUEST-RESULT $token $rc"
poweroff -f
sleep 5
EOF
chmod 755 "$ROOT/init"
echo "root:x:0:0:root:/root:/bin/sh" >"$ROOT/etc/passwd"
echo "root:x:0:" >"$ROOT/etc/group"

log "packing initramfs"
(cd "$ROOT" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet --owner=0:0 --reproducible) |
	gzip -6 -n >"$WORK/initramfs.cpio.gz"

install -m 644 vmlinux "$OUT/vmlinux.new"
install -m 644 initramfs.cpio.gz "$OUT/initramfs.cpio.gz.new"
mv "$OUT/vmlinux.new" "$OUT/vmlinux"
mv "$OUT/initramfs.cpio.gz.new" "$OUT/initramfs.cpio.gz"
echo "$KVER" >"$OUT/kernel-version"
echo "$HASH" >"$OUT/stamp"
log "done in $(($(date +%s) - START)) s: vmlinux $(du -h "$OUT/vmlinux" | cut -f1), initramfs $(du -h "$OUT/initramfs.cpio.gz" | cut -f1)"
