package frontend

import (
	"strings"
	"testing"

	"vhost-target/vhost/proto"
)

// TestDialSPDKSequence checks the PeerSPDK sequence message by message
// against SPDK's lib/virtio/virtio_vhost_user.c and virtio.c (see PeerSPDK).
func TestDialSPDKSequence(t *testing.T) {
	b := newFakeBackend(t)
	b.serve()
	d, err := Dial(b.path, Options{Peer: PeerSPDK, NumQueues: 2, QueueSize: 256})
	if err != nil {
		t.Fatal(err)
	}
	want := uint64(1<<proto.FVersion1 | 1<<proto.FVirtioSCSIHotplug | 1<<proto.FVirtioSCSIInOut |
		1<<proto.FProtocolFeatures | 1<<proto.FRingEventIdx)
	if d.Features() != want || d.ProtocolFeatures() != 1<<proto.PFMQ|1<<proto.PFConfig {
		t.Errorf("features %#x (want %#x), protocol features %#x", d.Features(), want, d.ProtocolFeatures())
	}
	for _, r := range d.MemTable() {
		if r.GPA != r.UVA || r.MmapOffset != 0 {
			t.Errorf("memory region %+v: GPA is not the UVA", r)
		}
	}
	s := d.Queue(0).Get()
	if s == nil {
		t.Fatal("no slot")
	}
	if uva, ok := d.UVA(s.DataGPA); !ok || uva != s.DataGPA {
		t.Errorf("slot data at GPA %#x, UVA %#x", s.DataGPA, uva)
	}
	d.Queue(0).Put(s)
	if r, err := d.Do(Command{CDB: []byte{0x12, 0, 0, 0, 36, 0}, DataInLen: 36, Queue: 1}); err != nil || r.Status != 0 {
		t.Fatalf("INQUIRY on queue 1: %v %+v", err, r)
	}
	if err := d.Reset(); err != nil {
		t.Fatal(err)
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	if err := b.wait(); err != nil {
		t.Fatal(err)
	}
	start := "GET_FEATURES, SET_FEATURES, GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, " +
		"SET_VRING_ENABLE 0, SET_VRING_ENABLE 1, SET_VRING_ENABLE 2, SET_VRING_ENABLE 3, GET_QUEUE_NUM, " +
		"SET_VRING_CALL 0, SET_VRING_CALL 1, SET_VRING_CALL 2, SET_VRING_CALL 3, SET_MEM_TABLE, GET_FEATURES, " +
		"SET_VRING_NUM 0, SET_VRING_BASE 0, SET_VRING_ADDR 0, SET_VRING_KICK 0, " +
		"SET_VRING_NUM 1, SET_VRING_BASE 1, SET_VRING_ADDR 1, SET_VRING_KICK 1, " +
		"SET_VRING_NUM 2, SET_VRING_BASE 2, SET_VRING_ADDR 2, SET_VRING_KICK 2, " +
		"SET_VRING_NUM 3, SET_VRING_BASE 3, SET_VRING_ADDR 3, SET_VRING_KICK 3"
	stop := "GET_VRING_BASE 0, GET_VRING_BASE 1, GET_VRING_BASE 2, GET_VRING_BASE 3"
	msgs := b.messages()
	if got, want := names(msgs), "SET_OWNER, "+start+", "+stop+", "+start+", "+stop; got != want {
		t.Errorf("sequence:\n got %s\nwant %s", got, want)
	}
	for _, m := range msgs {
		if m.flags != proto.FlagVersion {
			t.Errorf("%v: flags %#x", m, m.flags)
		}
		switch m.req {
		case proto.SetVringEnable:
			if m.num != 256 {
				t.Errorf("%v: num %d, want the queue size", m, m.num)
			}
		case proto.SetVringBase:
			if m.num != 0 {
				t.Errorf("%v: base %d", m, m.num)
			}
		case proto.SetVringErr, proto.ResetDevice:
			t.Errorf("SPDK never sends %v", m)
		}
	}
	for i, a := range b.addr {
		if a.Log != 0 || a.Flags != 0 {
			t.Errorf("vring %d: log address %#x flags %#x", i, a.Log, a.Flags)
		}
	}
}

// TestDialSingleOptions checks the SPDK behaviours as single options on the
// QEMU sequence.
func TestDialSingleOptions(t *testing.T) {
	b := newFakeBackend(t)
	b.serve()
	d, err := Dial(b.path, Options{EnableNum: 0xffffffff, QueueNumAlways: true, GPAIsUVA: true, Regions: 2,
		ProtocolMask: 1 << proto.PFReplyAck})
	if err != nil {
		t.Fatal(err)
	}
	if d.QueueNum() != 4 {
		t.Errorf("GET_QUEUE_NUM without MQ: %d", d.QueueNum())
	}
	for _, r := range d.MemTable() {
		if r.GPA != r.UVA {
			t.Errorf("region %+v", r)
		}
	}
	if r, err := d.Do(Command{CDB: []byte{0x12, 0, 0, 0, 36, 0}, DataInLen: 36}); err != nil || r.Status != 0 {
		t.Fatalf("INQUIRY: %v %+v", err, r)
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	b.wait()
	got := names(b.messages())
	if !strings.Contains(got, "SET_PROTOCOL_FEATURES, GET_QUEUE_NUM, SET_OWNER") {
		t.Errorf("sequence: %s", got)
	}
	var on, off int
	for _, m := range b.messages() {
		if m.req == proto.SetVringEnable {
			switch m.num {
			case 0xffffffff:
				on++
			case 0:
				off++
			default:
				t.Errorf("%v num %#x", m, m.num)
			}
		}
	}
	if on != 3 || off != 3 {
		t.Errorf("%d enables, %d disables", on, off)
	}
}
