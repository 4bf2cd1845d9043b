//! The progress thread: the only code that touches UCX handles.
//!
//! [`spawn`] starts one thread per transport instance. On that thread the UCP context
//! (RMA, active messages, wakeup) and one `UCS_THREAD_MODE_SINGLE` worker are created,
//! and the thread owns them, every endpoint, unpacked rkey and memory handle until it
//! exits. Other threads talk to it through [`Handle`]: [`Command`]s over a channel and an
//! eventfd that wakes it from `poll`. Replies come back on oneshot channels.
//!
//! Each loop: progress the worker until it reports nothing done (at most a burst), take
//! the queued commands, advance every in-flight operation (complete requests, issue
//! more puts/gets within a window of [`WINDOW`], flush, enforce deadlines), tear down
//! closed connections; when idle, arm the worker and `poll` its event fd and the waker
//! for at most 10 ms.
//!
//! Operations carry a deadline the thread enforces itself: past it the endpoint is
//! force-closed (outstanding requests complete as cancelled), the connection is marked
//! dead and the operation fails with [`TransportError::Timeout`]. Endpoints are created
//! with error-handling mode `NONE` (mode `PEER` disables the shared-memory lanes), so a
//! dead peer shows up as a transport error or as such a timeout.
//!
//! UCX configuration: `ucp_config_read` reads the user's `UCX_*` environment; then each
//! of [`DEFAULTS`] is applied only where its `UCX_<NAME>` variable is unset.

use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr;
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvtier_transport::{Notification, RegionId, RegionMemory, Result, TransportError};
use tokio::sync::{mpsc as notify_mpsc, oneshot};
use ucx_rs::sys;

/// Requests one operation keeps in flight.
pub(crate) const WINDOW: usize = 16;
/// Active-message id of notifications.
const AM_ID: u32 = 1;
/// Notifications received but not yet taken by `recv_notification`.
const NOTIFY_QUEUE: usize = 1024;
/// Longest sleep in `poll` (the loop also rechecks deadlines this often).
const IDLE_POLL_MS: i32 = 10;
/// Progress calls per loop before commands are looked at again.
const PROGRESS_BURST: usize = 64;
/// Bound on waiting for an endpoint's close request.
const DRAIN_GRACE: Duration = Duration::from_secs(2);
/// Bound on the graceful part (flush) of closing an endpoint.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// UCX settings applied unless the user set the matching `UCX_<NAME>` variable.
///
/// `LOG_LEVEL=error`: UCX prints to stdout, and at its default (`warn`) it reports
/// expected events such as a peer going away. Note that UCX's log level is global to the
/// process (every UCX user in it).
pub(crate) const DEFAULTS: &[(&str, &str)] = &[("LOG_LEVEL", "error")];

const UCS_OK: sys::ucs_status_t = sys::ucs_status_t_UCS_OK;
const UCS_INPROGRESS: sys::ucs_status_t = sys::ucs_status_t_UCS_INPROGRESS;

fn status(st: sys::ucs_status_t) -> &'static str {
    ucx_rs::status_string(st)
}

fn ucx_call(what: &str, st: sys::ucs_status_t) -> Result<()> {
    if st == UCS_OK {
        Ok(())
    } else {
        Err(TransportError::Io(format!("{what}: {}", status(st))))
    }
}

/// The error every caller gets once the progress thread is gone.
pub(crate) fn stopped() -> TransportError {
    TransportError::Io("ucx progress thread stopped".into())
}

/// Wakes the progress thread out of `poll` (an eventfd; safe from any thread).
struct Waker {
    fd: OwnedFd,
}

impl Waker {
    fn new() -> Result<Waker> {
        // SAFETY: eventfd takes no pointers; the result is checked below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(TransportError::Io(format!(
                "eventfd: {}",
                std::io::Error::last_os_error()
            )));
        }
        // SAFETY: `fd` is a fresh descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Waker { fd })
    }

    fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our eventfd. Failure (EAGAIN when the
        // counter is saturated) still leaves the fd readable, which is all we need.
        unsafe { libc::write(self.fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    fn drain(&self) {
        let mut count: u64 = 0;
        // SAFETY: reads at most 8 bytes into a live u64; non-blocking.
        unsafe { libc::read(self.fd.as_raw_fd(), (&mut count as *mut u64).cast(), 8) };
    }
}

/// One range of a transfer: `len` bytes between local address `local` and the peer's
/// address `remote`, inside the peer's region `region`.
pub(crate) struct Range {
    pub local: usize,
    pub len: usize,
    pub remote: u64,
    pub region: RegionId,
}

/// Which way a transfer moves bytes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Direction {
    /// Local to peer (`ucp_put_nbx`, then an endpoint flush).
    Put,
    /// Peer to local (`ucp_get_nbx`).
    Get,
}

/// A registered region as the progress thread reports it.
pub(crate) struct Registered {
    /// The memory handle's key for [`Command::Deregister`] (0: nothing mapped).
    pub token: u64,
    /// The packed rkey peers use.
    pub rkey: Vec<u8>,
}

/// What other threads ask of the progress thread.
pub(crate) enum Command {
    /// `ucp_mem_map` `len` bytes at `addr` (open to peers' reads and writes as the flags
    /// say) and pack their rkey.
    Register {
        addr: usize,
        len: usize,
        remote_read: bool,
        remote_write: bool,
        reply: mpsc::SyncSender<Result<Registered>>,
    },
    /// `ucp_mem_unmap` a registration; the reply comes once it is unmapped.
    Deregister {
        token: u64,
        reply: mpsc::SyncSender<()>,
    },
    /// Create an endpoint to the worker at `address` and unpack the peer's rkeys.
    Connect {
        peer: String,
        address: Vec<u8>,
        keys: Vec<(RegionId, Vec<u8>)>,
        reply: oneshot::Sender<Result<u64>>,
    },
    /// Move `ranges` on connection `conn`. `keep` holds the local memory alive until the
    /// operation is over, even if the caller stops waiting.
    Transfer {
        conn: u64,
        direction: Direction,
        ranges: Vec<Range>,
        keep: Vec<Arc<dyn RegionMemory>>,
        deadline: Instant,
        reply: oneshot::Sender<Result<()>>,
    },
    /// Send an encoded notification (see [`crate::wire::encode_notification`]) on `conn`.
    Notify {
        conn: u64,
        payload: Vec<u8>,
        deadline: Instant,
        reply: oneshot::Sender<Result<()>>,
    },
    /// The connection's handle was dropped: close the endpoint once its operations end.
    Disconnect { conn: u64 },
    /// Close everything and exit.
    Shutdown,
}

/// The caller's side of a progress thread. Dropping it stops the thread and waits for
/// it: endpoints closed, memory unmapped, worker and context destroyed.
pub(crate) struct Handle {
    commands: mpsc::Sender<Command>,
    waker: Arc<Waker>,
    thread: Option<JoinHandle<()>>,
}

impl Handle {
    /// Queues `command` and wakes the thread.
    pub(crate) fn send(&self, command: Command) -> Result<()> {
        self.commands.send(command).map_err(|_| stopped())?;
        self.waker.wake();
        Ok(())
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Shutdown);
        self.waker.wake();
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("ucx progress thread panicked");
            }
        }
    }
}

