package scsi

import (
	"errors"
	"fmt"
	"testing"

	"vhost-target/bdev"
)

// Goal: every bdev error maps to the documented status and sense, for reads
// and for other ops. Method: prepare an IO, set IO.Err, call CompleteIO.

func TestCompleteIOErrors(t *testing.T) {
	errOther := errors.New("something else")
	for _, tc := range []struct {
		name   string
		write  bool
		err    error
		status byte
		key    byte
		code   asc
	}{
		{"ok read", false, nil, StatusGood, 0, 0},
		{"ok write", true, nil, StatusGood, 0, 0},
		{"EIO read", false, bdev.ErrIO, StatusCheckCondition, keyMediumError, ascUnrecoveredReadError},
		{"EIO write", true, bdev.ErrIO, StatusCheckCondition, keyMediumError, ascWriteError},
		{"wrapped EIO", false, fmt.Errorf("file: %w", bdev.ErrIO), StatusCheckCondition, keyMediumError, ascUnrecoveredReadError},
		{"read-only", true, bdev.ErrReadOnly, StatusCheckCondition, keyDataProtect, ascWriteProtected},
		{"range", false, bdev.ErrRange, StatusCheckCondition, keyIllegalRequest, ascLBAOutOfRange},
		{"no space", true, bdev.ErrNoSpace, StatusCheckCondition, keyDataProtect, ascSpaceAllocFailed},
		{"not supported", true, bdev.ErrNotSup, StatusCheckCondition, keyIllegalRequest, ascInvalidOpcode},
		{"busy", false, bdev.ErrBusy, StatusBusy, 0, 0},
		{"other", true, errOther, StatusCheckCondition, keyHardwareError, ascInternalTargetFailure},
	} {
		l := newTestLUN(512)
		dir, cdb := DirIn, cdb10(opRead10, 0, 0, 2)
		if tc.write {
			dir, cdb = DirOut, cdb10(opWrite10, 0, 0, 2)
		}
		c := newCmd(dir, 1024+512, 0)
		if a := run(l, c, cdb...); a != ActionIO {
			t.Fatal("no IO")
		}
		c.IO.Err = tc.err
		c.CompleteIO()
		switch tc.status {
		case StatusGood:
			expectGood(t, c)
			if c.Resid != 512 {
				t.Fatalf("%s: resid %d", tc.name, c.Resid)
			}
		case StatusBusy:
			if c.Status != StatusBusy || c.SenseLen != 0 || c.Resid != c.DataLen {
				t.Fatalf("%s: status %#x senselen %d", tc.name, c.Status, c.SenseLen)
			}
		default:
			expectCheck(t, c, ActionDone, tc.key, tc.code)
		}
	}
}

// A failed flush is a HARDWARE ERROR, which Linux does not retry (it
// retries MEDIUM ERROR / WRITE ERROR, and a retried flush may succeed over
// lost writes).
func TestCompleteIOFlushError(t *testing.T) {
	l := newTestLUN(512)
	c := newCmd(DirNone, 0, 0)
	run(l, c, cdb10(opSyncCache10, 0, 0, 0)...)
	c.IO.Err = bdev.ErrIO
	c.CompleteIO()
	expectCheck(t, c, ActionDone, keyHardwareError, ascInternalTargetFailure)
}

func TestCompleteIOWithoutIOPanics(t *testing.T) {
	defer func() {
		if recover() == nil {
			t.Fatal("no panic")
		}
	}()
	c := newCmd(DirNone, 0, 0)
	run(newTestLUN(512), c, opTestUnitReady)
	c.CompleteIO()
}

func TestCmdReuse(t *testing.T) {
	// A slot's Cmd is reused: a failed command must not leak into the next.
	l := newTestLUN(512)
	c := newCmd(DirIn, 512, 0)
	run(l, c, 0xFF)
	if c.Status != StatusCheckCondition {
		t.Fatal("setup")
	}
	c.IO.Done = nil
	if a := run(l, c, cdb10(opRead10, 0, 1, 1)...); a != ActionIO || c.IO.Err != nil || c.IO.NRanges != 0 {
		t.Fatal("reuse")
	}
	c.CompleteIO()
	expectGood(t, c)
}
