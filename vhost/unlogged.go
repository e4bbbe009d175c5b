//go:build !vhost_debug_unlogged

package vhost

// debugUnlogged is true only in a debug build (-tags vhost_debug_unlogged)
// whose request queues do not mark the guest memory they write in the dirty
// log: the migration test runs it to show that it catches a missing mark.
const debugUnlogged = false
