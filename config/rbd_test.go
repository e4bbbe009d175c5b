package config

import (
	"strings"
	"testing"
	"time"
)

const rbdBdev = "[[bdev]]\nname = \"ceph0\"\ntype = \"rbd\"\npool = \"rbd\"\nimage = \"vm1\"\n"

// TestParseRBD checks an rbd bdev's defaults and every key it takes.
func TestParseRBD(t *testing.T) {
	c, err := Parse([]byte(withCPU(head+rbdBdev)), "r.toml")
	if err != nil {
		t.Fatal(err)
	}
	want := Bdev{Name: "ceph0", Type: TypeRBD, Pool: "rbd", Image: "vm1", BlockSize: BlockSizeDefault,
		QueueDepth: QueueDepthDefault, OpTimeout: OpTimeoutDefault, UUID: BdevUUID("ceph0")}
	if got := c.Bdevs[0]; !bdevEqual(got, want) {
		t.Errorf("defaults:\ngot  %+v\nwant %+v", got, want)
	}
	if QueueDepthDefault != 128 || OpTimeoutDefault != 30*time.Second {
		t.Errorf("defaults changed: queue_depth %d, op_timeout %v (deploy/README.md says 128 and 30s)",
			QueueDepthDefault, OpTimeoutDefault)
	}

	c, err = Parse([]byte(withCPU(head+`
[[bdev]]
name = "ceph1"
type = "rbd"
pool = "volumes"
image = "vm2"
namespace = "tenant-a"
conf = "/etc/ceph/other.conf"
user = "vhost"
keyring = "/etc/ceph/other.client.vhost.keyring"
block_size = 4096
queue_depth = 32
read_only = true
uuid = "0f0e0d0c-0b0a-4908-8706-050403020100"
op_timeout = "1m30s"
[[controller]]
name = "vhost.0"
[[controller.lun]]
target = 0
bdev = "ceph1"
`)), "r.toml")
	if err != nil {
		t.Fatal(err)
	}
	u, _ := ParseUUID("0f0e0d0c-0b0a-4908-8706-050403020100")
	want = Bdev{Name: "ceph1", Type: TypeRBD, Pool: "volumes", Image: "vm2", Namespace: "tenant-a",
		Conf: "/etc/ceph/other.conf", User: "vhost", Keyring: "/etc/ceph/other.client.vhost.keyring",
		BlockSize: 4096, QueueDepth: 32, ReadOnly: true, UUID: u, OpTimeout: 90 * time.Second}
	if got := c.Bdevs[0]; !bdevEqual(got, want) {
		t.Errorf("every key:\ngot  %+v\nwant %+v", got, want)
	}
	roundTrip(t, c)

	// "0s" waits for ever: it is kept as 0, not replaced by the default,
	// and written back as "0s".
	c, err = Parse([]byte(withCPU(head+rbdBdev+"op_timeout = \"0s\"\n")), "r.toml")
	if err != nil {
		t.Fatal(err)
	}
	if c.Bdevs[0].OpTimeout != 0 {
		t.Errorf("op_timeout \"0s\" = %v, want 0", c.Bdevs[0].OpTimeout)
	}
	data := roundTrip(t, c)
	if !strings.Contains(string(data), `op_timeout = "0s"`) {
		t.Errorf("op_timeout 0 not written as \"0s\":\n%s", data)
	}
	// The defaults are written out too.
	c, _ = Parse([]byte(withCPU(head+rbdBdev)), "r.toml")
	data = roundTrip(t, c)
	for _, w := range []string{`type = "rbd"`, `pool = "rbd"`, `image = "vm1"`, `op_timeout = "30s"`,
		`queue_depth = 128`, `block_size = 512`} {
		if !strings.Contains(string(data), w) {
			t.Errorf("encoded rbd bdev lacks %s:\n%s", w, data)
		}
	}
	for _, w := range []string{"size", "path", "namespace", "conf", "user", "keyring", "workers", "engine"} {
		if strings.Contains(string(data), "\n"+w+" =") {
			t.Errorf("encoded rbd bdev has key %s:\n%s", w, data)
		}
	}
}

// bdevEqual compares bdevs field by field (Inject nil and empty alike).
func bdevEqual(a, b Bdev) bool {
	a.Inject, b.Inject = nil, nil
	return a.Name == b.Name && a.Type == b.Type && a.Pool == b.Pool && a.Image == b.Image &&
		a.Namespace == b.Namespace && a.Conf == b.Conf && a.User == b.User && a.Keyring == b.Keyring &&
		a.BlockSize == b.BlockSize && a.QueueDepth == b.QueueDepth && a.ReadOnly == b.ReadOnly &&
		a.UUID == b.UUID && a.OpTimeout == b.OpTimeout && a.Size == b.Size && a.Path == b.Path &&
		a.Create == b.Create && a.Workers == b.Workers && a.Engine == b.Engine && a.Hugepages == b.Hugepages &&
		a.Base == b.Base
}

