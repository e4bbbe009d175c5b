package cephtest

import (
	"bytes"
	"testing"
	"time"
)

// TestCluster: the cluster comes up, takes an image, serves it to another
// client (rbd export) and again after its OSD was stopped and started.
func TestCluster(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a Ceph cluster (about 10 s, more with the package install); skipped with -short")
	}
	c := Start(t)
	c.CreateImage(t, "t0", 16<<20)
	if b := c.Export(t, "t0"); len(b) != 16<<20 || !bytes.Equal(b, make([]byte, 16<<20)) {
		t.Fatalf("a new image exported %d bytes, not 16 MiB of zeroes", len(b))
	}
	c.StopOSD(t)
	begin := time.Now()
	c.StartOSD(t)
	if b := c.Export(t, "t0"); len(b) != 16<<20 {
		t.Fatalf("after the OSD restarted: %d bytes", len(b))
	}
	t.Logf("OSD restarted and served in %v", time.Since(begin).Round(time.Millisecond))
}
