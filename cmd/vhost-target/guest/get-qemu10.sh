#!/bin/bash
# get-qemu10.sh OUTDIR — fetch Debian's QEMU 10 (bookworm-backports) beside the
# system's QEMU 7.2, for the guest tests of vhost-user-scsi reconnect.
#
# Nothing is installed: qemu-system-x86, qemu-system-common, qemu-system-data
# and seabios (bookworm's 1.16.2 is older than QEMU 10 wants) are taken from
# bookworm-backports with `apt-get download` and unpacked with dpkg-deb into
# OUTDIR/root. apt runs on a private sources list, list directory and cache
# under OUTDIR/apt, so the system's apt configuration and package state are
# untouched. Run the result as
#   OUTDIR/root/usr/bin/qemu-system-x86_64 -L OUTDIR/root/usr/share/qemu -L OUTDIR/root/usr/share/seabios
# (the -L directories are searched before the built-in /usr/share/qemu, so
# the firmware comes from the matching packages) with
# QEMU_MODULE_DIR=OUTDIR/root/usr/lib/x86_64-linux-gnu/qemu.
#
# The shared libraries are bookworm's: the ones QEMU 7.2 pulled in. Any that
# are missing (a machine without 7.2) are installed with apt-get from bookworm
# (needs root). OUTDIR/stamp holds the sha256 of this script and
# OUTDIR/version the package version; re-running with an unchanged script and
# a working binary downloads nothing.
set -euo pipefail

OUT=${1:?usage: get-qemu10.sh OUTDIR}
SELF=$(readlink -f "$0")
HASH=$(sha256sum "$SELF" | cut -d' ' -f1)
mkdir -p "$OUT"
OUT=$(readlink -f "$OUT")
BIN=$OUT/root/usr/bin/qemu-system-x86_64

log() { echo "[get-qemu10 $(date +%T)] $*" >&2; }

works() {
	[[ -x $BIN ]] && QEMU_MODULE_DIR=$OUT/root/usr/lib/x86_64-linux-gnu/qemu "$BIN" -version 2>/dev/null | grep -q '^QEMU emulator version 10\.'
}
if [[ -f $OUT/stamp && $(cat "$OUT/stamp") == "$HASH" ]] && works; then
	log "cached QEMU $(cat "$OUT/version") in $OUT is current"
	exit 0
fi
export DEBIAN_FRONTEND=noninteractive
START=$(date +%s)

# ---------------------------------------------------------------- private apt
# The mirror and keyring of the system's bookworm entry (deb822 first, then
# one-line format), as build-image.sh finds them; Debian's defaults otherwise.
mirror= keyring=
if ls /etc/apt/sources.list.d/*.sources >/dev/null 2>&1; then
	read -r mirror keyring < <(awk '
		/^URIs:/ { u = $2 } /^Signed-By:/ { k = $2 } /^Suites:/ { s = $0 } /^Types:/ { t = $0 }
		/^$/ { if (t ~ /deb( |$)/ && u ~ /\/debian\/?$/ && s ~ /bookworm( |$)/) { print u, k; exit } u = k = s = t = "" }
		END { if (t ~ /deb( |$)/ && u ~ /\/debian\/?$/ && s ~ /bookworm( |$)/) print u, k }' /etc/apt/sources.list.d/*.sources | head -1) || true
fi
if [[ -z $mirror ]]; then
	line=$(grep -hE '^deb .*/debian/? bookworm ' /etc/apt/sources.list 2>/dev/null | head -1 || true)
	mirror=$(sed -E 's/^deb (\[[^]]*\] )?//' <<<"$line" | awk '{print $1}')
	keyring=$(grep -oE 'signed-by=[^] ]+' <<<"$line" | cut -d= -f2 || true)
fi
[[ -n $mirror ]] || mirror=http://deb.debian.org/debian
[[ -n $keyring ]] || keyring=/usr/share/keyrings/debian-archive-keyring.gpg

