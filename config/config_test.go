// Tests for Parse, Validate and Default. Method: each case is a small TOML
// text that is valid except for one mistake; the test checks that the error
// names the file, the entry and the key path, so a user can find the line.
// Valid texts are compared field by field against the exact Config expected.
package config

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"
)

// cpu is a CPU this test process may run on; texts use it so that they are
// valid on any machine.
var cpu = allowedCPUs()[0]

// withCPU replaces every "@CPU@" placeholder in text with cpu.
func withCPU(text string) string {
	return strings.ReplaceAll(text, "@CPU@", fmt.Sprint(cpu))
}

const fullExample = `
socket_dir = "/run/vt"

[metrics]
listen = "[::1]:9100"

[rpc]
socket_mode = "0660"
socket_group = "0"

[reactors]
cpus = [@CPU@]
poll = "adaptive"

[[bdev]]
name = "mem0"
type = "malloc"
size = "1GiB"

[[bdev]]
name = "mem4k"
type = "malloc"
size = 1048576
block_size = 4096
hugepages = "none"
uuid = "0123ABCD-4567-89ab-cdef-0123456789AB"

[[bdev]]
name = "disk1"
type = "file"
path = "/var/lib/vm/disk1.img"
size = "10GB"
create = true
workers = 4

[[bdev]]
name = "disk2"
type = "aio"
path = "/dev/vdb"
read_only = true
engine = "libaio"
queue_depth = 64

[[bdev]]
name = "disk3"
type = "aio"
path = "/dev/vdc"

[[controller]]
name = "vhost.0"
cpus = [@CPU@]
num_queues = 8
max_sessions = 2
socket_mode = "0660"
socket_owner = "root"
socket_group = "0"

[[controller.lun]]
target = 0
lun = 0
bdev = "mem0"

[[controller.lun]]
target = 1
lun = 16383
bdev = "mem4k"

[[controller]]
name = "vhost.1"
migration = false

[[controller.lun]]
target = 255
bdev = "disk1"

[[controller.lun]]
target = 3
lun = 2
bdev = "disk2"

[[controller]]
name = "blk.0"
type = "blk"
bdev = "disk3"
read_only = true
num_queues = 2
`

func TestParseFullExample(t *testing.T) {
	got, err := Parse([]byte(withCPU(fullExample)), "full.toml")
	if err != nil {
		t.Fatal(err)
	}
	want := &Config{
		SocketDir: "/run/vt",
		Metrics:   Metrics{Listen: "[::1]:9100"},
		RPC:       RPC{Socket: "/run/vt/rpc.sock", SocketMode: 0o660, SocketGroup: "0"},
		Reactors:  Reactors{CPUs: []int{cpu}, Poll: PollAdaptive},
		Bdevs: []Bdev{
			{Name: "mem0", Type: TypeMalloc, Size: 1 << 30, BlockSize: 512, Hugepages: HugepagesAuto, UUID: BdevUUID("mem0")},
			{Name: "mem4k", Type: TypeMalloc, Size: 1 << 20, BlockSize: 4096, Hugepages: HugepagesNone,
				UUID: [16]byte{0x01, 0x23, 0xab, 0xcd, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, 0x01, 0x23, 0x45, 0x67, 0x89, 0xab}},
			{Name: "disk1", Type: TypeFile, Path: "/var/lib/vm/disk1.img", Size: 10e9, BlockSize: 512, Create: true,
				Workers: 4, QueueDepth: QueueDepthDefault, UUID: BdevUUID("disk1")},
			{Name: "disk2", Type: TypeAIO, Path: "/dev/vdb", Engine: EngineLibaio, BlockSize: 512, ReadOnly: true,
				QueueDepth: 64, UUID: BdevUUID("disk2")},
			{Name: "disk3", Type: TypeAIO, Path: "/dev/vdc", Engine: EngineAuto, BlockSize: 512,
				QueueDepth: QueueDepthDefault, UUID: BdevUUID("disk3")},
		},
		Controllers: []Controller{
			{Name: "vhost.0", Type: ControllerSCSI, CPUs: []int{cpu}, NumQueues: 8, MaxSessions: 2, Migration: true, SocketMode: 0o660, SocketOwner: "root", SocketGroup: "0",
				LUNs: []LUN{{Target: 0, LUN: 0, Bdev: "mem0"}, {Target: 1, LUN: 16383, Bdev: "mem4k"}}},
			{Name: "vhost.1", Type: ControllerSCSI, CPUs: []int{cpu}, NumQueues: NumQueuesDefault, MaxSessions: MaxSessionsDefault, SocketMode: 0o600,
				LUNs: []LUN{{Target: 255, LUN: 0, Bdev: "disk1"}, {Target: 3, LUN: 2, Bdev: "disk2"}}},
			{Name: "blk.0", Type: ControllerBlk, Bdev: "disk3", ReadOnly: true, CPUs: []int{cpu}, NumQueues: 2,
				MaxSessions: MaxSessionsDefault, Migration: true, SocketMode: 0o600},
		},
		source: "full.toml",
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("got  %+v\nwant %+v", got, want)
	}
	if err := got.Validate(); err != nil {
		t.Errorf("parsed config does not re-validate: %v", err)
	}
	if p := got.SocketPath(&got.Controllers[1]); p != "/run/vt/vhost.1" {
		t.Errorf("SocketPath = %q", p)
	}
	if b := got.Bdev("disk2"); b == nil || b.Path != "/dev/vdb" {
		t.Errorf("Bdev(disk2) = %+v", b)
	}
	if got.Bdev("nope") != nil {
		t.Error("Bdev(nope) found something")
	}
}

