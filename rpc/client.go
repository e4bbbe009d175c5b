package rpc

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"sync"
	"time"
)

// Client calls methods over one connection to a Server (or to SPDK: the
// wire format is the same). Calls from several goroutines are made one
// after the other.
type Client struct {
	mu     sync.Mutex
	conn   net.Conn
	dec    *json.Decoder
	nextID uint64
	// broken is set when a call ended with the stream in an unknown state
	// (a timeout mid-reply, a reply that does not parse): later replies
	// could not be matched to calls, so later calls fail.
	broken error
}

// Dial connects to the server's unix socket at path.
func Dial(path string) (*Client, error) {
	return DialContext(context.Background(), path)
}

// DialContext is Dial bounded by ctx (a server that does not accept fills
// its listen backlog, and connect then blocks).
func DialContext(ctx context.Context, path string) (*Client, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return nil, fmt.Errorf("rpc: %w", err)
	}
	return &Client{conn: conn, dec: json.NewDecoder(conn)}, nil
}

// Close closes the connection.
func (c *Client) Close() error {
	return c.conn.Close()
}

// clientReply is a reply as received; Result stays raw until the caller's
// type is known.
type clientReply struct {
	JSONRPC string          `json:"jsonrpc"`
	ID      json.RawMessage `json:"id"`
	Result  json.RawMessage `json:"result"`
	Error   *Error          `json:"error"`
}

// Call sends method with params (omitted when nil, as rpc.py omits empty
// params) and decodes the result into result, unless result is nil. An
// error reply is returned as *Error. ctx bounds the whole call; a call cut
// short leaves the connection unusable.
func (c *Client) Call(ctx context.Context, method string, params any, result any) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.broken != nil {
		return fmt.Errorf("rpc: %s: connection unusable after an earlier failure: %w", method, c.broken)
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("rpc: %s: %w", method, err)
	}
	c.nextID++
	id := c.nextID
	req := struct {
		JSONRPC string `json:"jsonrpc"`
		Method  string `json:"method"`
		ID      uint64 `json:"id"`
		Params  any    `json:"params,omitempty"`
	}{"2.0", method, id, params}
	b, err := json.Marshal(req)
	if err != nil {
		return fmt.Errorf("rpc: %s: params: %w", method, err)
	}

	if dl, ok := ctx.Deadline(); ok {
		c.conn.SetDeadline(dl)
	}
	// Cancelling ctx moves the deadline to the past, which wakes a blocked
	// read or write.
	stop := context.AfterFunc(ctx, func() { c.conn.SetDeadline(time.Unix(1, 0)) })
	defer func() {
		if stop() {
			c.conn.SetDeadline(time.Time{})
		}
	}()
	fail := func(err error) error {
		if errors.Is(err, os.ErrDeadlineExceeded) {
			// Only ctx sets deadlines. The connection's may pass a moment
			// before ctx's own timer fires.
			<-ctx.Done()
		}
		if ctx.Err() != nil {
			err = ctx.Err()
		}
		c.broken = err
		return fmt.Errorf("rpc: %s: %w", method, err)
	}

	if _, err := c.conn.Write(b); err != nil {
		return fail(err)
	}
	var rep clientReply
	if err := c.dec.Decode(&rep); err != nil {
		return fail(err)
	}
	if rep.JSONRPC != "2.0" {
		return fail(fmt.Errorf("reply is not JSON-RPC 2.0: jsonrpc %q", rep.JSONRPC))
	}
	// An error about a request the server could not read has id null.
	idMatches := bytes.Equal(bytes.TrimSpace(rep.ID), []byte(strconv.FormatUint(id, 10)))
	if rep.Error != nil && (idMatches || string(bytes.TrimSpace(rep.ID)) == "null") {
		return rep.Error
	}
	if !idMatches {
		return fail(fmt.Errorf("reply id %s, want %d", rep.ID, id))
	}
	if rep.Result == nil {
		return fail(errors.New("reply has neither result nor error"))
	}
	if result != nil {
		if err := json.Unmarshal(rep.Result, result); err != nil {
			return fmt.Errorf("rpc: %s: result: %w", method, err)
		}
	}
	return nil
}