/// A running progress thread.
pub(crate) struct Started {
    /// Talks to the thread.
    pub handle: Handle,
    /// The worker's address (what peers pass to `ucp_ep_create`).
    pub address: Vec<u8>,
    /// Notifications peers sent to this worker.
    pub notifications: notify_mpsc::Receiver<Notification>,
}

/// Starts the progress thread of endpoint `name`, waiting at most `timeout` for UCX to
/// initialise.
pub(crate) fn spawn(name: String, timeout: Duration) -> Result<Started> {
    let waker = Arc::new(Waker::new()?);
    let (commands, receiver) = mpsc::channel();
    let (notify_tx, notifications) = notify_mpsc::channel(NOTIFY_QUEUE);
    let (init_tx, init_rx) = mpsc::sync_channel(1);
    let thread_waker = waker.clone();
    let thread = std::thread::Builder::new()
        .name("kvtier-ucx".into())
        .spawn(move || {
            let am = Box::new(AmState {
                tx: notify_tx,
                name: name.clone(),
            });
            match Engine::start(name, timeout, receiver, thread_waker, am) {
                Ok(engine) => {
                    let _ = init_tx.send(Ok(engine.address.clone()));
                    engine.run();
                }
                Err(e) => {
                    let _ = init_tx.send(Err(e));
                }
            }
        })
        .map_err(|e| TransportError::Io(format!("spawn ucx progress thread: {e}")))?;
    let mut handle = Handle {
        commands,
        waker,
        thread: Some(thread),
    };
    match init_rx.recv_timeout(timeout) {
        Ok(Ok(address)) => Ok(Started {
            handle,
            address,
            notifications,
        }),
        Ok(Err(e)) => Err(e),
        Err(mpsc::RecvTimeoutError::Timeout) => {
            // Do not wait for a stuck initialisation: detach the thread (it exits on
            // the shutdown command if initialisation ever finishes).
            drop(handle.thread.take());
            Err(TransportError::Timeout {
                op: "ucx initialisation",
                after: timeout,
            })
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => Err(stopped()),
    }
}

/// What the active-message callback needs; boxed so its address is stable, and
/// outlives the worker.
struct AmState {
    tx: notify_mpsc::Sender<Notification>,
    name: String,
}

/// The notification handler (`ucp_am_recv_callback_t`), called from
/// `ucp_worker_progress` on the progress thread. Copies the message out and never
/// unwinds into C.
unsafe extern "C" fn on_notification(
    arg: *mut c_void,
    _header: *const c_void,
    _header_length: usize,
    data: *mut c_void,
    length: usize,
    param: *const sys::ucp_am_recv_param_t,
) -> sys::ucs_status_t {
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: `arg` is the `AmState` box registered with the handler; it lives until
        // after the worker is destroyed.
        let state = unsafe { &*(arg as *const AmState) };
        let attr = if param.is_null() {
            0
        } else {
            // SAFETY: UCX passes a valid parameter struct for the duration of the
            // callback.
            unsafe { (*param).recv_attr }
        };
        if attr & sys::ucp_am_recv_attr_t_UCP_AM_RECV_ATTR_FLAG_RNDV as u64 != 0 {
            // Our senders force the eager protocol; returning UCS_OK releases the
            // rendezvous descriptor.
            tracing::error!(
                "ucx transport {}: dropped a rendezvous notification of {length} bytes",
                state.name
            );
            return;
        }
        let bytes: &[u8] = if length == 0 || data.is_null() {
            &[]
        } else {
            // SAFETY: without the RNDV flag, `data` points to `length` received bytes
            // valid for the duration of the callback; they are copied out below.
            unsafe { std::slice::from_raw_parts(data as *const u8, length) }
        };
        match crate::wire::decode_notification(bytes) {
            Ok(n) => {
                if let Err(e) = state.tx.try_send(n) {
                    tracing::error!(
                        "ucx transport {}: notification dropped ({NOTIFY_QUEUE} queued): {e}",
                        state.name
                    );
                }
            }
            Err(e) => tracing::error!("ucx transport {}: {e}", state.name),
        }
    }));
    UCS_OK
}

