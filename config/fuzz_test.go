// FuzzParse feeds arbitrary bytes to Parse. Goal: Parse never panics, and
// whatever it accepts is a Config that Validate accepts again, whose
// sockets fit in sun_path, and that Encode writes back to an equal Config
// (save_config); every rejection names the source. Method: seeds
// are the committed corpus (testdata/fuzz/FuzzParse) plus the test texts.
package config

import (
	"reflect"
	"strings"
	"testing"
)

func FuzzParse(f *testing.F) {
	f.Add([]byte(withCPU(fullExample)))
	f.Add([]byte(withCPU(head + mallocBdev + ctrl0)))
	f.Add([]byte(withCPU(head + mallocBdev + "[[controller]]\nname = \"b0\"\ntype = \"blk\"\nbdev = \"mem0\"\nread_only = true\n")))
	f.Add([]byte(withCPU(head + rbdBdev + "namespace = \"ns\"\nconf = \"/c\"\nuser = \"u\"\nkeyring = \"/k\"\nop_timeout = \"0s\"\n")))
	f.Add([]byte(""))
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := Parse(data, "fuzz.toml")
		if err != nil {
			if c != nil {
				t.Fatal("config returned with an error")
			}
			for _, line := range strings.Split(err.Error(), "\n") {
				if !strings.HasPrefix(line, "fuzz.toml: ") {
					t.Fatalf("error line does not name the source: %q", line)
				}
			}
			return
		}
		if err := c.Validate(); err != nil {
			t.Fatalf("accepted config does not re-validate: %v", err)
		}
		if len(c.Reactors.CPUs) == 0 {
			t.Fatal("accepted config has no reactors")
		}
		for i := range c.Controllers {
			ctrl := &c.Controllers[i]
			if p := c.SocketPath(ctrl); len(p) > SocketPathMax {
				t.Fatalf("socket path %q too long", p)
			}
			if ctrl.NumQueues < 1 || ctrl.NumQueues > NumQueuesMax {
				t.Fatalf("accepted controller %+v", ctrl)
			}
			switch ctrl.Type {
			case ControllerBlk:
				if c.Bdev(ctrl.Bdev) == nil || len(ctrl.LUNs) != 0 {
					t.Fatalf("accepted blk controller %+v", ctrl)
				}
			case ControllerSCSI:
				if ctrl.Bdev != "" || ctrl.ReadOnly {
					t.Fatalf("accepted scsi controller %+v", ctrl)
				}
			default:
				t.Fatalf("accepted controller type %q", ctrl.Type)
			}
			for _, l := range ctrl.LUNs {
				b := c.Bdev(l.Bdev)
				if b == nil {
					t.Fatalf("LUN %+v names no bdev", l)
				}
				if b.BlockSize != 512 && b.BlockSize != 4096 || b.Size%uint64(b.BlockSize) != 0 {
					t.Fatalf("accepted bdev %+v", b)
				}
			}
		}
		out, err := c.Encode("")
		if err != nil {
			t.Fatalf("accepted config does not encode: %v", err)
		}
		back, err := Parse(out, "fuzz.toml")
		if err != nil {
			t.Fatalf("encoded config does not parse: %v\n%s", err, out)
		}
		if !reflect.DeepEqual(back, c) {
			t.Fatalf("encode/parse changed the config:\n%+v\n%+v\n%s", c, back, out)
		}
	})
}