// TestParseRBDErrors checks every refusal of an rbd bdev's keys, and of
// the rbd keys on other types; each names the entry and the key.
func TestParseRBDErrors(t *testing.T) {
	tests := []struct {
		name  string
		text  string
		want  []string
		lines int
	}{
		{"pool missing", "[[bdev]]\nname = \"ceph0\"\ntype = \"rbd\"\nimage = \"vm1\"\n",
			[]string{`e.toml: bdev[0] "ceph0": pool: required for type "rbd"`}, 1},
		{"image missing", "[[bdev]]\nname = \"ceph0\"\ntype = \"rbd\"\npool = \"rbd\"\n",
			[]string{`e.toml: bdev[0] "ceph0": image: required for type "rbd"`}, 1},
		{"both missing", "[[bdev]]\nname = \"ceph0\"\ntype = \"rbd\"\n",
			[]string{`pool: required`, `image: required`}, 2},
		{"image spec", strings.Replace(rbdBdev, `"vm1"`, `"rbd/vm1"`, 1),
			[]string{`bdev[0] "ceph0": image: "rbd/vm1" contains '/' or '@'`}, 1},
		{"image snapshot", strings.Replace(rbdBdev, `"vm1"`, `"vm1@snap"`, 1),
			[]string{`image: "vm1@snap" contains '/' or '@'`}, 1},
		{"namespace slash", rbdBdev + "namespace = \"a/b\"\n", []string{`bdev[0] "ceph0": namespace: "a/b" contains '/'`}, 1},
		{"pool NUL", strings.Replace(rbdBdev, `"rbd"`+"\nimage", `"r\u0000bd"`+"\nimage", 1),
			[]string{`bdev[0] "ceph0": pool: contains a NUL byte`}, 1},
		{"conf relative", rbdBdev + "conf = \"ceph.conf\"\n",
			[]string{`bdev[0] "ceph0": conf: "ceph.conf" is not an absolute path`}, 1},
		{"keyring relative", rbdBdev + "keyring = \"keyring\"\n",
			[]string{`bdev[0] "ceph0": keyring: "keyring" is not an absolute path`}, 1},
		{"user with client.", rbdBdev + "user = \"client.vhost\"\n",
			[]string{`bdev[0] "ceph0": user: "client.vhost": give the client id without "client." ("vhost")`}, 1},
		{"block size", rbdBdev + "block_size = 1024\n", []string{`bdev[0] "ceph0": block_size: 1024 is not 512 or 4096`}, 1},
		{"queue depth zero", rbdBdev + "queue_depth = 0\n", []string{`bdev[0] "ceph0": queue_depth: 0 is out of range 1..4096`}, 1},
		{"queue depth big", rbdBdev + "queue_depth = 4097\n", []string{`queue_depth: 4097 is out of range 1..4096`}, 1},
		{"op timeout bad", rbdBdev + "op_timeout = \"30\"\n",
			[]string{`bdev[0] "ceph0": op_timeout: "30" is not a duration such as "30s" ("0s" waits for ever)`}, 1},
		{"op timeout negative", rbdBdev + "op_timeout = \"-1s\"\n",
			[]string{`bdev[0] "ceph0": op_timeout: -1s is negative; "0s" waits for ever`}, 1},
		{"op timeout integer", rbdBdev + "op_timeout = 30\n", []string{`op_timeout`, `incompatible types`}, 0},
		{"uuid bad", rbdBdev + "uuid = \"nope\"\n", []string{`bdev[0] "ceph0": uuid: "nope" is not a UUID`}, 1},
		{"uuid zero", rbdBdev + "uuid = \"00000000-0000-0000-0000-000000000000\"\n",
			[]string{`bdev[0] "ceph0": uuid: must not be all zeros`}, 1},
		// Keys of other types, each with the existing message.
		{"size", rbdBdev + "size = \"1GiB\"\n", []string{`bdev[0] "ceph0": size: not used by type "rbd"`}, 1},
		{"size zero", rbdBdev + "size = 0\n", []string{`bdev[0] "ceph0": size: not used by type "rbd"`}, 1},
		{"size bad", rbdBdev + "size = \"lots\"\n", []string{`bdev[0] "ceph0": size: not used by type "rbd"`}, 1},
		{"path", rbdBdev + "path = \"/dev/rbd0\"\n", []string{`bdev[0] "ceph0": path: not used by type "rbd"`}, 1},
		{"create", rbdBdev + "create = true\n", []string{`create: not used by type "rbd"`}, 1},
		{"engine", rbdBdev + "engine = \"uring\"\n", []string{`engine: not used by type "rbd"`}, 1},
		{"workers", rbdBdev + "workers = 2\n", []string{`workers: not used by type "rbd"`}, 1},
		{"hugepages", rbdBdev + "hugepages = \"none\"\n", []string{`hugepages: not used by type "rbd"`}, 1},
		{"base", rbdBdev + "base = \"x\"\n", []string{`base: not used by type "rbd"`}, 1},
		{"inject", rbdBdev + "[[bdev.inject]]\nop = \"all\"\nerror = \"eio\"\n", []string{`inject: not used by type "rbd"`}, 1},
		{"every other key", rbdBdev + "size = 4096\npath = \"/x\"\ncreate = true\nengine = \"uring\"\nworkers = 2\nhugepages = \"none\"\nbase = \"x\"\n",
			[]string{`size: not used`, `path: not used`, `create: not used`, `engine: not used`, `workers: not used`,
				`hugepages: not used`, `base: not used`}, 7},
		// rbd keys on other types.
		{"rbd keys on malloc", mallocBdev + "pool = \"rbd\"\nimage = \"vm1\"\nnamespace = \"n\"\nconf = \"/c\"\nuser = \"u\"\nkeyring = \"/k\"\nop_timeout = \"5s\"\n",
			[]string{`bdev[0] "mem0": pool: not used by type "malloc"`, `image: not used by type "malloc"`,
				`namespace: not used by type "malloc"`, `conf: not used by type "malloc"`, `user: not used by type "malloc"`,
				`keyring: not used by type "malloc"`, `op_timeout: not used by type "malloc"`}, 7},
		{"op_timeout 0s on aio", "[[bdev]]\nname = \"a0\"\ntype = \"aio\"\npath = \"/x\"\nop_timeout = \"0s\"\n",
			[]string{`bdev[0] "a0": op_timeout: not used by type "aio"`}, 1},
		{"pool on file", "[[bdev]]\nname = \"f0\"\ntype = \"file\"\npath = \"/x\"\npool = \"rbd\"\n",
			[]string{`bdev[0] "f0": pool: not used by type "file"`}, 1},
		{"image on error", mallocBdev + "[[bdev]]\nname = \"e0\"\ntype = \"error\"\nbase = \"mem0\"\nimage = \"vm1\"\n",
			[]string{`bdev[1] "e0": image: not used by type "error"`}, 1},
		{"type missing lists rbd", "[[bdev]]\nname = \"x\"\npool = \"rbd\"\n",
			[]string{`type: required: "malloc", "file", "aio", "error" or "rbd"`}, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := Parse([]byte(withCPU(head+tt.text)), "e.toml")
			if err == nil {
				t.Fatalf("accepted: %+v", c)
			}
			if n := strings.Count(err.Error(), "\n") + 1; tt.lines != 0 && n != tt.lines {
				t.Errorf("%d errors, want %d:\n%v", n, tt.lines, err)
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error does not contain %q:\n%v", w, err)
				}
			}
		})
	}
}

// TestValidateRBDHandBuilt checks what the runtime API builds without the
// parser: the same checks, and no size for an rbd bdev.
func TestValidateRBDHandBuilt(t *testing.T) {
	c := Default()
	c.SetSource("rpc")
	ok := Bdev{Name: "ceph0", Type: TypeRBD, Pool: "rbd", Image: "vm1", BlockSize: 512,
		QueueDepth: QueueDepthDefault, OpTimeout: OpTimeoutDefault, UUID: BdevUUID("ceph0")}
	c.Bdevs = append(c.Bdevs, ok)
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	c.Bdevs[1].Size = 1 << 30
	c.Bdevs[1].QueueDepth = 0
	c.Bdevs[1].UUID = [16]byte{}
	err := c.Validate()
	for _, w := range []string{`rpc: bdev[1] "ceph0": size: not used by type "rbd"`,
		`bdev[1] "ceph0": queue_depth: 0 is out of range 1..4096`, `bdev[1] "ceph0": uuid: must not be all zeros`} {
		if err == nil || !strings.Contains(err.Error(), w) {
			t.Errorf("error does not contain %q:\n%v", w, err)
		}
	}
}