/// A request returned by a `*_nbx` call, in flight until its status is not
/// `UCS_INPROGRESS`; freed with `ucp_request_free`.
struct Request(*mut c_void);

impl Request {
    /// Its status (`UCS_INPROGRESS` while in flight).
    fn status(&self) -> sys::ucs_status_t {
        // SAFETY: the request has not been freed (freeing consumes it).
        unsafe { sys::ucp_request_check_status(self.0) }
    }

    fn free(self) {
        // SAFETY: a request UCX handed us, freed exactly once (consumes self). Freeing
        // an incomplete request is allowed: UCX finishes it internally.
        unsafe { sys::ucp_request_free(self.0) }
    }
}

/// A `*_nbx` result: `Ok(None)` completed, `Ok(Some)` in flight, `Err` failed.
fn started(ptr: sys::ucs_status_ptr_t) -> std::result::Result<Option<Request>, sys::ucs_status_t> {
    ucx_rs::decode_status_ptr(ptr).map(|r| r.map(Request))
}

/// Where a connection is in its life.
enum ConnState {
    Open,
    /// The handle was dropped; closing starts once no operation uses the endpoint.
    CloseRequested,
    /// Flushing before the endpoint is closed, at most until `until`.
    Flushing {
        flush: Option<Request>,
        until: Instant,
    },
}

struct Conn {
    peer: String,
    /// Null once the endpoint was force-closed.
    ep: sys::ucp_ep_h,
    rkeys: HashMap<RegionId, sys::ucp_rkey_h>,
    /// Why the connection is unusable, once it is.
    dead: Option<String>,
    /// Operations in flight on it.
    ops: usize,
    state: ConnState,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Put,
    Get,
    Notify,
}

/// An operation in flight.
struct Op {
    conn: u64,
    kind: Kind,
    ranges: Vec<Range>,
    payload: Vec<u8>,
    /// Next range (or, for a notification, 0 until the send is issued).
    next: usize,
    flushed: bool,
    inflight: Vec<Request>,
    deadline: Instant,
    error: Option<TransportError>,
    reply: Option<oneshot::Sender<Result<()>>>,
    /// The local memory of the ranges, alive until UCX is done with it.
    keep: Vec<Arc<dyn RegionMemory>>,
}

/// Requests of a failed operation that UCX had not completed when it replied, and the
/// memory they may still touch; dropped once they complete.
struct Abandoned {
    /// The connection they were issued on (its rkeys outlive them).
    conn: u64,
    requests: Vec<Request>,
    keep: Vec<Arc<dyn RegionMemory>>,
}

impl Op {
    fn name(&self) -> &'static str {
        match self.kind {
            Kind::Put => "write",
            Kind::Get => "read",
            Kind::Notify => "notify",
        }
    }

    fn actions(&self) -> usize {
        match self.kind {
            Kind::Notify => 1,
            _ => self.ranges.len(),
        }
    }

    fn fail(&mut self, error: TransportError) {
        self.error.get_or_insert(error);
    }
}

struct Engine {
    context: sys::ucp_context_h,
    worker: sys::ucp_worker_h,
    efd: i32,
    address: Vec<u8>,
    name: String,
    timeout: Duration,
    commands: mpsc::Receiver<Command>,
    waker: Arc<Waker>,
    memhs: HashMap<u64, sys::ucp_mem_h>,
    next_token: u64,
    conns: HashMap<u64, Conn>,
    next_conn: u64,
    ops: Vec<Op>,
    /// Requests nobody waits for (closes, abandoned flushes): freed once complete or
    /// past their instant.
    orphans: Vec<(Request, Instant)>,
    abandoned: Vec<Abandoned>,
    arm_failed: bool,
    // Dropped after `Drop::drop` destroyed the worker: the handler's argument, and
    // memory of requests that were still in flight at the end.
    am: Box<AmState>,
    retained: Vec<Arc<dyn RegionMemory>>,
}

