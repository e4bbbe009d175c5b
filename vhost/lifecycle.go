package vhost

// The session and queue lifecycle, in one place. The code that implements
// each step is in controller.go (admission), session.go (messages, vring
// state) and queue.go / ctrlq.go (running rings); this is the map to check
// it against. Three goroutine kinds touch a session: the controller's accept
// loop and one goroutine per connection (the "session goroutine": admission,
// then every vhost-user message in order), the reactors (running request
// queues), and one goroutine per running control queue.
//
// # Controller
//
//	LISTENING --Close--> CLOSED
//
// Owns: the socket, the SCSI targets and LUNs (shared by all its sessions:
// the only shared state), Stats (counters summed over sessions, written by
// each queue's own reactor), and the set of sessions (under mu).
//
// # Admission (per accepted connection)
//
//	accepted --(hung-up sessions still draining)--> wait on Controller.changed
//	accepted --(open sessions >= max_sessions)--> REFUSED: WARN naming this peer
//	         and the connected ones, sessions_refused_total++, connection closed
//	accepted --(otherwise)--> session CONNECTED; WARN naming both peers if
//	         another session is open (max_sessions > 1: a same-host migration)
//
// A session counts against max_sessions from admission until its
// connection ends (hungUp); admission still waits for hung-up sessions to
// finish draining, so the I/O of a killed VM completes before its
// replacement can touch the same LUNs.
//
// # Session
//
//	CONNECTED --any message--> CONNECTED (handled in order on the session goroutine)
//	CONNECTED --EOF, bad message, Controller.Close--> HUNG UP --teardown--> GONE
//
// Owns (session goroutine only): features, the memory table (mem), the 66
// vrings' configuration and fds, and the list of running queues (live, also
// read by the control queue's goroutine under qmu). Nothing of a session is
// reachable from another session: each has its own rings, memory mappings,
// bdev channels (opened per queue), call/kick fds and task management scope
// (a TMF waits for its own session's requests only).
//
// teardown = RESET (below) + call fds closed + memory unmapped. It runs only
// after every ring is STOPPED, so no reactor or control goroutine can touch
// guest memory after the unmap.
//
// # Vring (one per index; request queues are index >= 2, 0 is control, 1 event)
//
// State is derived, not stored: a vring is RUNNING when v.req or v.ctrl is
// set, and update() makes RUNNING equal to ready():
//
//	ready = memory table present && NUM && ADDR && KICK seen since the last stop
//	        && (SET_VRING_ENABLE non-zero || PROTOCOL_FEATURES not negotiated)
//	        && index != 1 (the event queue is never processed: no events are sent)
//	        && session not broken
//
//	IDLE    --NUM/ADDR/BASE/KICK/ENABLE/SET_FEATURES/SET_MEM_TABLE/ADD_MEM_REG, ready--> RUNNING
//	RUNNING --ENABLE 0, GET_VRING_BASE, RESET_DEVICE/RESET_OWNER--> STOPPING --> IDLE
//	RUNNING --KICK (new fd), ADDR--> STOPPING --> IDLE --> RUNNING on the new fd / rings
//	RUNNING --SET_MEM_TABLE (changed) / ADD_MEM_REG / REM_MEM_REG--> STOPPING --> IDLE
//	         --> remap --> RUNNING again from the base it stopped at
//	(GET_VRING_BASE also forgets the kick fd: a restart needs a new KICK)
//	RUNNING --SET_VRING_CALL--> RUNNING (fd swapped on the owner, then signalled once)
//
// Who owns what:
//   - IDLE: the session goroutine owns everything (num, addr, base, fds).
//   - RUNNING request queue: the reactor owns the queue (virtq state, slots,
//     in-flight requests, counters, the kick fd's epoll registration and the
//     call fd it signals). The session goroutine keeps the fds' ownership
//     (it closes them) but changes the running queue only through messages
//     run on the reactor: setCall, stop, counters for scrapes.
//   - RUNNING control queue: its goroutine owns the virtq; the call fd is
//     swapped under ctrlQueue.mu.
//   - STOPPING: the reactor still owns the queue; stop() on the session
//     goroutine waits until the reactor has taken every chain already
//     available (at most one ring), completed every in-flight request,
//     published the used ring, removed the poller and sent back the last
//     avail index. Only then does the session goroutine close the bdev
//     channels and (GET_VRING_BASE) the kick fd, and reply.
//
// Events that must not be lost, and how:
//   - A completion signalled before SET_VRING_CALL installs the fd the
//     front-end now listens to (QEMU sends call fds after SET_VRING_ENABLE):
//     the new fd is signalled once on the owner after the swap (issue 9,
//     part 1; libvhost-user does the same).
//   - A completion missed while a ring was stopped: every (re)start
//     signals once.
//   - A kick that lands while an adaptive reactor arms notifications: Arm
//     re-checks the avail ring after enabling kicks (virtq.SetNotification).
//   - Requests kicked before a stop: STOPPING still takes what is available.
//
// RESET_DEVICE / RESET_OWNER: every ring STOPPING --> IDLE, ring state
// forgotten, features cleared; the connection, ownership, memory table and
// call fds stay (QEMU 7.2 sets call fds once, before its RESET_DEVICEs).