// TestParseDefaultsFilled checks the defaults of every optional key.
func TestParseDefaultsFilled(t *testing.T) {
	text := `
[[bdev]]
name = "m"
type = "malloc"
size = 4096
[[bdev]]
name = "f"
type = "file"
path = "/x"
[[controller]]
name = "c"
[[controller.lun]]
target = 7
bdev = "m"
`
	c, err := Parse([]byte(text), "min.toml")
	if err != nil {
		t.Fatal(err)
	}
	if c.SocketDir != DefaultSocketDir() {
		t.Errorf("SocketDir = %q, want %q", c.SocketDir, DefaultSocketDir())
	}
	if c.Metrics.Listen != "127.0.0.1:9478" {
		t.Errorf("Listen = %q", c.Metrics.Listen)
	}
	if !reflect.DeepEqual(c.Reactors, Reactors{CPUs: []int{cpu}, Poll: "busy"}) {
		t.Errorf("Reactors = %+v", c.Reactors)
	}
	if b := c.Bdevs[0]; b.BlockSize != 512 || b.Workers != 0 || b.Engine != "" || b.QueueDepth != 0 || b.Hugepages != "auto" {
		t.Errorf("malloc bdev = %+v", b)
	}
	if b := c.Bdevs[1]; b.BlockSize != 512 || b.Workers != 2 || b.Size != 0 || b.Create || b.ReadOnly || b.Hugepages != "" {
		t.Errorf("file bdev = %+v", b)
	}
	ctrl := c.Controllers[0]
	if !reflect.DeepEqual(ctrl.CPUs, []int{cpu}) || ctrl.Type != ControllerSCSI || ctrl.Bdev != "" || ctrl.ReadOnly ||
		ctrl.NumQueues != 4 || ctrl.SocketMode != 0o600 ||
		ctrl.SocketOwner != "" || ctrl.SocketGroup != "" || ctrl.LUNs[0] != (LUN{Target: 7, LUN: 0, Bdev: "m"}) {
		t.Errorf("controller = %+v", ctrl)
	}
	uid, gid, err := ctrl.SocketIDs()
	if uid != -1 || gid != -1 || err != nil {
		t.Errorf("SocketIDs = %d, %d, %v; want -1, -1, nil", uid, gid, err)
	}

	// An empty listen disables metrics rather than taking the default.
	c, err = Parse([]byte("[metrics]\nlisten = \"\"\n"+text), "min.toml")
	if err != nil || c.Metrics.Listen != "" {
		t.Errorf("listen = \"\": got %q, %v", c.Metrics.Listen, err)
	}
}

const (
	head       = "socket_dir = \"/tmp/vt\"\n[reactors]\ncpus = [@CPU@]\n"
	mallocBdev = "[[bdev]]\nname = \"mem0\"\ntype = \"malloc\"\nsize = \"1MiB\"\n"
	ctrl0      = "[[controller]]\nname = \"vhost.0\"\n[[controller.lun]]\ntarget = 0\nbdev = \"mem0\"\n"
)

// TestParseErrorBdev parses an error bdev with every inject key.
func TestParseErrorBdev(t *testing.T) {
	text := withCPU(head + mallocBdev + `
[[bdev]]
name = "err0"
type = "error"
base = "mem0"
[[bdev.inject]]
op = "read"
lba_start = 100
lba_count = 8
error = "eio"
[[bdev.inject]]
op = "all"
delay = "10ms"
[[bdev.inject]]
op = "write"
lba_start = 7
error = "eio"
delay = "1.5s"
count = 2
[[controller]]
name = "vhost.0"
[[controller.lun]]
target = 0
bdev = "err0"
`)
	c, err := Parse([]byte(text), "e.toml")
	if err != nil {
		t.Fatal(err)
	}
	want := Bdev{Name: "err0", Type: TypeError, Base: "mem0", UUID: BdevUUID("err0"), Inject: []Inject{
		{Op: "read", LBAStart: 100, LBACount: 8, Error: InjectEIO},
		{Op: "all", Delay: 10 * time.Millisecond},
		{Op: "write", LBAStart: 7, Error: InjectEIO, Delay: 1500 * time.Millisecond, Count: 2},
	}}
	if !reflect.DeepEqual(c.Bdevs[1], want) {
		t.Errorf("got  %+v\nwant %+v", c.Bdevs[1], want)
	}
	if err := c.Validate(); err != nil {
		t.Errorf("parsed config does not re-validate: %v", err)
	}
	if b := c.Bdevs[0]; b.QueueDepth != 0 {
		t.Errorf("malloc queue depth = %d", b.QueueDepth)
	}
}

// TestParseHugepages parses every hugepages value of a malloc bdev; the
// absent key is "auto" (TestParseDefaultsFilled), bad values are in
// TestParseErrors.
func TestParseHugepages(t *testing.T) {
	for _, v := range []string{HugepagesAuto, HugepagesHugeTLB, HugepagesTHP, HugepagesNone} {
		c, err := Parse([]byte(withCPU(head+mallocBdev+"hugepages = \""+v+"\"\n"+ctrl0)), "h.toml")
		if err != nil {
			t.Fatalf("%s: %v", v, err)
		}
		if got := c.Bdevs[0].Hugepages; got != v {
			t.Errorf("hugepages = %q: got %q", v, got)
		}
		if err := c.Validate(); err != nil {
			t.Errorf("%s: parsed config does not re-validate: %v", v, err)
		}
	}
}

// TestParseBlk parses blk controllers: type, bdev and read_only (default
// false), with the keys every controller has.
func TestParseBlk(t *testing.T) {
	text := withCPU(head + mallocBdev + `
[[bdev]]
name = "m1"
type = "malloc"
size = 4096
[[controller]]
name = "b0"
type = "blk"
bdev = "mem0"
[[controller]]
name = "b1"
type = "blk"
bdev = "m1"
read_only = true
cpus = [@CPU@]
num_queues = 1
max_sessions = 2
migration = false
socket_mode = "0660"
[[controller]]
name = "s0"
type = "scsi"
`)
	c, err := Parse([]byte(text), "b.toml")
	if err != nil {
		t.Fatal(err)
	}
	b0 := NewController("b0", []int{cpu})
	b0.Type, b0.Bdev = ControllerBlk, "mem0"
	b1 := Controller{Name: "b1", Type: ControllerBlk, Bdev: "m1", ReadOnly: true, CPUs: []int{cpu}, NumQueues: 1,
		MaxSessions: 2, SocketMode: 0o660}
	want := []Controller{b0, b1, NewController("s0", []int{cpu})}
	if !reflect.DeepEqual(c.Controllers, want) {
		t.Errorf("got  %+v\nwant %+v", c.Controllers, want)
	}
	if err := c.Validate(); err != nil {
		t.Errorf("parsed config does not re-validate: %v", err)
	}
	// Encode writes every key a blk controller depends on, read_only = false
	// included, and neither bdev nor read_only for a scsi controller.
	data := string(roundTrip(t, c))
	for _, w := range []string{"name = \"b0\"\ntype = \"blk\"\nbdev = \"mem0\"\nread_only = false\n",
		"name = \"b1\"\ntype = \"blk\"\nbdev = \"m1\"\nread_only = true\n", "name = \"s0\"\ntype = \"scsi\"\ncpus = "} {
		if !strings.Contains(data, withCPU(w)) {
			t.Errorf("encoded config lacks %q:\n%s", w, data)
		}
	}
}

