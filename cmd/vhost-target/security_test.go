package main

import (
	"os"
	"strings"
	"sync"
	"syscall"
	"testing"
)

// TestMetricsListenWarning: /metrics beyond loopback is allowed but logged at
// WARN; the default-style loopback listen is not.
func TestMetricsListenWarning(t *testing.T) {
	for _, tc := range []struct {
		listen string
		warn   bool
	}{{"127.0.0.1:0", false}, {"[::1]:0", false}, {"0.0.0.0:0", true}} {
		t.Run(tc.listen, func(t *testing.T) {
			var mu sync.Mutex
			var warns []string
			cfg := strings.Replace(cfgText("[0]", "adaptive", faultConfig), `listen = "127.0.0.1:0"`, `listen = "`+tc.listen+`"`, 1)
			tg := startTargetWith(t, cfg, targetOpts{hook: func(msg string, a map[string]string) {
				if strings.Contains(msg, "metrics endpoint listens beyond loopback") {
					mu.Lock()
					warns = append(warns, msg+" "+a["listen"])
					mu.Unlock()
				}
			}})
			if tg.metricsAddr == "" {
				t.Skipf("no metrics listener on %s", tc.listen)
			}
			tg.Stop()
			mu.Lock()
			defer mu.Unlock()
			if got := len(warns) > 0; got != tc.warn {
				t.Errorf("listen %s: warnings %q, want warning=%v", tc.listen, warns, tc.warn)
			}
		})
	}
}

// TestSocketOwnerFromConfig: socket_mode, socket_owner and socket_group from
// the configuration (numeric ids) reach the socket file.
func TestSocketOwnerFromConfig(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("chown needs root")
	}
	cfg := strings.Replace(cfgText("[0]", "adaptive", faultConfig), "num_queues = 2",
		"num_queues = 2\nsocket_mode = \"0660\"\nsocket_owner = \"4242\"\nsocket_group = \"4343\"", 1)
	tg := startTarget(t, cfg)
	fi, err := os.Lstat(tg.sock("c0"))
	if err != nil {
		t.Fatal(err)
	}
	st := fi.Sys().(*syscall.Stat_t)
	if fi.Mode().Type() != os.ModeSocket || fi.Mode().Perm() != 0o660 || st.Uid != 4242 || st.Gid != 4343 {
		t.Errorf("socket %v uid %d gid %d; want socket 0660 4242 4343", fi.Mode(), st.Uid, st.Gid)
	}
	// And the default: 0600, owned by us.
	tg2 := startTarget(t, cfgText("[0]", "adaptive", faultConfig))
	fi, err = os.Lstat(tg2.sock("c0"))
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 || fi.Sys().(*syscall.Stat_t).Uid != 0 {
		t.Errorf("default socket mode %v uid %d, want 0600 0", fi.Mode(), fi.Sys().(*syscall.Stat_t).Uid)
	}
}
