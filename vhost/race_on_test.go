//go:build race

package vhost_test

// raceEnabled: a -race build moves some stack buffers to the heap (the
// 8-byte buffers an adaptive reactor reads its eventfds into around an
// epoll sleep), so its allocation counts are not the release build's.
const raceEnabled = true
