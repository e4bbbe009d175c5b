package vhost_test

import (
	"fmt"
	"testing"
	"time"

	"vhost-target/reactor"
	"vhost-target/vhost/frontend"
)

// TestCallFDAfterEnable replays QEMU's start order, where a ring's call fd
// is installed only after the ring is enabled (vhost-scsi-common unmasks the
// queues after vhost_dev_start): the first command completes while the
// target still holds the previous call fd, which QEMU no longer reads. The
// new call fd must then be signalled, or the guest waits forever for its
// first INQUIRY (issue 9 part 1: one boot in three hung). Deterministic:
// the command is completed (seen by polling) before the swap.
func TestCallFDAfterEnable(t *testing.T) {
	for _, mode := range []reactor.Mode{reactor.Busy, reactor.Adaptive} {
		for _, vring := range []int{frontend.ControlVring, 2} {
			t.Run(fmt.Sprintf("mode%d-vring%d", mode, vring), func(t *testing.T) { callAfterEnable(t, mode, vring) })
		}
	}
}

func callAfterEnable(t *testing.T, mode reactor.Mode, vring int) {
	e := newEnv(t, 1, mode)
	sock := e.controller("c0", 1, lun(0, 0, e.disk("m0", 1<<20, 512)))
	dev, err := frontend.NewUnstarted(sock, frontend.Options{})
	if err != nil {
		t.Fatal(err)
	}
	// Negotiate installs the init-time call fds (QEMU's masked notifiers).
	if err := dev.Negotiate(); err != nil {
		t.Fatal(err)
	}
	if err := dev.SetFeatures(dev.OfferedFeatures()); err != nil {
		t.Fatal(err)
	}
	if err := dev.SetMemTable(); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 3; i++ {
		if err := dev.StartRing(i); err != nil {
			t.Fatal(err)
		}
	}
	if err := dev.EnableRings(true); err != nil {
		t.Fatal(err)
	}
	// Completed and seen by polling the used ring, signalled on the old fd.
	if vring == frontend.ControlVring {
		if _, err := dev.TMF(0, 0, 5 /* LUN RESET */, 0); err != nil {
			t.Fatal(err)
		}
	} else if _, err := dev.Do(frontend.Command{CDB: []byte{0x12, 0, 0, 0, 36, 0}, DataInLen: 36}); err != nil {
		t.Fatal(err)
	}
	if err := dev.SetVringCall(vring); err != nil {
		t.Fatal(err)
	}
	if !dev.Vring(vring).WaitCallFD(2 * time.Second) {
		t.Errorf("mode %v vring %d: the call fd installed after a completion was never signalled", mode, vring)
	}
	dev.Close()
}
