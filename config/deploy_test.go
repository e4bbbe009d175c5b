// TestDeployExample loads deploy/target.toml, the file users copy, so the
// example can never drift from what the parser accepts. It also checks the
// shape the file's comments promise.
package config

import (
	"os"
	"regexp"
	"slices"
	"strings"
	"testing"
)

func TestDeployExample(t *testing.T) {
	if !slices.Contains(allowedCPUs(), 0) {
		t.Skip("the example pins reactors to CPU 0, which this process may not use")
	}
	c, err := Load("../deploy/target.toml")
	if err != nil {
		t.Fatal(err)
	}
	if len(c.Bdevs) != 2 || c.Bdevs[0].BlockSize != 512 || c.Bdevs[1].BlockSize != 4096 {
		t.Errorf("bdevs = %+v", c.Bdevs)
	}
	if len(c.Controllers) != 2 || c.SocketPath(&c.Controllers[0]) != "/var/run/vhost-target/vhost.0" {
		t.Errorf("controllers = %+v", c.Controllers)
	}
	if c.Metrics.Listen != MetricsListenDefault {
		t.Errorf("metrics.listen = %q", c.Metrics.Listen)
	}
}

// TestDeployExampleCommented uncomments the optional blocks of the example
// (the file bdev and its LUN, the rbd bdev and its LUN, the blk controller and its bdev) and checks the result still parses, so the
// commented-out lines are a working recipe too. socket_owner/socket_group
// lines are left alone: their users need not exist on a test machine.
func TestDeployExampleCommented(t *testing.T) {
	if !slices.Contains(allowedCPUs(), 0) {
		t.Skip("the example pins reactors to CPU 0, which this process may not use")
	}
	data, err := os.ReadFile("../deploy/target.toml")
	if err != nil {
		t.Fatal(err)
	}
	setting := regexp.MustCompile(`^# (\[\[[a-z.]+\]\]|[a-z_]+ = )`)
	lines := strings.Split(string(data), "\n")
	uncommented := 0
	for i, line := range lines {
		if setting.MatchString(line) && !strings.HasPrefix(line, "# socket_") {
			lines[i] = strings.TrimPrefix(line, "# ")
			uncommented++
		}
	}
	c, err := Parse([]byte(strings.Join(lines, "\n")), "target.toml (uncommented)")
	if err != nil {
		t.Fatal(err)
	}
	b := c.Bdev("disk0")
	if uncommented == 0 || b == nil || b.Type != TypeFile || !b.Create || b.Size != 20<<30 {
		t.Fatalf("uncommented %d lines; disk0 = %+v", uncommented, b)
	}
	if l := c.Controllers[1].LUNs; len(l) != 3 || l[1] != (LUN{Target: 1, Bdev: "disk0"}) || l[2] != (LUN{Target: 2, Bdev: "ceph0"}) {
		t.Errorf("vhost.1 LUNs = %+v", l)
	}
	if b := c.Bdev("ceph0"); b == nil || b.Type != TypeRBD || b.Pool != "rbd" || b.Image != "vm1" || b.User != "vhost" ||
		b.Conf != "/etc/ceph/ceph.conf" || b.Keyring != "/etc/ceph/ceph.client.vhost.keyring" || b.OpTimeout != OpTimeoutDefault ||
		b.QueueDepth != QueueDepthDefault || b.BlockSize != 512 {
		t.Errorf("ceph0 = %+v", b)
	}
	if b := c.Controller("blk.0"); b == nil || b.Type != ControllerBlk || b.Bdev != "disk1" || b.ReadOnly ||
		c.Bdev("disk1") == nil || len(c.Controllers) != 3 {
		t.Errorf("blk.0 = %+v", b)
	}
}