func TestParseErrors(t *testing.T) {
	tests := []struct {
		name string
		text string
		want []string // each must be a substring of the error
		// lines, when not 0, is the number of errors expected: one mistake
		// must not be reported again by every entry it affects.
		lines int
	}{
		{"syntax", head + "[[bdev]]\nname = \"x\n", []string{"e.toml: line 5: key bdev.name: strings cannot contain newlines"}, 0},
		{"type mismatch", head + "[[bdev]]\nname = \"m\"\nblock_size = \"512\"\n",
			[]string{"e.toml: line 6", "bdev.block_size", "incompatible types"}, 0},
		{"size fraction", head + strings.Replace(mallocBdev, `"1MiB"`, `"1.5GiB"`, 1) + ctrl0,
			[]string{`e.toml: bdev[0] "mem0": size: "1.5GiB" is not a whole number`}, 0},
		{"size negative", head + strings.Replace(mallocBdev, `"1MiB"`, `-1`, 1) + ctrl0,
			[]string{`bdev[0] "mem0": size: -1 is negative`}, 0},
		{"size negative string", head + strings.Replace(mallocBdev, `"1MiB"`, `"-1"`, 1) + ctrl0,
			[]string{`bdev[0] "mem0": size: "-1" is not a whole number`}, 0},
		{"size unit", head + strings.Replace(mallocBdev, `"1MiB"`, `"12XB"`, 1) + ctrl0,
			[]string{`bdev[0] "mem0": size: "12XB" has unknown unit "XB"`}, 0},
		{"size zero", head + strings.Replace(mallocBdev, `"1MiB"`, `0`, 1) + ctrl0,
			[]string{`bdev[0] "mem0": size: must be greater than 0`}, 0},
		{"size float", head + strings.Replace(mallocBdev, `"1MiB"`, `1.0`, 1) + ctrl0,
			[]string{`bdev[0] "mem0": size: must be an integer or a string`}, 0},
		{"size overflow", head + strings.Replace(mallocBdev, `"1MiB"`, `"16777216TiB"`, 1) + ctrl0,
			[]string{`bdev[0] "mem0": size: "16777216TiB" does not fit in 64 bits`}, 0},
		{"size missing", head + "[[bdev]]\nname = \"mem0\"\ntype = \"malloc\"\n" + ctrl0,
			[]string{`bdev[0] "mem0": size: required for type "malloc"`}, 0},
		{"size missing with create", head + "[[bdev]]\nname = \"mem0\"\ntype = \"file\"\npath = \"/x\"\ncreate = true\n" + ctrl0,
			[]string{`bdev[0] "mem0": size: required with create = true`}, 0},
		{"unknown key in bdev", head + strings.Replace(mallocBdev, `"1MiB"`, `"1MiB"`+"\nblock_size = 4096\nsize_x = 0", 1) + ctrl0,
			[]string{`unknown key "size_x"`}, 0},
		{"size not block multiple", head + strings.Replace(mallocBdev, `"1MiB"`, `6144`+"\nblock_size = 4096", 1) + ctrl0,
			[]string{`bdev[0] "mem0": size: 6144 bytes is not a multiple of the block size 4096`}, 0},
		{"block size", head + strings.Replace(mallocBdev, `"1MiB"`, `"1MiB"`+"\nblock_size = 1024", 1) + ctrl0,
			[]string{`bdev[0] "mem0": block_size: 1024 is not 512 or 4096`}, 0},
		{"bdev type unknown", head + strings.Replace(mallocBdev, `"malloc"`, `"nvme"`, 1) + ctrl0,
			[]string{`bdev[0] "mem0": type: "nvme" is not "malloc", "file", "aio", "error" or "rbd"`}, 0},
		{"bdev type missing", head + "[[bdev]]\nname = \"mem0\"\nsize = 4096\n" + ctrl0,
			[]string{`bdev[0] "mem0": type: required`}, 0},
		{"bdev name missing", head + "[[bdev]]\ntype = \"malloc\"\nsize = 4096\n" + mallocBdev + ctrl0,
			[]string{`e.toml: bdev[0]: name: required`}, 0},
		{"bdev name bad", head + "[[bdev]]\nname = \"a b\"\ntype = \"malloc\"\nsize = 4096\n" + mallocBdev + ctrl0,
			[]string{`bdev[0] "a b": name: "a b" contains ' '`}, 0},
		{"duplicate bdev", head + mallocBdev + mallocBdev + ctrl0,
			[]string{`bdev[1] "mem0": name: duplicate of bdev[0]`}, 0},
		{"duplicate uuid", head + mallocBdev + "uuid = \"00000000-0000-0000-0000-000000000001\"\n" +
			"[[bdev]]\nname = \"m1\"\ntype = \"malloc\"\nsize = 4096\nuuid = \"00000000-0000-0000-0000-000000000001\"\n" + ctrl0,
			[]string{`bdev[1] "m1": uuid: 00000000-0000-0000-0000-000000000001 is also the UUID of bdev[0] "mem0"`}, 0},
		{"uuid bad", head + mallocBdev + "uuid = \"xyz\"\n" + ctrl0,
			[]string{`bdev[0] "mem0": uuid: "xyz" is not a UUID`}, 0},
		{"uuid zero", head + mallocBdev + "uuid = \"00000000-0000-0000-0000-000000000000\"\n" + ctrl0,
			[]string{`bdev[0] "mem0": uuid: must not be all zeros`}, 0},
		{"file without path", head + "[[bdev]]\nname = \"mem0\"\ntype = \"file\"\n" + ctrl0,
			[]string{`bdev[0] "mem0": path: required for type "file"`}, 0},
		{"aio without path", head + "[[bdev]]\nname = \"mem0\"\ntype = \"aio\"\n" + ctrl0,
			[]string{`bdev[0] "mem0": path: required for type "aio"`}, 0},
		{"relative path", head + "[[bdev]]\nname = \"mem0\"\ntype = \"aio\"\npath = \"disk.img\"\n" + ctrl0,
			[]string{`bdev[0] "mem0": path: "disk.img" is not an absolute path`}, 0},
		{"engine bad", head + "[[bdev]]\nname = \"mem0\"\ntype = \"aio\"\npath = \"/x\"\nengine = \"spdk\"\n" + ctrl0,
			[]string{`bdev[0] "mem0": engine: "spdk" is not "auto", "uring" or "libaio"`}, 0},
		{"engine on file", head + "[[bdev]]\nname = \"mem0\"\ntype = \"file\"\npath = \"/x\"\nengine = \"uring\"\n" + ctrl0,
			[]string{`bdev[0] "mem0": engine: not used by type "file"`}, 0},
		{"hugepages bad", head + mallocBdev + "hugepages = \"1g\"\n" + ctrl0,
			[]string{`e.toml: bdev[0] "mem0": hugepages: "1g" is not "auto", "hugetlb", "thp" or "none"`}, 1},
		{"hugepages empty", head + mallocBdev + "hugepages = \"\"\n" + ctrl0,
			[]string{`e.toml: bdev[0] "mem0": hugepages: "" is not "auto", "hugetlb", "thp" or "none"`}, 1},
		{"hugepages case", head + mallocBdev + "hugepages = \"THP\"\n" + ctrl0,
			[]string{`e.toml: bdev[0] "mem0": hugepages: "THP" is not "auto", "hugetlb", "thp" or "none"`}, 1},
		{"hugepages not a string", head + mallocBdev + "hugepages = true\n" + ctrl0,
			[]string{"e.toml: line 8", "bdev.hugepages", "incompatible types"}, 0},
		{"hugepages on aio", head + "[[bdev]]\nname = \"mem0\"\ntype = \"aio\"\npath = \"/x\"\nhugepages = \"thp\"\n" + ctrl0,
			[]string{`bdev[0] "mem0": hugepages: not used by type "aio"`}, 1},
		{"hugepages on error", head + mallocBdev + "[[bdev]]\nname = \"err0\"\ntype = \"error\"\nbase = \"mem0\"\nhugepages = \"none\"\n" +
			"[[bdev.inject]]\nop = \"read\"\nerror = \"eio\"\n" + ctrl0,
			[]string{`bdev[1] "err0": hugepages: not used by type "error"`}, 1},
		{"workers zero", head + "[[bdev]]\nname = \"mem0\"\ntype = \"file\"\npath = \"/x\"\nworkers = 0\n" + ctrl0,
			[]string{`bdev[0] "mem0": workers: 0 is out of range 1..64`}, 0},
		{"workers high", head + "[[bdev]]\nname = \"mem0\"\ntype = \"file\"\npath = \"/x\"\nworkers = 65\n" + ctrl0,
			[]string{`bdev[0] "mem0": workers: 65 is out of range 1..64`}, 0},
		{"workers on aio", head + "[[bdev]]\nname = \"mem0\"\ntype = \"aio\"\npath = \"/x\"\nworkers = 2\n" + ctrl0,
			[]string{`bdev[0] "mem0": workers: not used by type "aio"`}, 0},
		{"queue depth zero", head + "[[bdev]]\nname = \"mem0\"\ntype = \"aio\"\npath = \"/x\"\nqueue_depth = 0\n" + ctrl0,
			[]string{`bdev[0] "mem0": queue_depth: 0 is out of range 1..4096`}, 0},
		{"queue depth high", head + "[[bdev]]\nname = \"mem0\"\ntype = \"aio\"\npath = \"/x\"\nqueue_depth = 4097\n" + ctrl0,
			[]string{`bdev[0] "mem0": queue_depth: 4097 is out of range 1..4096`}, 0},
		{"queue depth on malloc", head + mallocBdev + "queue_depth = 8\n" + ctrl0,
			[]string{`bdev[0] "mem0": queue_depth: not used by type "malloc"`}, 0},
		{"queue depth file zero", head + "[[bdev]]\nname = \"mem0\"\ntype = \"file\"\npath = \"/x\"\nqueue_depth = 0\n" + ctrl0,
			[]string{`bdev[0] "mem0": queue_depth: 0 is out of range 1..4096`}, 0},
		{"error without base", head + mallocBdev + "[[bdev]]\nname = \"err0\"\ntype = \"error\"\n" + ctrl0,
			[]string{`bdev[1] "err0": base: required for type "error"`}, 1},
		{"error base undefined", head + mallocBdev + "[[bdev]]\nname = \"err0\"\ntype = \"error\"\nbase = \"nope\"\n" + ctrl0,
			[]string{`bdev[1] "err0": base: bdev "nope" is not defined`}, 1},
		{"error base later", head + "[[bdev]]\nname = \"err0\"\ntype = \"error\"\nbase = \"mem0\"\n" + mallocBdev + ctrl0,
			[]string{`bdev[0] "err0": base: bdev "mem0" must be defined before this entry`}, 1},
		{"error base itself", head + mallocBdev + "[[bdev]]\nname = \"err0\"\ntype = \"error\"\nbase = \"err0\"\n" + ctrl0,
			[]string{`bdev[1] "err0": base: bdev "err0" must be defined before this entry`}, 1},
		{"error keys of other types", head + mallocBdev + "[[bdev]]\nname = \"err0\"\ntype = \"error\"\nbase = \"mem0\"\n" + "size = 4096\nblock_size = 512\npath = \"/x\"\nworkers = 2\nqueue_depth = 4\n" + ctrl0,
			[]string{`bdev[1] "err0": size: not used by type "error"`, `block_size: not used by type "error"`,
				`path: not used by type "error"`, `workers: not used by type "error"`, `queue_depth: not used by type "error"`}, 5},
		{"base on malloc", head + mallocBdev + "base = \"x\"\n[[bdev.inject]]\nop = \"read\"\nerror = \"eio\"\n" + ctrl0,
			[]string{`bdev[0] "mem0": base: not used by type "malloc"`, `bdev[0] "mem0": inject: not used by type "malloc"`}, 2},
		{"inject bad", head + mallocBdev + "[[bdev]]\nname = \"err0\"\ntype = \"error\"\nbase = \"mem0\"\n" +
			"[[bdev.inject]]\nop = \"reed\"\nlba_start = -1\nlba_count = -2\nerror = \"enospc\"\ndelay = \"soon\"\ncount = -1\n" +
			"[[bdev.inject]]\nop = \"flush\"\n" +
			"[[bdev.inject]]\nop = \"all\"\ndelay = \"2m\"\n" +
			"[[bdev.inject]]\nop = \"read\"\nlba_start = 9223372036854775807\nlba_count = 9223372036854775807\nlba_count_x = 1\nerror = \"eio\"\n" + ctrl0,
			[]string{`bdev[1] "err0": inject[0].op: "reed" is not one of all, read, write, flush, unmap, write_zeroes, write_same`,
				`inject[0].lba_start: -1 is negative`, `inject[0].lba_count: -2 is negative`, `inject[0].error: "enospc" is not "eio"`,
				`inject[0].delay: "soon" is not a duration`, `inject[0].count: -1 is negative`, `bdev[1] "err0": inject[1]: injects nothing`,
				`inject[2].delay: 2m0s is out of range 0..1m0s`, `unknown key "inject[3].lba_count_x"`}, 0},
		{"path on malloc", head + mallocBdev + "path = \"/x\"\nread_only = true\n" + ctrl0,
			[]string{`bdev[0] "mem0": path: not used by type "malloc"`, `bdev[0] "mem0": read_only: not used by type "malloc"`}, 0},
		{"create read only", head + "[[bdev]]\nname = \"mem0\"\ntype = \"file\"\npath = \"/x\"\nsize = 4096\ncreate = true\nread_only = true\n" + ctrl0,
			[]string{`bdev[0] "mem0": create: create = true with read_only = true`}, 0},
		{"bdev undefined", head + mallocBdev + ctrl0 + "[[controller]]\nname = \"vhost.1\"\n[[controller.lun]]\ntarget = 0\nbdev = \"mem9\"\n",
			[]string{`e.toml: controller[1] "vhost.1": lun[0].bdev: bdev "mem9" is not defined`}, 0},
		{"lun bdev missing", head + mallocBdev + "[[controller]]\nname = \"vhost.0\"\n[[controller.lun]]\ntarget = 0\n",
			[]string{`controller[0] "vhost.0": lun[0].bdev: required`}, 0},
		{"bdev used twice", head + mallocBdev + ctrl0 + "[[controller]]\nname = \"vhost.1\"\n[[controller.lun]]\ntarget = 0\nbdev = \"mem0\"\n",
			[]string{`controller[1] "vhost.1": lun[0].bdev: bdev "mem0" is already used by controller[0] "vhost.0" lun[0]`}, 0},
		{"duplicate controller", head + mallocBdev + "[[bdev]]\nname = \"m1\"\ntype = \"malloc\"\nsize = 4096\n" + ctrl0 +
			"[[controller]]\nname = \"vhost.0\"\n[[controller.lun]]\ntarget = 0\nbdev = \"m1\"\n",
			[]string{`controller[1] "vhost.0": name: duplicate of controller[0]`}, 0},
		{"duplicate target lun", head + mallocBdev + "[[bdev]]\nname = \"m1\"\ntype = \"malloc\"\nsize = 4096\n" + ctrl0 +
			"[[controller.lun]]\ntarget = 0\nlun = 0\nbdev = \"m1\"\n",
			[]string{`controller[0] "vhost.0": lun[1]: target 0 lun 0 is also lun[0]`}, 0},
		{"target range", head + mallocBdev + "[[controller]]\nname = \"vhost.0\"\n[[controller.lun]]\ntarget = 256\nbdev = \"mem0\"\n",
			[]string{`controller[0] "vhost.0": lun[0].target: 256 is out of range 0..255`}, 0},
		{"target negative", head + mallocBdev + "[[controller]]\nname = \"vhost.0\"\n[[controller.lun]]\ntarget = -1\nbdev = \"mem0\"\n",
			[]string{`controller[0] "vhost.0": lun[0].target: -1 is out of range 0..255`}, 0},
		{"target missing", head + mallocBdev + "[[controller]]\nname = \"vhost.0\"\n[[controller.lun]]\nbdev = \"mem0\"\n",
			[]string{`controller[0] "vhost.0": lun[0].target: required`}, 0},
		{"lun range", head + mallocBdev + "[[controller]]\nname = \"vhost.0\"\n[[controller.lun]]\ntarget = 0\nlun = 16384\nbdev = \"mem0\"\n",
			[]string{`controller[0] "vhost.0": lun[0].lun: 16384 is out of range 0..16383`}, 0},
		{"controller type unknown", head + mallocBdev + strings.Replace(ctrl0, "[[controller.lun]]", "type = \"nvme\"\n[[controller.lun]]", 1),
			[]string{`e.toml: controller[0] "vhost.0": type: "nvme" is not "scsi" or "blk"`}, 1},
		{"controller type empty", head + mallocBdev + strings.Replace(ctrl0, "[[controller.lun]]", "type = \"\"\n[[controller.lun]]", 1),
			[]string{`controller[0] "vhost.0": type: "" is not "scsi" or "blk"`}, 1},
		{"controller type case", head + mallocBdev + "[[controller]]\nname = \"b0\"\ntype = \"BLK\"\nbdev = \"mem0\"\n",
			[]string{`controller[0] "b0": type: "BLK" is not "scsi" or "blk"`}, 1},
		{"controller type not a string", head + mallocBdev + "[[controller]]\nname = \"b0\"\ntype = 1\n",
			[]string{"e.toml: line 10", "controller.type", "incompatible types"}, 0},
		{"blk without bdev", head + mallocBdev + "[[controller]]\nname = \"b0\"\ntype = \"blk\"\n",
			[]string{`e.toml: controller[0] "b0": bdev: required for type "blk"`}, 1},
		{"blk bdev empty", head + mallocBdev + "[[controller]]\nname = \"b0\"\ntype = \"blk\"\nbdev = \"\"\n",
			[]string{`controller[0] "b0": bdev: required for type "blk"`}, 1},
		{"blk bdev undefined", head + mallocBdev + "[[controller]]\nname = \"b0\"\ntype = \"blk\"\nbdev = \"mem9\"\n",
			[]string{`e.toml: controller[0] "b0": bdev: bdev "mem9" is not defined`}, 1},
		{"blk with luns", head + mallocBdev + "[[bdev]]\nname = \"m1\"\ntype = \"malloc\"\nsize = 4096\n" +
			"[[controller]]\nname = \"b0\"\ntype = \"blk\"\nbdev = \"mem0\"\n[[controller.lun]]\ntarget = 0\nbdev = \"m1\"\n",
			[]string{`e.toml: controller[0] "b0": lun: not used by type "blk": a blk controller serves one bdev, named by key bdev`}, 1},
		{"blk with luns instead of bdev", head + mallocBdev + "[[controller]]\nname = \"b0\"\ntype = \"blk\"\n[[controller.lun]]\ntarget = 0\nbdev = \"mem0\"\n",
			[]string{`controller[0] "b0": lun: not used by type "blk"`, `controller[0] "b0": bdev: required for type "blk"`}, 2},
		{"blk bad key", head + mallocBdev + "[[controller]]\nname = \"b0\"\ntype = \"blk\"\nbdev = \"mem0\"\nreadonly = true\n",
			[]string{`controller[0] "b0": unknown key "readonly"`}, 1},
		{"blk read only not a bool", head + mallocBdev + "[[controller]]\nname = \"b0\"\ntype = \"blk\"\nbdev = \"mem0\"\nread_only = \"yes\"\n",
			[]string{"e.toml: line 12", "controller.read_only", "incompatible types"}, 0},
		{"blk num queues", head + mallocBdev + "[[controller]]\nname = \"b0\"\ntype = \"blk\"\nbdev = \"mem0\"\nnum_queues = 65\nmax_sessions = 0\ncpus = [4095]\n",
			[]string{`controller[0] "b0": num_queues: 65 is out of range 1..64`, `controller[0] "b0": max_sessions: 0 is out of range 1..8`,
				`controller[0] "b0": cpus[0]: CPU 4095 has no reactor`}, 3},
		{"scsi with bdev", head + mallocBdev + strings.Replace(ctrl0, "[[controller.lun]]", "bdev = \"mem0\"\n[[controller.lun]]", 1),
			[]string{`e.toml: controller[0] "vhost.0": bdev: not used by type "scsi": its bdevs are [[controller.lun]] entries (type = "blk" serves one bdev)`}, 1},
		{"scsi with read only", head + mallocBdev + strings.Replace(ctrl0, "[[controller.lun]]", "type = \"scsi\"\nread_only = true\n[[controller.lun]]", 1),
			[]string{`controller[0] "vhost.0": read_only: not used by type "scsi"`}, 1},
		{"blk bdev used by a lun", head + mallocBdev + ctrl0 + "[[controller]]\nname = \"b0\"\ntype = \"blk\"\nbdev = \"mem0\"\n",
			[]string{`e.toml: controller[1] "b0": bdev: bdev "mem0" is already used by controller[0] "vhost.0" lun[0]`}, 1},
		{"lun bdev used by blk", head + mallocBdev + "[[controller]]\nname = \"b0\"\ntype = \"blk\"\nbdev = \"mem0\"\n" + ctrl0,
			[]string{`e.toml: controller[1] "vhost.0": lun[0].bdev: bdev "mem0" is already used by controller[0] "b0"`}, 1},
		{"blk bdev used twice", head + mallocBdev + "[[controller]]\nname = \"b0\"\ntype = \"blk\"\nbdev = \"mem0\"\n" +
			"[[controller]]\nname = \"b1\"\ntype = \"blk\"\nbdev = \"mem0\"\nread_only = true\n",
			[]string{`controller[1] "b1": bdev: bdev "mem0" is already used by controller[0] "b0"`}, 1},
		{"rpc socket relative", head + "[rpc]\nsocket = \"r.sock\"\n" + mallocBdev + ctrl0,
			[]string{`rpc.socket: "r.sock" is not an absolute path`}, 0},
		{"rpc socket is a controller's", head + "[rpc]\nsocket = \"/tmp/vt/vhost.0\"\n" + mallocBdev + ctrl0,
			[]string{`rpc.socket: "/tmp/vt/vhost.0" is also the socket of controller[0] "vhost.0"`}, 0},
		{"rpc socket mode", head + "[rpc]\nsocket_mode = \"1777\"\n" + mallocBdev + ctrl0,
			[]string{`rpc.socket_mode: "1777" has bits above 0777`}, 0},
		{"rpc socket owner", head + "[rpc]\nsocket_owner = \"no-such-user-xyz\"\n" + mallocBdev + ctrl0,
			[]string{`rpc.socket_owner: unknown user "no-such-user-xyz"`}, 0},
		{"controller name slash", head + mallocBdev + strings.Replace(ctrl0, "vhost.0", "a/b", 1),
			[]string{`controller[0] "a/b": name: "a/b" contains '/'`}, 0},
		{"controller name dotdot", head + mallocBdev + strings.Replace(ctrl0, "vhost.0", "..", 1),
			[]string{`controller[0] "..": name: ".." is not a usable file name`}, 0},
		{"controller name dot", head + mallocBdev + strings.Replace(ctrl0, "vhost.0", ".", 1),
			[]string{`controller[0] ".": name: "." is not a usable file name`}, 0},
		{"controller name empty", head + mallocBdev + strings.Replace(ctrl0, `"vhost.0"`, `""`, 1),
			[]string{`controller[0]: name: required`}, 0},
		{"controller name long", head + mallocBdev + strings.Replace(ctrl0, "vhost.0", strings.Repeat("x", 65), 1),
			[]string{`name: is 65 bytes, more than 64`}, 0},
		{"num queues zero", head + mallocBdev + strings.Replace(ctrl0, "[[controller.lun]]", "num_queues = 0\n[[controller.lun]]", 1),
			[]string{`controller[0] "vhost.0": num_queues: 0 is out of range 1..64`}, 0},
		{"num queues high", head + mallocBdev + strings.Replace(ctrl0, "[[controller.lun]]", "num_queues = 65\n[[controller.lun]]", 1),
			[]string{`controller[0] "vhost.0": num_queues: 65 is out of range 1..64`}, 0},
		{"max sessions zero", head + mallocBdev + strings.Replace(ctrl0, "[[controller.lun]]", "max_sessions = 0\n[[controller.lun]]", 1),
			[]string{`controller[0] "vhost.0": max_sessions: 0 is out of range 1..8`}, 0},
		{"max sessions high", head + mallocBdev + strings.Replace(ctrl0, "[[controller.lun]]", "max_sessions = 9\n[[controller.lun]]", 1),
			[]string{`controller[0] "vhost.0": max_sessions: 9 is out of range 1..8`}, 0},
		{"socket mode integer", head + mallocBdev + strings.Replace(ctrl0, "[[controller.lun]]", "socket_mode = 600\n[[controller.lun]]", 1),
			[]string{`controller[0] "vhost.0": socket_mode: must be an octal string such as "0660", not an integer`}, 0},
		{"socket mode not octal", head + mallocBdev + strings.Replace(ctrl0, "[[controller.lun]]", "socket_mode = \"0680\"\n[[controller.lun]]", 1),
			[]string{`controller[0] "vhost.0": socket_mode: "0680" is not an octal string`}, 0},
		{"socket mode high", head + mallocBdev + strings.Replace(ctrl0, "[[controller.lun]]", "socket_mode = \"4755\"\n[[controller.lun]]", 1),
			[]string{`controller[0] "vhost.0": socket_mode: "4755" has bits above 0777`}, 0},
		{"socket owner unknown", head + mallocBdev + strings.Replace(ctrl0, "[[controller.lun]]", "socket_owner = \"no-such-user-xq\"\nsocket_group = \"no-such-group-xq\"\n[[controller.lun]]", 1),
			[]string{`controller[0] "vhost.0": socket_owner: unknown user "no-such-user-xq"`,
				`controller[0] "vhost.0": socket_group: unknown group "no-such-group-xq"`}, 0},
		{"reactor cpu absent", "[reactors]\ncpus = [4096]\n" + mallocBdev + ctrl0,
			[]string{`e.toml: reactors.cpus[0]: CPU 4096 is not one this process may run on`}, 0},
		{"reactor cpu negative", "[reactors]\ncpus = [-1]\n" + mallocBdev + ctrl0,
			[]string{`reactors.cpus[0]: CPU -1 is not one this process may run on`}, 0},
		{"reactor cpu twice", "[reactors]\ncpus = [@CPU@, @CPU@]\n" + mallocBdev + ctrl0,
			[]string{`reactors.cpus[1]: CPU @CPU@ is listed twice`}, 1},
		{"reactor cpus empty", "[reactors]\ncpus = []\n" + mallocBdev + ctrl0,
			[]string{`reactors.cpus: must list at least one CPU`}, 1},
		{"poll bad", "[reactors]\npoll = \"lazy\"\n" + mallocBdev + ctrl0,
			[]string{`reactors.poll: "lazy" is not "busy" or "adaptive"`}, 0},
		{"controller cpu not reactor", head + mallocBdev + strings.Replace(ctrl0, "[[controller.lun]]", "cpus = [4095]\n[[controller.lun]]", 1),
			[]string{`controller[0] "vhost.0": cpus[0]: CPU 4095 has no reactor`}, 0},
		{"controller cpu twice", head + mallocBdev + strings.Replace(ctrl0, "[[controller.lun]]", "cpus = [@CPU@, @CPU@]\n[[controller.lun]]", 1),
			[]string{`controller[0] "vhost.0": cpus[1]: CPU @CPU@ is listed twice`}, 0},
		{"controller cpus empty", head + mallocBdev + strings.Replace(ctrl0, "[[controller.lun]]", "cpus = []\n[[controller.lun]]", 1),
			[]string{`controller[0] "vhost.0": cpus: must list at least one CPU`}, 0},
		{"socket dir relative", strings.Replace(head, "/tmp/vt", "run/vt", 1) + mallocBdev + ctrl0,
			[]string{`socket_dir: "run/vt" is not an absolute path`}, 0},
		{"listen bad", "[metrics]\nlisten = \"localhost\"\n" + mallocBdev + ctrl0,
			[]string{`metrics.listen: "localhost" is not host:port`}, 0},
		{"listen port bad", "[metrics]\nlisten = \"127.0.0.1:http\"\n" + mallocBdev + ctrl0,
			[]string{`metrics.listen: "127.0.0.1:http": port "http" is not a number`}, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := Parse([]byte(withCPU(tt.text)), "e.toml")
			if err == nil {
				t.Fatalf("accepted: %+v", c)
			}
			if c != nil {
				t.Errorf("returned a config with the error")
			}
			if n := strings.Count(err.Error(), "\n") + 1; tt.lines != 0 && n != tt.lines {
				t.Errorf("%d errors, want %d:\n%v", n, tt.lines, err)
			}
			for _, w := range tt.want {
				if w = withCPU(w); !strings.Contains(err.Error(), w) {
					t.Errorf("error does not contain %q:\n%v", w, err)
				}
			}
		})
	}
}

