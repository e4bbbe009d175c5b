#!/bin/sh
# Start a VM whose disks come from vhost-target controller "vhost.0".
#
#   [SOCKET=...] [MEM=2G] [CPUS=2] [QUEUES=n] [KERNEL=bzImage] [BLK=1] deploy/qemu-vm.sh [extra QEMU arguments...]
#
# BLK=1: the controller is a blk one (type = "blk"): the VM gets a
# vhost-user-blk-pci disk (/dev/vda) instead of a vhost-user-scsi-pci HBA.
#
# Requirements, each a hard error in QEMU otherwise:
#  - vhost-target is running and its config defines controller vhost.0, so
#    the socket exists (QEMU does not wait for it).
#  - Guest RAM is a shared, fd-backed memory backend: the target maps the
#    guest's memory through the memfd QEMU passes over the socket.
#  - QEMU runs as root or as the controller's socket_owner (socket_mode
#    "0600" by default).
# Restarts of the target: QEMU 8.2 and later reconnect a vhost-user-scsi
# device to a restarted target when the chardev has a reconnect interval,
# which this script sets (reconnect-ms on QEMU 9.2+, reconnect= seconds on
# 8.2..9.1); in-flight requests are resubmitted through the target's
# INFLIGHT_SHMFD area, so `systemctl restart vhost-target` (or a crash and
# Restart=on-failure) pauses the guest's I/O for about the reconnect
# interval: 100 ms here (a whole second with reconnect=1 on 8.2..9.1).
# QEMU 7.2 (Debian 12's own) cannot reconnect: if the target stops, this VM's
# SCSI I/O hangs until the VM is restarted. Debian 12 gets QEMU 10 from
# bookworm-backports (apt install -t bookworm-backports qemu-system-x86).
set -eu
EXTRA_COUNT=$#

SOCKET=${SOCKET:-/var/run/vhost-target/vhost.0}   # <socket_dir>/<controller name>
MEM=${MEM:-2G}                                   # guest RAM; all of it is shared with the target
CPUS=${CPUS:-2}
# Request queues the guest uses. QEMU's default is one per vCPU; it must not
# exceed the controller's num_queues (4 for vhost.0 in target.toml), so it is
# set explicitly here.
QUEUES=${QUEUES:-$CPUS}
KERNEL=${KERNEL:-}    # optional: boot a kernel directly (-kernel), else boot from the SCSI disk
QEMU=${QEMU:-qemu-system-x86_64}
BLK=${BLK:-}
# The virtio-scsi HBA whose queues the target serves (LUNs appear as /dev/sdX
# in the guest, target/LUN from [[controller.lun]]), or with BLK=1 the
# virtio-blk disk of a blk controller (/dev/vda).
DEVICE="vhost-user-scsi-pci,id=scsi0,chardev=vhost0,num_queues=$QUEUES,bootindex=0"
ROOT=/dev/sda1
if [ -n "$BLK" ]; then
	DEVICE="vhost-user-blk-pci,id=blk0,chardev=vhost0,num-queues=$QUEUES,bootindex=0"
	ROOT=/dev/vda1
fi

# Reconnect to a restarted target where this QEMU can (see above).
RECONNECT=""
QVER=$("$QEMU" --version | sed -n 's/^QEMU emulator version \([0-9]*\)\.\([0-9]*\).*/\1 \2/p')
set -- ${QVER:-0 0} "$@"
QMAJ=$1 QMIN=$2
shift 2
if [ "$QMAJ" -gt 9 ] || { [ "$QMAJ" -eq 9 ] && [ "$QMIN" -ge 2 ]; }; then
	RECONNECT=",reconnect-ms=100"
elif [ "$QMAJ" -eq 9 ] || { [ "$QMAJ" -eq 8 ] && [ "$QMIN" -ge 2 ]; }; then
	RECONNECT=",reconnect=1"
fi

# Use KVM only when a real hardware virtualization module is loaded;
# otherwise fall back to TCG (slow, for functional testing only).
if grep -qE '^kvm_(intel|amd) ' /proc/modules 2>/dev/null; then
	ACCEL="-accel kvm -cpu host"
else
	ACCEL="-accel tcg,thread=multi -cpu max"
fi

# The QEMU arguments are collected after the caller's ones in "$@"; the
# caller's are rotated to the end below.
set -- "$@" \
	$ACCEL \
	-smp "$CPUS" -m "$MEM" \
	`# Guest RAM from a memfd, shared (share=on) so the target can map it.` \
	-object memory-backend-memfd,id=mem,size="$MEM",share=on \
	-machine pc,memory-backend=mem \
	`# The vhost-user socket of controller vhost.0; QEMU is the client.` \
	-chardev socket,id=vhost0,path="$SOCKET"$RECONNECT \
	-device "$DEVICE" \
	-nographic -serial mon:stdio

if [ -n "$KERNEL" ]; then
	set -- "$@" -kernel "$KERNEL" -append "console=ttyS0 root=$ROOT"
fi

# Move the caller's extra arguments behind ours.
i=0
while [ "$i" -lt "$EXTRA_COUNT" ]; do
	set -- "$@" "$1"
	shift
	i=$((i + 1))
done

exec "$QEMU" "$@"
