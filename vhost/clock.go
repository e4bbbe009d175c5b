package vhost

import "time"

// epoch anchors nanotime; time.Since reads the monotonic clock through the
// vDSO, no syscall.
var epoch = time.Now()

// nanotime is a monotonic clock in nanoseconds, never 0.
func nanotime() int64 { return int64(time.Since(epoch)) + 1 }
