//go:build vhost_debug_unlogged

package vhost

// debugUnlogged: this debug build leaves the data and response headers that
// request queues write into guest memory out of the dirty log, so a live
// migration may leave the destination with stale guest memory. Never ship it.
const debugUnlogged = true