// TestParseCollectsAllErrors checks that one pass reports every mistake,
// and that a bad LUN address is not compared with the others.
func TestParseCollectsAllErrors(t *testing.T) {
	text := head + `
[[bdev]]
name = "mem0"
type = "malloc"
size = "1.5GiB"
[[bdev]]
name = "mem1"
type = "ssd"
size = 4096
[[controller]]
name = "vhost.0"
num_queues = 100
[[controller.lun]]
target = 300
bdev = "mem0"
[[controller.lun]]
target = 0
bdev = "mem1"
`
	_, err := Parse([]byte(withCPU(text)), "e.toml")
	if err == nil {
		t.Fatal("accepted")
	}
	lines := strings.Split(err.Error(), "\n")
	want := []string{
		`e.toml: bdev[0] "mem0": size: "1.5GiB" is not a whole number`,
		`e.toml: controller[0] "vhost.0": lun[0].target: 300 is out of range 0..255`,
		`e.toml: bdev[1] "mem1": type: "ssd" is not`,
		`e.toml: controller[0] "vhost.0": num_queues: 100 is out of range 1..64`,
	}
	if len(lines) != len(want) {
		t.Errorf("got %d errors, want %d:\n%v", len(lines), len(want), err)
	}
	for i := range min(len(lines), len(want)) {
		if !strings.HasPrefix(lines[i], want[i]) {
			t.Errorf("error %d = %q, want prefix %q", i, lines[i], want[i])
		}
	}
}

