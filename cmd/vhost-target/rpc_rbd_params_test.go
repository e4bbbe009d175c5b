package main

import (
	"slices"
	"strings"
	"testing"
)

// TestRPCRBDParams checks bdev_rbd_create's, bdev_rbd_delete's and
// bdev_rbd_resize's refusals that come before any cluster is asked, so
// they hold in every build: SPDK's config map and cluster_name, missing
// names, and the file's checks with the file's messages.
func TestRPCRBDParams(t *testing.T) {
	_, c := rpcTarget(t, rpcBase)
	methods := call[[]string](t, c, "rpc_get_methods", nil)
	for _, want := range []string{"bdev_rbd_create", "bdev_rbd_delete", "bdev_rbd_resize", "bdev_rbd_rescan"} {
		if !slices.Contains(methods, want) {
			t.Errorf("rpc_get_methods lacks %s", want)
		}
	}
	ok := func(extra m) m {
		p := m{"name": "ceph0", "pool_name": "rbd", "rbd_name": "vm1"}
		for k, v := range extra {
			p[k] = v
		}
		return p
	}
	callErr(t, c, "bdev_rbd_create", ok(m{"config": m{"mon_host": "10.0.0.1"}}), -32602,
		"config: ceph settings as key/value pairs are not supported; name a ceph.conf with conf")
	callErr(t, c, "bdev_rbd_create", ok(m{"cluster_name": "c1"}), -32602, "cluster_name: registered clusters")
	callErr(t, c, "bdev_rbd_create", m{"rbd_name": "vm1"}, -32602, "pool_name: required")
	callErr(t, c, "bdev_rbd_create", m{"pool_name": "rbd"}, -32602, "rbd_name: required")
	callErr(t, c, "bdev_rbd_create", ok(m{"op_timeout": "5"}), -32602, `op_timeout: "5" is not a duration`)
	callErr(t, c, "bdev_rbd_create", ok(m{"bogus": 1}), -32602, "bogus")
	callErr(t, c, "bdev_rbd_create", ok(m{"uuid": "x"}), -32602, `uuid: "x" is not a UUID`)
	// The file's checks, with its messages and "rpc" as the source.
	callErr(t, c, "bdev_rbd_create", ok(m{"conf": "ceph.conf"}), -32602, `rpc: bdev[1] "ceph0": conf: "ceph.conf" is not an absolute path`)
	callErr(t, c, "bdev_rbd_create", ok(m{"keyring": "k"}), -32602, `keyring: "k" is not an absolute path`)
	callErr(t, c, "bdev_rbd_create", ok(m{"user_id": "client.admin"}), -32602, `user: "client.admin": give the client id without "client."`)
	callErr(t, c, "bdev_rbd_create", ok(m{"block_size": 1000}), -32602, `block_size: 1000 is not 512 or 4096`)
	callErr(t, c, "bdev_rbd_create", ok(m{"queue_depth": 0}), -32602, `queue_depth: 0 is out of range 1..4096`)
	callErr(t, c, "bdev_rbd_create", ok(m{"op_timeout": "-1s"}), -32602, `op_timeout: -1s is negative`)
	callErr(t, c, "bdev_rbd_create", ok(m{"rbd_name": "rbd/vm1"}), -32602, `image: "rbd/vm1" contains '/' or '@'`)
	callErr(t, c, "bdev_rbd_create", ok(m{"name": "m0"}), -17, `bdev "m0" already exists`)
	msg := callErr(t, c, "bdev_rbd_create", m{"pool_name": "rbd", "rbd_name": "vm1", "conf": "x"}, -32602, `"Ceph0"`)
	if !strings.Contains(msg, "conf:") {
		t.Errorf("unnamed bdev_rbd_create: %s", msg)
	}
	// The rbd methods do not touch other types' bdevs.
	callErr(t, c, "bdev_rbd_delete", m{"name": "m0"}, -19, `bdev "m0" does not exist`)
	callErr(t, c, "bdev_rbd_resize", m{"name": "m0", "new_size": 8}, -19, `rbd bdev "m0" does not exist`)
	callErr(t, c, "bdev_rbd_resize", m{"name": "m0"}, -32602, `new_size: required (MiB)`)
	callErr(t, c, "bdev_rbd_resize", m{"new_size": 8}, -32602, `name: required`)
}
