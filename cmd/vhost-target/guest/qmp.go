package guest

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"sync"
	"time"
)

// QMP is a client of a guest's QEMU Machine Protocol socket (Options.QMP):
// the migration tests (issue 12) drive `migrate` and `query-migrate` with it.
// Asynchronous events are skipped; one command at a time.
type QMP struct {
	mu   sync.Mutex
	conn net.Conn
	r    *bufio.Reader
}

// DialQMP connects to path, retrying until ctx ends (QEMU creates the socket
// as it starts), reads the greeting and enters command mode.
func DialQMP(ctx context.Context, path string) (*QMP, error) {
	var conn net.Conn
	for {
		var err error
		var d net.Dialer
		if conn, err = d.DialContext(ctx, "unix", path); err == nil {
			break
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("guest: QMP %s: %w", path, err)
		case <-time.After(50 * time.Millisecond):
		}
	}
	q := &QMP{conn: conn, r: bufio.NewReader(conn)}
	if dl, ok := ctx.Deadline(); ok {
		conn.SetDeadline(dl)
	}
	var greeting struct {
		QMP json.RawMessage `json:"QMP"`
	}
	line, err := q.r.ReadBytes('\n')
	if err == nil {
		err = json.Unmarshal(line, &greeting)
	}
	if err != nil || greeting.QMP == nil {
		conn.Close()
		return nil, fmt.Errorf("guest: QMP %s: no greeting (%q, %v)", path, line, err)
	}
	conn.SetDeadline(time.Time{})
	if _, err := q.Execute("qmp_capabilities", nil); err != nil {
		conn.Close()
		return nil, err
	}
	return q, nil
}

// Execute runs one command with args (nil for none) and returns its
// "return" value, or QEMU's error as an error.
func (q *QMP) Execute(cmd string, args any) (json.RawMessage, error) {
	q.mu.Lock()
	defer q.mu.Unlock()
	req := map[string]any{"execute": cmd}
	if args != nil {
		req["arguments"] = args
	}
	b, err := json.Marshal(req)
	if err != nil {
		return nil, err
	}
	if _, err := q.conn.Write(append(b, '\n')); err != nil {
		return nil, fmt.Errorf("guest: QMP %s: %w", cmd, err)
	}
	for {
		line, err := q.r.ReadBytes('\n')
		if err != nil {
			return nil, fmt.Errorf("guest: QMP %s: %w", cmd, err)
		}
		var resp struct {
			Return json.RawMessage `json:"return"`
			Error  *struct {
				Class string `json:"class"`
				Desc  string `json:"desc"`
			} `json:"error"`
			Event string `json:"event"`
		}
		if err := json.Unmarshal(line, &resp); err != nil {
			return nil, fmt.Errorf("guest: QMP %s: %q: %w", cmd, line, err)
		}
		switch {
		case resp.Event != "":
			continue // asynchronous, not our answer
		case resp.Error != nil:
			return nil, fmt.Errorf("guest: QMP %s: %s: %s", cmd, resp.Error.Class, resp.Error.Desc)
		case resp.Return != nil:
			return resp.Return, nil
		}
		return nil, fmt.Errorf("guest: QMP %s: unexpected %q", cmd, line)
	}
}

// Close closes the connection.
func (q *QMP) Close() error { return q.conn.Close() }

// Migration is what query-migrate reports about a finished migration.
type Migration struct {
	Status    string        // "completed", or why it ended ("failed", "cancelled")
	Error     string        // QEMU's error-desc when it failed
	Total     time.Duration // total-time: from the migrate command to the end
	Downtime  time.Duration // the guest stood still (stop on the source to run on the destination)
	Setup     time.Duration // setup-time
	Passes    int           // RAM dirty-sync-count: passes over the dirty bitmap
	RAMBytes  uint64        // RAM transferred
	Remaining uint64        // RAM left when it ended (0 when completed)
}

// Migrate runs QMP `migrate` to uri (e.g. "unix:/path", the destination's
// Options.Incoming) and polls `query-migrate` every 20 ms until the
// migration ends or ctx does.
func (q *QMP) Migrate(ctx context.Context, uri string) (Migration, error) {
	if _, err := q.Execute("migrate", map[string]any{"uri": uri}); err != nil {
		return Migration{}, err
	}
	for {
		ret, err := q.Execute("query-migrate", nil)
		if err != nil {
			return Migration{}, err
		}
		var st struct {
			Status    string `json:"status"`
			ErrorDesc string `json:"error-desc"`
			TotalTime int64  `json:"total-time"`
			Downtime  int64  `json:"downtime"`
			SetupTime int64  `json:"setup-time"`
			RAM       struct {
				Transferred uint64 `json:"transferred"`
				Remaining   uint64 `json:"remaining"`
				Passes      int    `json:"dirty-sync-count"`
			} `json:"ram"`
		}
		if err := json.Unmarshal(ret, &st); err != nil {
			return Migration{}, fmt.Errorf("guest: query-migrate %q: %w", ret, err)
		}
		switch st.Status {
		case "completed", "failed", "cancelled":
			m := Migration{Status: st.Status, Error: st.ErrorDesc, Total: time.Duration(st.TotalTime) * time.Millisecond,
				Downtime: time.Duration(st.Downtime) * time.Millisecond, Setup: time.Duration(st.SetupTime) * time.Millisecond,
				Passes: st.RAM.Passes, RAMBytes: st.RAM.Transferred, Remaining: st.RAM.Remaining}
			if st.Status != "completed" {
				return m, fmt.Errorf("guest: migration to %s %s: %s", uri, st.Status, st.ErrorDesc)
			}
			return m, nil
		}
		select {
		case <-ctx.Done():
			q.Execute("migrate_cancel", nil)
			return Migration{Status: st.Status}, fmt.Errorf("guest: migration to %s still %q: %w", uri, st.Status, ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
}
