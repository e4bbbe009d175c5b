package config

import (
	"reflect"
	"strings"
	"testing"
	"time"
)

// roundTrip encodes c, parses the result and requires an equal Config.
func roundTrip(t *testing.T, c *Config) []byte {
	t.Helper()
	data, err := c.Encode("written by a test\nsecond line")
	if err != nil {
		t.Fatal(err)
	}
	got, err := Parse(data, c.source)
	if err != nil {
		t.Fatalf("encoded config does not parse: %v\n%s", err, data)
	}
	if !reflect.DeepEqual(got, c) {
		t.Fatalf("round trip changed the config:\ngot  %+v\nwant %+v\n%s", got, c, data)
	}
	return data
}

func TestEncodeRoundTrip(t *testing.T) {
	full, err := Parse([]byte(withCPU(fullExample)), "full.toml")
	if err != nil {
		t.Fatal(err)
	}
	roundTrip(t, full)

	def := Default()
	def.source = "d.toml"
	data := roundTrip(t, def)
	if !strings.HasPrefix(string(data), "# written by a test\n# second line\n") {
		t.Errorf("header missing:\n%s", data)
	}

	deploy, err := Load("../deploy/target.toml")
	if err != nil {
		t.Fatal(err)
	}
	roundTrip(t, deploy)
}

// TestEncodeEveryKey covers what the examples lack: error bdevs with
// injections, a controller without LUNs, RPC socket settings, no metrics.
func TestEncodeEveryKey(t *testing.T) {
	text := head + `
[metrics]
listen = ""
[rpc]
socket = ""
socket_mode = "0640"
socket_owner = "0"
` + mallocBdev + `
[[bdev]]
name = "err0"
type = "error"
base = "mem0"
[[bdev.inject]]
op = "write"
lba_start = 8
lba_count = 16
error = "eio"
delay = "1.5ms"
[[bdev.inject]]
op = "all"
delay = "2s"
count = 3
[[bdev]]
name = "f0"
type = "aio"
path = "/var/tmp/x y\"z.img"
create = true
size = "1MiB"
block_size = 4096
engine = "libaio"
queue_depth = 7
[[bdev]]
name = "f1"
type = "file"
path = "/dev/sdq"
read_only = true
workers = 3
[[controller]]
name = "empty"
num_queues = 2
max_sessions = 2
migration = false
[[controller]]
name = "vhost.0"
socket_mode = "0666"
[[controller.lun]]
target = 7
lun = 9
bdev = "err0"
[[controller.lun]]
target = 0
bdev = "f0"
`
	c, err := Parse([]byte(withCPU(text)), "every.toml")
	if err != nil {
		t.Fatal(err)
	}
	if c.Bdevs[1].Inject[0].Delay != 1500*time.Microsecond || len(c.Controllers[0].LUNs) != 0 {
		t.Fatalf("parsed %+v", c)
	}
	roundTrip(t, c)
}

// TestClone checks that a clone shares no slice with the original: runtime
// changes are made to a clone and must not leak into the running config
// when they are refused.
func TestClone(t *testing.T) {
	c, err := Parse([]byte(withCPU(fullExample)), "full.toml")
	if err != nil {
		t.Fatal(err)
	}
	before, _ := c.Encode("")
	n := c.Clone()
	if !reflect.DeepEqual(n, c) {
		t.Fatal("clone differs")
	}
	n.Reactors.CPUs[0] = 99
	n.Bdevs[0].Name = "x"
	n.Bdevs = append(n.Bdevs, Bdev{Name: "y"})
	n.Controllers[0].LUNs[0].Bdev = "z"
	n.Controllers[0].CPUs[0] = 98
	n.Controllers = n.Controllers[:1]
	after, _ := c.Encode("")
	if string(before) != string(after) {
		t.Errorf("changing the clone changed the original:\n%s\n---\n%s", before, after)
	}
}

// TestRPCSocketDefault: the RPC socket defaults to socket_dir/rpc.sock; a
// socket_dir too long for it is reported at rpc.socket, with the way out.
func TestRPCSocketDefault(t *testing.T) {
	c, err := Parse([]byte(withCPU(head+mallocBdev+ctrl0)), "r.toml")
	if err != nil {
		t.Fatal(err)
	}
	if c.RPC.Socket != "/tmp/vt/rpc.sock" || c.RPC.SocketMode != 0o600 {
		t.Errorf("RPC = %+v", c.RPC)
	}
	dir := "/" + strings.Repeat("d", 100)
	_, err = Parse([]byte(withCPU(strings.Replace(head, "/tmp/vt", dir, 1)+mallocBdev+strings.Replace(ctrl0, "vhost.0", "v", 1))), "r.toml")
	if err == nil || !strings.Contains(err.Error(), "r.toml: rpc.socket: ") || !strings.Contains(err.Error(), "more than the 107") {
		t.Errorf("err = %v", err)
	}
}
