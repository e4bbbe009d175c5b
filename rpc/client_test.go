package rpc

// Goal: Client.Call returns results, JSON-RPC errors as *Error, and honours
// its context; a call cut short leaves no reply to be taken for the next.
// Method: a Client against a real server with methods that are slow or
// look at what they were sent.

import (
	"context"
	"encoding/json"
	"errors"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestClientCall(t *testing.T) {
	s, path := serve(t, Options{})
	s.Register("params", func(ctx context.Context, params json.RawMessage) (any, error) {
		return string(params), nil
	})
	s.Register("slow", func(ctx context.Context, params json.RawMessage) (any, error) {
		select {
		case <-time.After(2 * time.Second):
		case <-ctx.Done():
		}
		return "late", nil
	})
	c := NewTestClient(t, path)
	ctx := context.Background()

	var got string
	if err := c.Call(ctx, "params", nil, &got); err != nil || got != "" {
		t.Fatalf("nil params sent as %q (%v); rpc.py omits empty params", got, err)
	}
	if err := c.Call(ctx, "params", map[string]any{"name": "m0", "n": 1}, &got); err != nil || got != `{"n":1,"name":"m0"}` {
		t.Fatalf("params sent as %q (%v)", got, err)
	}

	err := c.Call(ctx, "enodev", nil, nil)
	var e *Error
	if !errors.As(err, &e) || e.Code != -int(syscall.ENODEV) || e.Message != `bdev "nope" does not exist` {
		t.Fatalf("error reply: %#v", err)
	}
	if err.Error() != `bdev "nope" does not exist` {
		t.Fatalf("Error() = %q", err.Error())
	}
	// An error reply leaves the connection usable.
	var sum int
	if err := c.Call(ctx, "add", map[string]int{"a": 1, "b": 2}, &sum); err != nil || sum != 3 {
		t.Fatalf("after an error reply: %d, %v", sum, err)
	}
	if err := c.Call(ctx, "add", nil, new(string)); err == nil || !strings.Contains(err.Error(), "result") {
		t.Fatalf("result of the wrong type: %v", err)
	}
	if err := c.Call(ctx, "add", make(chan int), nil); err == nil {
		t.Fatal("unencodable params sent")
	}

	tctx, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
	defer cancel()
	start := time.Now()
	if err := c.Call(tctx, "slow", nil, nil); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("slow call: %v", err)
	}
	if d := time.Since(start); d > time.Second {
		t.Fatalf("the deadline took %v to end the call", d)
	}
	// The slow reply may still come: the connection is not used again.
	if err := c.Call(ctx, "add", nil, nil); err == nil || !strings.Contains(err.Error(), "unusable") {
		t.Fatalf("call after a timeout: %v", err)
	}

	c2 := NewTestClient(t, path)
	cctx, ccancel := context.WithCancel(ctx)
	ccancel()
	if err := c2.Call(cctx, "add", nil, nil); !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled call: %v", err)
	}
	if err := c2.Call(ctx, "add", nil, nil); err != nil {
		t.Fatalf("a call refused before sending broke the connection: %v", err)
	}
}

func TestDialMissing(t *testing.T) {
	if _, err := Dial(t.TempDir() + "/none.sock"); err == nil {
		t.Fatal("dialled a socket that does not exist")
	}
}

func TestErrno(t *testing.T) {
	for _, c := range []struct {
		e    *Error
		code int
		msg  string
	}{
		{Errno(syscall.ENODEV), -19, "No such device"},
		{Errno(syscall.EEXIST), -17, "File exists"},
		{Errno(syscall.EBUSY), -16, "Device or resource busy"},
		{Errnof(syscall.ENOENT, "bdev %q", "x"), -2, `bdev "x"`},
		{InvalidParamsf("num_blocks: required"), -32602, "num_blocks: required"},
	} {
		if c.e.Code != c.code || c.e.Message != c.msg {
			t.Errorf("%+v, want %d %q", c.e, c.code, c.msg)
		}
	}
}