func TestParseUnknownKeysListed(t *testing.T) {
	text := head + `
typo_top = 1
[metrics]
listn = "x"
[[bdev]]
name = "mem0"
type = "malloc"
size = 4096
sizee = 1
[[bdev]]
name = "mem1"
type = "malloc"
size = 4096
[[controller]]
name = "vhost.0"
[[controller.lun]]
target = 0
bdev = "mem0"
tgt = 1
[[controller.lun]]
target = 1
bdev = "mem1"
[nonsense]
a = 1
b = 2
`
	_, err := Parse([]byte(withCPU(text)), "u.toml")
	if err == nil {
		t.Fatal("accepted")
	}
	want := []string{
		`u.toml: unknown key "reactors.typo_top"`,
		`u.toml: unknown key "metrics.listn"`,
		`u.toml: bdev[0] "mem0": unknown key "sizee"`,
		`u.toml: controller[0] "vhost.0": unknown key "lun[0].tgt"`,
		`u.toml: unknown key "nonsense"`,
	}
	got := strings.Split(err.Error(), "\n")
	slicesSort(got)
	slicesSort(want)
	if !reflect.DeepEqual(got, want) {
		t.Errorf("got\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}

func slicesSort(s []string) {
	for i := range s {
		for j := i + 1; j < len(s); j++ {
			if s[j] < s[i] {
				s[i], s[j] = s[j], s[i]
			}
		}
	}
}

// TestSocketPathLength checks the sun_path boundary: a 107-byte path is
// accepted and a 108-byte one refused.
func TestSocketPathLength(t *testing.T) {
	const name = "vhost.0"
	for _, n := range []int{107, 108} {
		dir := "/" + strings.Repeat("d", n-len(name)-2) // "/" + d... + "/" + name
		// The RPC socket (default socket_dir/rpc.sock) is placed elsewhere:
		// this test is about the controller's path.
		text := strings.Replace(head, "/tmp/vt", dir, 1) + "[rpc]\nsocket = \"/tmp/r.sock\"\n" + mallocBdev + ctrl0
		c, err := Parse([]byte(withCPU(text)), "s.toml")
		if n <= SocketPathMax {
			if err != nil {
				t.Fatalf("%d bytes: %v", n, err)
			}
			if p := c.SocketPath(&c.Controllers[0]); len(p) != n {
				t.Fatalf("path is %d bytes, want %d", len(p), n)
			}
			continue
		}
		if err == nil || !strings.Contains(err.Error(), `controller[0] "vhost.0": name: socket path`) ||
			!strings.Contains(err.Error(), "is 108 bytes") {
			t.Errorf("%d bytes: err = %v", n, err)
		}
	}
}

func TestDefault(t *testing.T) {
	c := Default()
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	if c.Metrics.Listen != "127.0.0.1:9478" || c.Reactors.Poll != PollBusy || !reflect.DeepEqual(c.Reactors.CPUs, []int{cpu}) {
		t.Errorf("default = %+v", c)
	}
	if len(c.Bdevs) != 1 || !reflect.DeepEqual(c.Bdevs[0], Bdev{Name: "mem0", Type: "malloc", Size: 256 << 20, BlockSize: 512,
		Hugepages: HugepagesAuto, UUID: BdevUUID("mem0")}) {
		t.Errorf("bdevs = %+v", c.Bdevs)
	}
	if len(c.Controllers) != 1 || c.Controllers[0].Name != "vhost.0" || c.Controllers[0].Type != ControllerSCSI ||
		c.Controllers[0].NumQueues != NumQueuesDefault ||
		!reflect.DeepEqual(c.Controllers[0].LUNs, []LUN{{0, 0, "mem0"}}) {
		t.Errorf("controllers = %+v", c.Controllers)
	}
	// Default hands out fresh slices: changing one copy leaves the next intact.
	c.Bdevs[0].Name = "changed"
	if Default().Bdevs[0].Name != "mem0" {
		t.Error("Default shares state between calls")
	}
}

// TestValidateHandBuilt checks Validate on a Config built in Go: it reports
// zero values that Parse would have defaulted, with the generic source name.
func TestValidateHandBuilt(t *testing.T) {
	c := &Config{SocketDir: "/tmp/vt", Reactors: Reactors{CPUs: []int{cpu}, Poll: PollBusy},
		Bdevs:       []Bdev{{Name: "m", Type: TypeMalloc, Size: 4096}},
		Controllers: []Controller{{Name: "c", CPUs: []int{cpu}, LUNs: []LUN{{Bdev: "m"}}}}}
	err := c.Validate()
	for _, w := range []string{
		`config: bdev[0] "m": block_size: 0 is not 512 or 4096`,
		`config: bdev[0] "m": uuid: must not be all zeros`,
		`config: bdev[0] "m": hugepages: "" is not "auto", "hugetlb", "thp" or "none"`,
		`config: controller[0] "c": num_queues: 0 is out of range 1..64`,
	} {
		if err == nil || !strings.Contains(err.Error(), w) {
			t.Errorf("error does not contain %q: %v", w, err)
		}
	}
}

func TestDefaultSocketDir(t *testing.T) {
	got := DefaultSocketDir()
	switch uid := os.Getuid(); {
	case uid == 0:
		if got != "/var/run/vhost-target" {
			t.Errorf("as root: %q", got)
		}
	default:
		t.Setenv("XDG_RUNTIME_DIR", "/run/user/1000")
		if got := DefaultSocketDir(); got != "/run/user/1000/vhost-target" {
			t.Errorf("with XDG_RUNTIME_DIR: %q", got)
		}
		t.Setenv("XDG_RUNTIME_DIR", "")
		if got := DefaultSocketDir(); got != fmt.Sprintf("/tmp/vhost-target-%d", uid) {
			t.Errorf("without XDG_RUNTIME_DIR: %q", got)
		}
	}
}

func TestSocketIDs(t *testing.T) {
	tests := []struct {
		owner, group string
		uid, gid     int
		err          string
	}{
		{"", "", -1, -1, ""},
		{"root", "root", 0, 0, ""},
		{"1234", "5678", 1234, 5678, ""},
		{"no-such-user-xq", "", -1, -1, `socket_owner: unknown user "no-such-user-xq"`},
		{"", "no-such-group-xq", -1, -1, `socket_group: unknown group "no-such-group-xq"`},
	}
	for _, tt := range tests {
		ctrl := Controller{Name: "c", SocketOwner: tt.owner, SocketGroup: tt.group}
		uid, gid, err := ctrl.SocketIDs()
		if uid != tt.uid || gid != tt.gid || (err == nil) != (tt.err == "") ||
			(err != nil && !strings.Contains(err.Error(), tt.err)) {
			t.Errorf("%q/%q: got %d, %d, %v", tt.owner, tt.group, uid, gid, err)
		}
	}
}

func TestParseSize(t *testing.T) {
	tests := []struct {
		in   string
		want uint64
		err  string
	}{
		{"0", 0, ""},
		{"512", 512, ""},
		{"4096B", 4096, ""},
		{"1K", 1024, ""},
		{"1KiB", 1024, ""},
		{"1KB", 1000, ""},
		{"3M", 3 << 20, ""},
		{"3MiB", 3 << 20, ""},
		{"3MB", 3e6, ""},
		{"2G", 2 << 30, ""},
		{"2GiB", 2 << 30, ""},
		{"2GB", 2e9, ""},
		{"5T", 5 << 40, ""},
		{"5TiB", 5 << 40, ""},
		{"5TB", 5e12, ""},
		{" 1 GiB ", 1 << 30, ""},
		{"16777215TiB", 16777215 << 40, ""},
		{"18446744073709551615", 1<<64 - 1, ""},
		{"18446744073709551616", 0, "does not fit"},
		{"16777216TiB", 0, "does not fit"},
		{"1.5GiB", 0, "not a whole number"},
		{"-1", 0, "not a whole number"},
		{"+1", 0, "not a whole number"},
		{"1e9", 0, "unknown unit"},
		{"12XB", 0, "unknown unit \"XB\""},
		{"1gib", 0, "unknown unit"},
		{"GiB", 0, "not a whole number"},
		{"", 0, "not a whole number"},
		{"0x10", 0, "unknown unit"},
	}
	for _, tt := range tests {
		got, err := ParseSize(tt.in)
		if tt.err == "" {
			if err != nil || got != tt.want {
				t.Errorf("ParseSize(%q) = %d, %v; want %d", tt.in, got, err, tt.want)
			}
			continue
		}
		if err == nil || !strings.Contains(err.Error(), tt.err) {
			t.Errorf("ParseSize(%q) = %d, %v; want error containing %q", tt.in, got, err, tt.err)
		}
	}
}

func TestBdevUUID(t *testing.T) {
	a := BdevUUID("mem0")
	if a != BdevUUID("mem0") {
		t.Fatal("not stable")
	}
	if a == BdevUUID("mem1") {
		t.Fatal("two names share a UUID")
	}
	if a[6]>>4 != 5 || a[8]>>6 != 2 {
		t.Errorf("version/variant bits wrong: % x", a)
	}
	// Pinned: a change here changes every guest's disk identity.
	if got := FormatUUID(a); got != "68f1539f-db05-5bef-ba5d-2287674ae474" {
		t.Errorf("BdevUUID(mem0) = %s", got)
	}
	u, err := ParseUUID(FormatUUID(a))
	if err != nil || u != a {
		t.Errorf("round trip: %v, %v", u, err)
	}
	for _, bad := range []string{"", "68f1539f-db05-5bef-ba5d-2287674ae47", "68f1539fxdb05-5bef-ba5d-2287674ae474", "g8f1539f-db05-5bef-ba5d-2287674ae474"} {
		if _, err := ParseUUID(bad); err == nil {
			t.Errorf("ParseUUID(%q) accepted", bad)
		}
	}
}

// TestLoad checks Load's file handling and that errors name the file.
func TestLoad(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "target.toml")
	if err := os.WriteFile(path, []byte(withCPU(head+mallocBdev+ctrl0)), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := Load(path); err != nil {
		t.Fatal(err)
	}
	_, err := Load(filepath.Join(dir, "missing.toml"))
	if !errors.Is(err, os.ErrNotExist) {
		t.Errorf("missing file: %v", err)
	}
	if err := os.WriteFile(path, []byte("[[bdev]]\nname = 1\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := Load(path); err == nil || !strings.HasPrefix(err.Error(), path+": line 2") {
		t.Errorf("bad file: %v", err)
	}
}
