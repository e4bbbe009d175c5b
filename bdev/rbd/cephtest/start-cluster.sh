#!/bin/bash
# Start a one-host Ceph cluster for tests: one monitor and one OSD whose
# BlueStore lives in a sparse file, cephx on, everything under DIR, bound to
# 127.0.0.1 on the port given. Prints nothing on success but writes
# DIR/ceph.conf, DIR/keyring (client.admin) and DIR/*.pid.
#
#   start-cluster.sh DIR MON_PORT
set -euo pipefail
DIR=$1
PORT=$2
mkdir -p "$DIR"/{mon,osd,run,log}
CONF=$DIR/ceph.conf
FSID=$(cat /proc/sys/kernel/random/uuid)
cat >"$CONF" <<CONF
[global]
fsid = $FSID
mon host = v1:127.0.0.1:$PORT
public addr = 127.0.0.1
ms bind ipv6 = false
ms bind msgr2 = false
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
keyring = $DIR/keyring
run dir = $DIR/run
admin socket = $DIR/run/\$cluster-\$name.asok
log file = $DIR/log/\$cluster-\$name.log
pid file = $DIR/\$name.pid
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
osd crush chooseleaf type = 0
# Quick failure detection: a stopped OSD is marked down in seconds.
osd heartbeat grace = 5
mon osd down out interval = 0
[mon]
mon data = $DIR/mon/\$cluster-\$id
mon cluster log file = $DIR/log/cluster.log
[osd]
osd data = $DIR/osd/\$cluster-\$id
osd objectstore = bluestore
bluestore block path = $DIR/osd/\$cluster-\$id.block
bluestore block create = true
bluestore block size = 4294967296
bluestore fsck on mount = false
osd memory target = 1073741824
osd op num shards = 1
osd op num threads per shard = 2
CONF
ceph-authtool --create-keyring "$DIR/mon.keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
ceph-authtool --create-keyring "$DIR/keyring" --gen-key -n client.admin \
	--cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' --cap mds 'allow *' >/dev/null
ceph-authtool "$DIR/mon.keyring" --import-keyring "$DIR/keyring" >/dev/null
monmaptool --create --addv a "[v1:127.0.0.1:$PORT]" --fsid "$FSID" "$DIR/monmap" >/dev/null
ceph-mon -c "$CONF" --mkfs -i a --monmap "$DIR/monmap" --keyring "$DIR/mon.keyring"
ceph-mon -c "$CONF" -i a
ceph -c "$CONF" --connect-timeout 20 mon stat >/dev/null
OSD_UUID=$(cat /proc/sys/kernel/random/uuid)
ID=$(ceph -c "$CONF" osd new "$OSD_UUID")
OD=$DIR/osd/ceph-$ID
mkdir -p "$OD"
ceph-authtool --create-keyring "$OD/keyring" --gen-key -n "osd.$ID" >/dev/null
ceph -c "$CONF" auth add "osd.$ID" osd 'allow *' mon 'allow profile osd' -i "$OD/keyring" >/dev/null
ceph-osd -c "$CONF" -i "$ID" --mkfs --osd-uuid "$OSD_UUID" --keyring "$OD/keyring" 2>"$DIR/log/osd-mkfs.err" >/dev/null
ceph-osd -c "$CONF" -i "$ID" --keyring "$OD/keyring"
echo "$ID" >"$DIR/osd-id"