impl Engine {
    /// Creates the context and worker, installs the notification handler and reads the
    /// worker's address. On error, `Drop` releases whatever was created.
    fn start(
        name: String,
        timeout: Duration,
        commands: mpsc::Receiver<Command>,
        waker: Arc<Waker>,
        am: Box<AmState>,
    ) -> Result<Engine> {
        let mut engine = Engine {
            context: ptr::null_mut(),
            worker: ptr::null_mut(),
            efd: -1,
            address: Vec::new(),
            name,
            timeout,
            commands,
            waker,
            memhs: HashMap::new(),
            next_token: 1,
            conns: HashMap::new(),
            next_conn: 1,
            ops: Vec::new(),
            orphans: Vec::new(),
            abandoned: Vec::new(),
            arm_failed: false,
            am,
            retained: Vec::new(),
        };
        engine.context = create_context()?;

        let mut wparams = sys::ucp_worker_params_t {
            field_mask: sys::ucp_worker_params_field_UCP_WORKER_PARAM_FIELD_THREAD_MODE as u64,
            thread_mode: sys::ucs_thread_mode_t_UCS_THREAD_MODE_SINGLE,
            ..Default::default()
        };
        let cname = CString::new(engine.name.replace('\0', "")).unwrap_or_default();
        wparams.field_mask |= sys::ucp_worker_params_field_UCP_WORKER_PARAM_FIELD_NAME as u64;
        wparams.name = cname.as_ptr();
        // SAFETY: valid context, params and out-pointer; the name is copied by UCX.
        let st = unsafe { sys::ucp_worker_create(engine.context, &wparams, &mut engine.worker) };
        ucx_call("ucp_worker_create", st)?;

        // SAFETY: valid worker and out-pointer (the context has FEATURE_WAKEUP).
        let st = unsafe { sys::ucp_worker_get_efd(engine.worker, &mut engine.efd) };
        ucx_call("ucp_worker_get_efd", st)?;

        let handler = sys::ucp_am_handler_param_t {
            field_mask: (sys::ucp_am_handler_param_field_UCP_AM_HANDLER_PARAM_FIELD_ID
                | sys::ucp_am_handler_param_field_UCP_AM_HANDLER_PARAM_FIELD_CB
                | sys::ucp_am_handler_param_field_UCP_AM_HANDLER_PARAM_FIELD_ARG)
                as u64,
            id: AM_ID,
            cb: Some(on_notification),
            arg: (&*engine.am as *const AmState).cast_mut().cast(),
            ..Default::default()
        };
        // SAFETY: valid worker; `arg` points to the boxed AmState, which outlives the
        // worker (Engine drops it after destroying the worker).
        let st = unsafe { sys::ucp_worker_set_am_recv_handler(engine.worker, &handler) };
        ucx_call("ucp_worker_set_am_recv_handler", st)?;

        let mut attr = sys::ucp_worker_attr_t {
            field_mask: sys::ucp_worker_attr_field_UCP_WORKER_ATTR_FIELD_ADDRESS as u64,
            ..Default::default()
        };
        // SAFETY: valid worker and attribute struct.
        let st = unsafe { sys::ucp_worker_query(engine.worker, &mut attr) };
        ucx_call("ucp_worker_query", st)?;
        if attr.address.is_null() || attr.address_length == 0 {
            return Err(TransportError::Io(
                "ucp_worker_query: empty worker address".into(),
            ));
        }
        // SAFETY: UCX returned `address_length` bytes at `address`; copied, then released
        // exactly once.
        engine.address = unsafe {
            let bytes =
                std::slice::from_raw_parts(attr.address as *const u8, attr.address_length).to_vec();
            sys::ucp_worker_release_address(engine.worker, attr.address);
            bytes
        };
        Ok(engine)
    }

    fn run(mut self) {
        loop {
            let mut busy = self.progress();
            let mut shutdown = false;
            loop {
                match self.commands.try_recv() {
                    Ok(Command::Shutdown) | Err(mpsc::TryRecvError::Disconnected) => {
                        shutdown = true;
                        break;
                    }
                    Ok(command) => {
                        busy = true;
                        self.handle(command);
                    }
                    Err(mpsc::TryRecvError::Empty) => break,
                }
            }
            if shutdown {
                break;
            }
            busy |= self.step();
            if !busy {
                self.wait(IDLE_POLL_MS);
            }
        }
        self.shutdown();
    }

    /// Progresses the worker until it reports nothing done (at most a burst).
    fn progress(&mut self) -> bool {
        let mut any = false;
        for _ in 0..PROGRESS_BURST {
            // SAFETY: valid worker, called only from this thread, never from a callback.
            if unsafe { sys::ucp_worker_progress(self.worker) } == 0 {
                break;
            }
            any = true;
        }
        any
    }

    /// Advances operations, closing connections and orphaned requests; true if any
    /// state changed.
    fn step(&mut self) -> bool {
        let now = Instant::now();
        let mut changed = false;
        let mut ops = std::mem::take(&mut self.ops);
        ops.retain_mut(|op| !self.step_op(op, now, &mut changed));
        // No operation is added while stepping; keep any anyway.
        ops.append(&mut self.ops);
        self.ops = ops;
        changed |= self.step_conns(now);
        let orphans = self.orphans.len();
        self.orphans = std::mem::take(&mut self.orphans)
            .into_iter()
            .filter_map(|(req, until)| {
                if req.status() != UCS_INPROGRESS || now >= until {
                    req.free();
                    None
                } else {
                    Some((req, until))
                }
            })
            .collect();
        for group in &mut self.abandoned {
            for req in std::mem::take(&mut group.requests) {
                if req.status() == UCS_INPROGRESS {
                    group.requests.push(req);
                } else {
                    req.free();
                    changed = true;
                }
            }
        }
        self.abandoned.retain(|group| !group.requests.is_empty());
        changed || self.orphans.len() != orphans
    }

