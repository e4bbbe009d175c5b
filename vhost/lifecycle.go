package vhost

// The session and queue lifecycle, in one place. The code that implements
// each step is in controller.go (admission), session.go (messages, vring
// state), queue.go / ctrlq.go / eventq.go (running rings) and luns.go (the
// LUN table changing at runtime); this is the map to check it against.
// Four goroutine kinds touch a session: the controller's accept loop and one
// goroutine per connection (the "session goroutine": admission, then every
// vhost-user message in order), the reactors (running request queues), one
// goroutine per running control queue and one per running event queue. A
// fifth, the management caller (RPC), changes LUNs through AddLUN,
// RemoveLUN and CapacityChanged.
//
// # Controller
//
//	LISTENING --Close--> CLOSED
//
// Owns: the socket, the LUN table (shared by all its sessions: the only
// shared state, see below), Stats (counters summed over sessions, written
// by each queue's own reactor), the set of sessions (under mu) and the set
// of running request queues of all sessions (queues, under lunsMu).
//
// Locks, in the only order they nest: lunsMu, then mu or Stats.mu. No lock
// is taken on a reactor; reactors only load atomics (the table, a session's
// unit attention flags) and run the messages they are sent.
//
// # LUN table (luns.go)
//
// A lunTable (targets, each an immutable scsi.Target, and its LUNs' slots)
// is never modified once published in Controller.table. A request queue
// loads it once per command; the control queue once per TMF. Every change
// builds a new table and is made under lunsMu, which queue starts and stops
// also take, so each change reaches every running queue exactly once:
//
//   - startQueue (session goroutine, lunsMu held): open a channel of every
//     LUN of the current table, register the queue in queues, start it on
//     its reactor. A table published later reaches it through AddLUN.
//   - queue stop (session goroutine): drain without lunsMu (a drain needs
//     only the reactor), then under lunsMu unregister, close its channels,
//     retire its counters. A RemoveLUN in progress has finished with it; a
//     later one does not find it.
//   - AddLUN: take a free slot; on every registered queue open a channel of
//     the bdev and install it at the slot through reactor.Call (growing the
//     queue's per-slot arrays, allocated off the reactor); only then publish
//     the table. A command can only find the LUN after its channel is there.
//     Then, per session: RESCAN event (HOTPLUG), UA 3F/0E on the target's
//     other LUNs, the new slot's stale UA flags cleared.
//   - RemoveLUN: publish the table without the LUN (new commands get the
//     missing-LUN answer; a target left empty answers BAD_TARGET). Then, per
//     registered queue, reactor.Call messages: the first one runs after every
//     command that loaded the old table on that reactor (a reactor runs a
//     command from load to submit without yielding), so from then on only
//     completions come; the queue's per-slot in-flight count is read until 0,
//     and in the same message the channel is taken off the queue. It is
//     closed off the reactor. Only then the slot is freed, RemoveLUN returns
//     (the caller may close the bdev) and REMOVED events go out.
//   - CapacityChanged: the LUNs over the bdev get a new scsi.LUN over the
//     bdev's new Info (same slot, same channels); published; then per session
//     UA 2A/09 on those slots and a PARAM_CHANGE event (CHANGE).
//
// A capacity change itself (bdev.Resizer, bdev.Rescanner) is the bdev's: it
// stores the new size, which channels load per IO, then publishes a new
// Info. A shrink is refused while any channel is open, so no running queue
// ever sees its device shrink under it; a grow is visible to the channels
// before any LUN is built over it.
//
// Unit attentions (SAM-5 5.14) are per session (the I_T nexus) and LUN
// slot: session.ua, chunks of atomic words that only the management caller
// adds (under lunsMu) and that a reactor clears with a compare-and-swap when
// it reports one, so one command of the session reports each, on whichever
// queue comes first. INQUIRY and REPORT LUNS leave it pending.
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
// vrings' configuration and fds, the inflight area (below), and the list of
// running queues (live, also read by the control queue's goroutine under
// qmu). Shared with other
// goroutines: negotiated (the features, atomic, for the management caller's
// event decisions), events (pending events, under events.mu) and ua (above). Nothing of a session is
// reachable from another session: each has its own rings, memory mappings,
// bdev channels (opened per queue), call/kick fds and task management scope
// (a TMF waits for its own session's requests only, those in flight when it came).
//
// teardown = RESET (below) + call fds closed + memory unmapped. It runs only
// after every ring is STOPPED, so no reactor or control goroutine can touch
// guest memory after the unmap.
//
// # Vring (one per index; request queues are index >= 2, 0 is control, 1 event)
//
// State is derived, not stored: a vring is RUNNING when v.req, v.ctrl or
// v.evq is set, and update() makes RUNNING equal to ready():
//
//	ready = memory table present && NUM && ADDR && KICK seen since the last stop
//	        && (SET_VRING_ENABLE non-zero || PROTOCOL_FEATURES not negotiated)
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
//   - RUNNING event queue: its goroutine owns the virtq (call fd swapped
//     under eventQueue.mu). It takes a posted buffer only for a pending
//     event, so buffers wait in the ring; woken by a kick (buffers posted)
//     or by events.wake (an event raised).
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
// forgotten, features cleared (negotiated too), pending events dropped (the
// driver scans after a reset), the inflight area unmapped (it describes the
// forgotten rings; QEMU frees its copy on a device reset and asks for a new
// one); the connection, ownership, memory table and call fds stay (QEMU 7.2
// sets call fds once, before its RESET_DEVICEs). Pending unit attentions
// stay: they are the LUN's, not the driver's.
//
// # Inflight area and reconnect (inflight.go, virtq/inflight.go)
//
// With PROTOCOL_F_INFLIGHT_SHMFD the session owns one inflight area, a
// memfd region per vring that the front-end keeps across a back-end crash:
//
//	none --GET_INFLIGHT_FD--> OWN (new: a sealed, zeroed memfd; its fd sent back)
//	none --SET_INFLIGHT_FD--> GIVEN (the front-end's: shape, size, offset and
//	                          seals checked before mmap, or the connection closes)
//	OWN/GIVEN --GET/SET_INFLIGHT_FD--> every ring STOPPING --> IDLE, area
//	          replaced, rings restarted on the new one
//	OWN/GIVEN --RESET_DEVICE/RESET_OWNER, teardown--> none (unmapped after
//	          every ring has stopped; the front-end's fd keeps the memory)
//
// A ring stop or start keeps the area: it is the session's, not the ring's,
// and no running queue ever holds a slice of an unmapped area (the area is
// replaced or unmapped only with every ring stopped).
//
// Who writes it: a request queue's reactor only, through its virtq.Queue,
// for that vring's region: a head is marked (counter, then flag) when taken,
// recorded (next, last_batch_head) when its used element is pushed, and
// cleared after the used->idx store of its batch, then used_idx is stored.
// The control and event queues are not tracked: they complete chains in
// the order they take them, so the used index QEMU restarts them at after
// a crash is exactly the first chain not completed (events the dead process
// had not published are lost; the driver sees nothing of them).
//
// Reconnect = a new connection (a new session, on a new process or a new
// Controller) that receives SET_INFLIGHT_FD with the old area and starts the
// rings on the same guest memory, QEMU sending SET_VRING_BASE = used idx.
// At each request ring start with an area, virtq.New recovers: a batch
// published but not recorded (used_idx != used->idx) is cleared, the heads
// still flagged are run again in counter order before any new chain, and
// the next avail index becomes used->idx + their number (not the
// SET_VRING_BASE value), so nothing is run twice or skipped. A fresh region
// (version 0) is initialised instead. Controller.SimulateCrash is the test
// hook for the crash itself: request queues stop taking and publishing at
// once, bdev IOs finish unseen, the sessions and socket go as at Close.
//
// # Events (eventq.go)
//
// An event is queued only for a session that negotiated its feature
// (TRANSPORT_RESET: VIRTIO_SCSI_F_HOTPLUG; PARAM_CHANGE:
// VIRTIO_SCSI_F_CHANGE) and waits in the session's pending list, whether or
// not the event ring runs, until the driver has a buffer posted (Linux
// posts 8, and only with HOTPLUG). The list holds eventsPendingMax; an
// event raised past that is dropped and the next one delivered carries
// VIRTIO_SCSI_T_EVENTS_MISSED, on which Linux rescans the host. Stopping
// the ring keeps the pending events for its restart.