APTDIR=$OUT/apt
rm -rf "$APTDIR"
mkdir -p "$APTDIR"/lists/partial "$APTDIR"/cache/archives/partial "$APTDIR"/dl
echo "deb [signed-by=$keyring] $mirror bookworm-backports main" >"$APTDIR/sources.list"
APT=(-o "Dir::Etc::SourceList=$APTDIR/sources.list" -o "Dir::Etc::SourceParts=$APTDIR/none"
	-o "Dir::State::Lists=$APTDIR/lists" -o "Dir::Cache=$APTDIR/cache" -o "APT::Sandbox::User=root"
	-o "Acquire::Languages=none" -o "APT::Get::List-Cleanup=0")
log "apt-get update (private list: $mirror bookworm-backports)"
apt-get "${APT[@]}" update -qq
VERSION=$(apt-cache "${APT[@]}" show qemu-system-x86 | awk '/^Version:/ {print $2; exit}')
[[ $VERSION == 1:10.* ]] || { echo "bookworm-backports serves qemu-system-x86 '$VERSION', want 1:10.x" >&2; exit 1; }
PKGS=(qemu-system-x86 qemu-system-common qemu-system-data seabios)
log "downloading ${PKGS[*]} (qemu-system-x86 $VERSION)"
(cd "$APTDIR/dl" && apt-get "${APT[@]}" download -qq "${PKGS[@]}")

# ---------------------------------------------------------------- unpack
rm -rf "$OUT/root.new"
mkdir -p "$OUT/root.new"
for f in "$APTDIR"/dl/*.deb; do dpkg-deb -x "$f" "$OUT/root.new"; done
rm -rf "$OUT/root.new/usr/share/doc" "$OUT/root.new/usr/share/man"
NEWBIN=$OUT/root.new/usr/bin/qemu-system-x86_64
[[ -x $NEWBIN ]] || { echo "no qemu-system-x86_64 in the downloaded packages" >&2; exit 1; }
[[ -f $OUT/root.new/usr/share/seabios/bios-256k.bin ]] || { echo "no bios-256k.bin in seabios" >&2; exit 1; }

# Libraries: all from bookworm (the backport is built against it).
missing=$(ldd "$NEWBIN" | awk '/not found/ {print $1}')
if [[ -n $missing ]]; then
	log "libraries missing: $(tr '\n' ' ' <<<"$missing")"
	if [[ $(id -u) != 0 ]]; then
		echo "get-qemu10.sh: QEMU 10 needs libraries that are not installed; run as root to install them" >&2
		exit 1
	fi
	# The binary package's library dependencies, less the QEMU and firmware
	# packages taken above; bookworm's versions satisfy them.
	deps=$(apt-cache "${APT[@]}" show "qemu-system-x86=$VERSION" | awk -F': ' '/^Depends:/ {print $2; exit}' |
		tr ',' '\n' | sed -E 's/\(.*\)//; s/\|.*//; s/ //g' | grep -vE '^(qemu-|seabios|ipxe-qemu)' | grep .)
	log "apt-get install (bookworm) $(tr '\n' ' ' <<<"$deps")"
	apt-get install -y -qq --no-install-recommends $deps >/dev/null ||
		{ apt-get update -qq && apt-get install -y -qq --no-install-recommends $deps >/dev/null; }
	missing=$(ldd "$NEWBIN" | awk '/not found/ {print $1}')
	[[ -z $missing ]] || { echo "QEMU 10 still misses libraries: $missing" >&2; exit 1; }
fi
got=$(QEMU_MODULE_DIR=$OUT/root.new/usr/lib/x86_64-linux-gnu/qemu "$NEWBIN" -version | head -1)
[[ $got == "QEMU emulator version 10."* ]] || { echo "unexpected: $got" >&2; exit 1; }
QEMU_MODULE_DIR=$OUT/root.new/usr/lib/x86_64-linux-gnu/qemu "$NEWBIN" -device vhost-user-scsi-pci,help | grep -q chardev ||
	{ echo "QEMU 10 has no vhost-user-scsi-pci" >&2; exit 1; }

rm -rf "$OUT/root"
mv "$OUT/root.new" "$OUT/root"
rm -rf "$APTDIR"
echo "$VERSION" >"$OUT/version"
echo "$HASH" >"$OUT/stamp"
log "done in $(($(date +%s) - START)) s: $got, $(du -sh "$OUT/root" | cut -f1) in $OUT/root"