    /// Arms the worker and sleeps in `poll` until an event, a wake-up or `ms` passes.
    fn wait(&mut self, ms: i32) {
        // SAFETY: valid worker; progress returned 0 just before.
        let st = unsafe { sys::ucp_worker_arm(self.worker) };
        if st == sys::ucs_status_t_UCS_ERR_BUSY {
            return;
        }
        let mut fds = [
            libc::pollfd {
                fd: self.efd,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.waker.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let mut ms = ms;
        if st != UCS_OK {
            if !self.arm_failed {
                self.arm_failed = true;
                tracing::warn!(
                    "ucx transport {}: ucp_worker_arm: {}; polling every millisecond",
                    self.name,
                    status(st)
                );
            }
            fds[0].fd = -1;
            ms = 1;
        }
        // SAFETY: two valid pollfd entries (a negative fd is ignored by poll).
        unsafe { libc::poll(fds.as_mut_ptr(), 2, ms) };
        if fds[1].revents & libc::POLLIN != 0 {
            self.waker.drain();
        }
    }

    fn handle(&mut self, command: Command) {
        match command {
            Command::Register {
                addr,
                len,
                remote_read,
                remote_write,
                reply,
            } => {
                let _ = reply.send(self.register(addr, len, remote_read, remote_write));
            }
            Command::Deregister { token, reply } => {
                if let Some(memh) = self.memhs.remove(&token) {
                    // SAFETY: a handle mapped by this context, unmapped once (removed).
                    let st = unsafe { sys::ucp_mem_unmap(self.context, memh) };
                    if st != UCS_OK {
                        tracing::error!(
                            "ucx transport {}: ucp_mem_unmap: {}",
                            self.name,
                            status(st)
                        );
                    }
                }
                let _ = reply.send(());
            }
            Command::Connect {
                peer,
                address,
                keys,
                reply,
            } => {
                let _ = reply.send(self.connect(peer, &address, &keys));
            }
            Command::Transfer {
                conn,
                direction,
                ranges,
                keep,
                deadline,
                reply,
            } => {
                let kind = match direction {
                    Direction::Put => Kind::Put,
                    Direction::Get => Kind::Get,
                };
                self.start_op(conn, kind, ranges, Vec::new(), keep, deadline, reply);
            }
            Command::Notify {
                conn,
                payload,
                deadline,
                reply,
            } => {
                self.start_op(
                    conn,
                    Kind::Notify,
                    Vec::new(),
                    payload,
                    Vec::new(),
                    deadline,
                    reply,
                );
            }
            Command::Disconnect { conn } => {
                if let Some(c) = self.conns.get_mut(&conn) {
                    if matches!(c.state, ConnState::Open) {
                        c.state = ConnState::CloseRequested;
                    }
                }
            }
            Command::Shutdown => {}
        }
    }

    fn register(
        &mut self,
        addr: usize,
        len: usize,
        remote_read: bool,
        remote_write: bool,
    ) -> Result<Registered> {
        if len == 0 {
            return Ok(Registered {
                token: 0,
                rkey: Vec::new(),
            });
        }
        // Peers' access as the memory keys express it: enforced by RDMA NICs; not by
        // shared memory or cross-memory attach, which have no keys.
        let mut prot = sys::UCP_MEM_MAP_PROT_LOCAL_READ | sys::UCP_MEM_MAP_PROT_LOCAL_WRITE;
        if remote_read {
            prot |= sys::UCP_MEM_MAP_PROT_REMOTE_READ;
        }
        if remote_write {
            prot |= sys::UCP_MEM_MAP_PROT_REMOTE_WRITE;
        }
        let params = sys::ucp_mem_map_params_t {
            field_mask: (sys::ucp_mem_map_params_field_UCP_MEM_MAP_PARAM_FIELD_ADDRESS
                | sys::ucp_mem_map_params_field_UCP_MEM_MAP_PARAM_FIELD_LENGTH
                | sys::ucp_mem_map_params_field_UCP_MEM_MAP_PARAM_FIELD_PROT)
                as u64,
            address: addr as *mut c_void,
            length: len,
            prot: prot as _,
            ..Default::default()
        };
        let mut memh: sys::ucp_mem_h = ptr::null_mut();
        // SAFETY: valid context; `addr..addr+len` is memory the caller keeps valid while
        // registered (RegionMemory's contract; the handle unmaps before releasing it).
        let st = unsafe { sys::ucp_mem_map(self.context, &params, &mut memh) };
        ucx_call("ucp_mem_map", st)?;
        let mut buffer: *mut c_void = ptr::null_mut();
        let mut size = 0usize;
        // SAFETY: a handle this context just mapped; out-pointers are valid.
        let st = unsafe { sys::ucp_rkey_pack(self.context, memh, &mut buffer, &mut size) };
        if st != UCS_OK {
            // SAFETY: unmapping the handle mapped above, once.
            unsafe { sys::ucp_mem_unmap(self.context, memh) };
            return Err(TransportError::Io(format!("ucp_rkey_pack: {}", status(st))));
        }
        // SAFETY: UCX returned `size` bytes at `buffer`; copied, then released once.
        let rkey = unsafe {
            let bytes = if buffer.is_null() {
                Vec::new()
            } else {
                std::slice::from_raw_parts(buffer as *const u8, size).to_vec()
            };
            sys::ucp_rkey_buffer_release(buffer);
            bytes
        };
        let token = self.next_token;
        self.next_token += 1;
        self.memhs.insert(token, memh);
        Ok(Registered { token, rkey })
    }

    fn connect(
        &mut self,
        peer: String,
        address: &[u8],
        keys: &[(RegionId, Vec<u8>)],
    ) -> Result<u64> {
        let params = sys::ucp_ep_params_t {
            field_mask: (sys::ucp_ep_params_field_UCP_EP_PARAM_FIELD_REMOTE_ADDRESS
                | sys::ucp_ep_params_field_UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE)
                as u64,
            address: address.as_ptr().cast(),
            err_mode: sys::ucp_err_handling_mode_t_UCP_ERR_HANDLING_MODE_NONE,
            ..Default::default()
        };
        let mut ep: sys::ucp_ep_h = ptr::null_mut();
        // SAFETY: valid worker; `address` holds the peer's worker address bytes and
        // outlives the call (UCX unpacks it during ucp_ep_create).
        let st = unsafe { sys::ucp_ep_create(self.worker, &params, &mut ep) };
        if st != UCS_OK {
            return Err(TransportError::UnknownPeer(format!(
                "{peer}: ucp_ep_create: {}",
                status(st)
            )));
        }
        let mut conn = Conn {
            peer,
            ep,
            rkeys: HashMap::new(),
            dead: None,
            ops: 0,
            state: ConnState::Open,
        };
        for (id, key) in keys {
            if key.is_empty() {
                continue; // an empty region: nothing to address
            }
            let mut rkey: sys::ucp_rkey_h = ptr::null_mut();
            // SAFETY: valid endpoint; `key` is a packed rkey buffer from the descriptor,
            // read during the call only.
            let st = unsafe { sys::ucp_ep_rkey_unpack(ep, key.as_ptr().cast(), &mut rkey) };
            if st != UCS_OK {
                let err = TransportError::Protocol(format!(
                    "{}: region {} rkey: {}",
                    conn.peer,
                    id.0,
                    status(st)
                ));
                self.destroy_conn(conn);
                return Err(err);
            }
            conn.rkeys.insert(*id, rkey);
        }
        let id = self.next_conn;
        self.next_conn += 1;
        self.conns.insert(id, conn);
        Ok(id)
    }

    #[allow(clippy::too_many_arguments)]
    fn start_op(
        &mut self,
        conn: u64,
        kind: Kind,
        ranges: Vec<Range>,
        payload: Vec<u8>,
        keep: Vec<Arc<dyn RegionMemory>>,
        deadline: Instant,
        reply: oneshot::Sender<Result<()>>,
    ) {
        let Some(c) = self.conns.get_mut(&conn) else {
            let _ = reply.send(Err(TransportError::Io("ucx connection closed".into())));
            return;
        };
        if let Some(reason) = &c.dead {
            let _ = reply.send(Err(TransportError::PeerGone {
                peer: c.peer.clone(),
                reason: reason.clone(),
            }));
            return;
        }
        if let Some(r) = ranges.iter().find(|r| !c.rkeys.contains_key(&r.region)) {
            let _ = reply.send(Err(TransportError::Protocol(format!(
                "{}: no rkey for region {}",
                c.peer, r.region.0
            ))));
            return;
        }
        c.ops += 1;
        self.ops.push(Op {
            conn,
            kind,
            ranges,
            payload,
            next: 0,
            flushed: false,
            inflight: Vec::new(),
            deadline,
            error: None,
            reply: Some(reply),
            keep,
        });
    }

    /// Advances `op`; true once it has replied. Sets `changed` if anything moved.
    fn step_op(&mut self, op: &mut Op, now: Instant, changed: &mut bool) -> bool {
        let name = op.name();
        let Some(conn) = self.conns.get(&op.conn) else {
            // Cannot happen: a connection is removed only once no operation uses it.
            for req in op.inflight.drain(..) {
                req.free();
            }
            *changed = true;
            return finish(
                op,
                Err(TransportError::Io("ucx connection vanished".into())),
            );
        };
        let gone = |reason: String| TransportError::PeerGone {
            peer: conn.peer.clone(),
            reason,
        };

        // A UCX failure on the endpoint: the connection is unusable from then on.
        let mut broken = None;

        // Completions.
        let mut pending = Vec::with_capacity(op.inflight.len());
        for req in std::mem::take(&mut op.inflight) {
            let st = req.status();
            if st == UCS_INPROGRESS {
                pending.push(req);
                continue;
            }
            *changed = true;
            req.free();
            if st != UCS_OK {
                broken = Some(format!("{name}: {}", status(st)));
                op.fail(gone(format!("{name}: {}", status(st))));
            }
        }
        op.inflight = pending;
        if let Some(reason) = &conn.dead {
            op.fail(gone(reason.clone()));
        }
        // Past the deadline nothing more is issued; an operation whose requests all
        // completed still succeeds.
        let past_deadline = now >= op.deadline;

        if op.error.is_none() && !past_deadline {
            // Issue within the window.
            while op.next < op.actions() && op.inflight.len() < WINDOW {
                let index = op.next;
                op.next += 1;
                *changed = true;
                match issue(conn, op, index) {
                    Ok(None) => {}
                    Ok(Some(req)) => op.inflight.push(req),
                    Err(st) => {
                        broken = Some(format!("{name}: {}", status(st)));
                        op.fail(gone(format!("{name}: {}", status(st))));
                        break;
                    }
                }
            }
        }
        if op.error.is_none() && op.next == op.actions() && op.inflight.is_empty() {
            // Everything completed locally; writes and notifications flush the
            // endpoint so the bytes are at the peer before the caller hears of it.
            if op.kind != Kind::Get && !op.flushed && !past_deadline {
                op.flushed = true;
                *changed = true;
                let param = sys::ucp_request_param_t::default();
                // SAFETY: a live endpoint (the connection is not dead: checked above)
                // and a valid param.
                match started(unsafe { sys::ucp_ep_flush_nbx(conn.ep, &param) }) {
                    Ok(None) => {}
                    Ok(Some(req)) => op.inflight.push(req),
                    Err(st) => {
                        broken = Some(format!("{name}: flush: {}", status(st)));
                        op.fail(gone(format!("{name}: flush: {}", status(st))));
                    }
                }
            }
            if op.error.is_none() && op.inflight.is_empty() && (op.flushed || op.kind == Kind::Get)
            {
                *changed = true;
                return finish_conn(&mut self.conns, op, Ok(()));
            }
        }
        let timed_out = op.error.is_none() && past_deadline;
        if timed_out {
            op.fail(TransportError::Timeout {
                op: name,
                after: self.timeout,
            });
        }

        if let Some(reason) = broken {
            if let Some(c) = self.conns.get_mut(&op.conn) {
                c.dead.get_or_insert(reason);
            }
        }
        if timed_out {
            *changed = true;
            self.kill_conn(
                op.conn,
                format!("{name} timed out after {:?}", self.timeout),
            );
        }
        if let Some(err) = op.error.take() {
            if !op.inflight.is_empty() {
                // Requests still in flight after a failure: force-close the endpoint (UCX
                // cancels what it can) and reply now; the requests, and the memory they
                // may still touch, are kept until UCX is done with them.
                self.kill_conn(op.conn, format!("{name} failed"));
                self.abandoned.push(Abandoned {
                    conn: op.conn,
                    requests: std::mem::take(&mut op.inflight),
                    keep: std::mem::take(&mut op.keep),
                });
            }
            *changed = true;
            return finish_conn(&mut self.conns, op, Err(err));
        }
        false
    }

    /// Force-closes `conn`'s endpoint (outstanding requests complete as cancelled) and
    /// marks it dead with `reason`.
    fn kill_conn(&mut self, conn: u64, reason: String) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if c.dead.is_none() {
            tracing::warn!(
                "ucx transport {}: connection to {} closed: {reason}",
                self.name,
                c.peer
            );
            c.dead = Some(reason);
        }
        if !c.ep.is_null() {
            let ep = std::mem::replace(&mut c.ep, ptr::null_mut());
            if let Some(req) = force_close(ep) {
                self.orphans.push((req, Instant::now() + DRAIN_GRACE));
            }
        }
    }

    /// Moves closing connections along; true if any changed.
    fn step_conns(&mut self, now: Instant) -> bool {
        let mut changed = false;
        let mut done = Vec::new();
        let grace = self.timeout.min(CLOSE_GRACE);
        let abandoned: Vec<u64> = self.abandoned.iter().map(|a| a.conn).collect();
        for (id, conn) in self.conns.iter_mut() {
            match &mut conn.state {
                ConnState::Open => {}
                // Requests may still use the endpoint's rkeys: wait for them.
                ConnState::CloseRequested if conn.ops > 0 || abandoned.contains(id) => {}
                ConnState::CloseRequested => {
                    changed = true;
                    if conn.ep.is_null() || conn.dead.is_some() {
                        // Nothing to flush to (destroy_conn force-closes a live one).
                        done.push(*id);
                        continue;
                    }
                    let param = sys::ucp_request_param_t::default();
                    // SAFETY: a live endpoint with no operation of ours in flight.
                    let flush = started(unsafe { sys::ucp_ep_flush_nbx(conn.ep, &param) });
                    match flush {
                        Ok(Some(req)) => {
                            conn.state = ConnState::Flushing {
                                flush: Some(req),
                                until: now + grace,
                            }
                        }
                        Ok(None) | Err(_) => done.push(*id),
                    }
                }
                ConnState::Flushing { flush, until } => {
                    let complete = flush.as_ref().is_none_or(|r| r.status() != UCS_INPROGRESS);
                    if complete || now >= *until {
                        if let Some(req) = flush.take() {
                            req.free();
                        }
                        changed = true;
                        done.push(*id);
                    }
                }
            }
        }
        for id in done {
            if let Some(conn) = self.conns.remove(&id) {
                self.destroy_conn(conn);
            }
        }
        changed
    }

    /// Destroys a connection's rkeys and force-closes its endpoint (no operation of ours
    /// may be using it).
    fn destroy_conn(&mut self, mut conn: Conn) {
        for (_, rkey) in conn.rkeys.drain() {
            // SAFETY: unpacked on this connection's endpoint and destroyed once; no
            // request using it is in flight (step_conns waits for operations and
            // abandoned requests; Drop frees those first, after the endpoint was
            // force-closed). ucp_rkey_destroy releases only the key's own memory, never
            // the endpoint, so a force-closed endpoint is no obstacle.
            unsafe { sys::ucp_rkey_destroy(rkey) };
        }
        if let ConnState::Flushing { flush, .. } = &mut conn.state {
            if let Some(req) = flush.take() {
                req.free();
            }
        }
        if !conn.ep.is_null() {
            if let Some(req) = force_close(conn.ep) {
                self.orphans.push((req, Instant::now() + DRAIN_GRACE));
            }
            conn.ep = ptr::null_mut();
        }
    }

    /// Graceful part of shutdown: operations get a short deadline, connections are
    /// flushed and closed, all bounded; `Drop` releases whatever is left.
    fn shutdown(&mut self) {
        let now = Instant::now();
        let grace = self.timeout.min(CLOSE_GRACE);
        let until = now + grace + DRAIN_GRACE + Duration::from_millis(100);
        for op in &mut self.ops {
            op.deadline = op.deadline.min(now + grace);
        }
        for conn in self.conns.values_mut() {
            if matches!(conn.state, ConnState::Open) {
                conn.state = ConnState::CloseRequested;
            }
        }
        while !(self.ops.is_empty()
            && self.conns.is_empty()
            && self.orphans.is_empty()
            && self.abandoned.is_empty())
            && Instant::now() < until
        {
            let busy = self.progress() | self.step();
            if !busy {
                self.wait(1);
            }
        }
    }
}

/// Force-closes `ep`; returns the close request if it is still in flight.
fn force_close(ep: sys::ucp_ep_h) -> Option<Request> {
    let param = sys::ucp_request_param_t {
        op_attr_mask: sys::ucp_op_attr_t_UCP_OP_ATTR_FIELD_FLAGS,
        flags: sys::ucp_ep_close_flags_t_UCP_EP_CLOSE_FLAG_FORCE,
        ..Default::default()
    };
    // SAFETY: a live endpoint, closed exactly once (callers null their copy).
    match started(unsafe { sys::ucp_ep_close_nbx(ep, &param) }) {
        Ok(req) => req,
        Err(st) => {
            tracing::debug!("ucp_ep_close_nbx: {}", status(st));
            None
        }
    }
}

/// Issues action `index` of `op` on `conn`.
fn issue(
    conn: &Conn,
    op: &Op,
    index: usize,
) -> std::result::Result<Option<Request>, sys::ucs_status_t> {
    let mut param = sys::ucp_request_param_t::default();
    let ptr = match op.kind {
        Kind::Put | Kind::Get => {
            let r = &op.ranges[index];
            if r.len == 0 {
                return Ok(None);
            }
            let Some(&rkey) = conn.rkeys.get(&r.region) else {
                return Err(sys::ucs_status_t_UCS_ERR_NO_ELEM);
            };
            if op.kind == Kind::Put {
                // SAFETY: live endpoint and rkey of this connection; the local range is
                // inside registered memory kept alive by the op (`keep`) until the
                // request completes; the remote range was checked against the peer's
                // descriptor.
                unsafe {
                    sys::ucp_put_nbx(
                        conn.ep,
                        r.local as *const c_void,
                        r.len,
                        r.remote,
                        rkey,
                        &param,
                    )
                }
            } else {
                // SAFETY: as for the put; the caller does not touch the destination
                // bytes while the read is in flight (RegionMemory's contract).
                unsafe {
                    sys::ucp_get_nbx(
                        conn.ep,
                        r.local as *mut c_void,
                        r.len,
                        r.remote,
                        rkey,
                        &param,
                    )
                }
            }
        }
        Kind::Notify => {
            // Eager only: the receiver copies the message out inside its callback.
            param.op_attr_mask = sys::ucp_op_attr_t_UCP_OP_ATTR_FIELD_FLAGS;
            param.flags = sys::ucp_send_am_flags_UCP_AM_SEND_FLAG_EAGER;
            // SAFETY: live endpoint; `payload` is owned by the op, which outlives the
            // request.
            unsafe {
                sys::ucp_am_send_nbx(
                    conn.ep,
                    AM_ID,
                    ptr::null(),
                    0,
                    op.payload.as_ptr().cast(),
                    op.payload.len(),
                    &param,
                )
            }
        }
    };
    started(ptr)
}

fn finish(op: &mut Op, result: Result<()>) -> bool {
    if let Some(reply) = op.reply.take() {
        let _ = reply.send(result);
    }
    true
}

fn finish_conn(conns: &mut HashMap<u64, Conn>, op: &mut Op, result: Result<()>) -> bool {
    if let Some(c) = conns.get_mut(&op.conn) {
        c.ops = c.ops.saturating_sub(1);
    }
    finish(op, result)
}

fn create_context() -> Result<sys::ucp_context_h> {
    let mut config: *mut sys::ucp_config_t = ptr::null_mut();
    // SAFETY: null prefix and file (read UCX_* from the environment); valid out-pointer.
    let st = unsafe { sys::ucp_config_read(ptr::null(), ptr::null(), &mut config) };
    ucx_call("ucp_config_read", st)?;
    for (name, value) in DEFAULTS {
        if std::env::var_os(format!("UCX_{name}")).is_some() {
            continue;
        }
        let (Ok(cname), Ok(cvalue)) = (CString::new(*name), CString::new(*value)) else {
            continue;
        };
        // SAFETY: valid config and NUL-terminated strings, copied by UCX.
        let st = unsafe { sys::ucp_config_modify(config, cname.as_ptr(), cvalue.as_ptr()) };
        if st != UCS_OK {
            tracing::debug!("ucp_config_modify {name}={value}: {}", status(st));
        }
    }
    let params = sys::ucp_params_t {
        field_mask: sys::ucp_params_field_UCP_PARAM_FIELD_FEATURES as u64,
        features: (sys::ucp_feature_UCP_FEATURE_RMA
            | sys::ucp_feature_UCP_FEATURE_AM
            | sys::ucp_feature_UCP_FEATURE_WAKEUP) as u64,
        ..Default::default()
    };
    let mut context: sys::ucp_context_h = ptr::null_mut();
    // SAFETY: valid params, config and out-pointer; the config is released once after.
    let st = unsafe {
        let st = sys::ucp_init_version(
            sys::UCP_API_MAJOR,
            sys::UCP_API_MINOR,
            &params,
            config,
            &mut context,
        );
        sys::ucp_config_release(config);
        st
    };
    ucx_call("ucp_init", st)?;
    Ok(context)
}

impl Drop for Engine {
    fn drop(&mut self) {
        // Force-close every endpoint first: UCX cancels what it can of the requests
        // still in flight, and progress lets the closes finish (bounded).
        let ids: Vec<u64> = self.conns.keys().copied().collect();
        for id in ids {
            self.kill_conn(id, "transport shut down".into());
        }
        let until = Instant::now() + DRAIN_GRACE;
        while !self.orphans.is_empty() && !self.worker.is_null() && Instant::now() < until {
            let busy = self.progress();
            for (req, until) in std::mem::take(&mut self.orphans) {
                if req.status() == UCS_INPROGRESS {
                    self.orphans.push((req, until));
                } else {
                    req.free();
                }
            }
            if !busy {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        for (req, _) in self.orphans.drain(..) {
            req.free();
        }
        // Requests still in flight are released; the memory they use is kept until the
        // worker is gone. Dropped replies tell waiting callers the thread stopped.
        for mut op in std::mem::take(&mut self.ops) {
            for req in op.inflight.drain(..) {
                req.free();
            }
            self.retained.append(&mut op.keep);
        }
        for mut group in std::mem::take(&mut self.abandoned) {
            for req in group.requests.drain(..) {
                req.free();
            }
            self.retained.append(&mut group.keep);
        }
        let conns: Vec<Conn> = self.conns.drain().map(|(_, c)| c).collect();
        for conn in conns {
            self.destroy_conn(conn);
        }
        for (_, memh) in self.memhs.drain() {
            // SAFETY: handles mapped by this context, unmapped once.
            unsafe { sys::ucp_mem_unmap(self.context, memh) };
        }
        if !self.worker.is_null() {
            // SAFETY: the worker is destroyed once, after every endpoint was closed; its
            // AM handler's argument (`am`) is dropped after this.
            unsafe { sys::ucp_worker_destroy(self.worker) };
            self.worker = ptr::null_mut();
        }
        if !self.context.is_null() {
            // SAFETY: the context is cleaned up once, after its worker and memory
            // handles are gone.
            unsafe { sys::ucp_cleanup(self.context) };
            self.context = ptr::null_mut();
        }
    }
}
