//! HTTP delivery on plain threads that never call into Postgres.
//!
//! The worker's main thread hands `Job`s to a fixed pool; each thread signs the body, POSTs it
//! through one shared keep-alive agent and sends back an `Outcome`, then writes a byte to a
//! pipe that the main thread waits on together with its latch. Destination addresses are
//! checked after DNS resolution, on every new connection.

use crate::shape::{self, Envelope, RenderError, Rendered, Shape};
use crate::{netcheck, signing};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use ureq::unversioned::resolver::{DefaultResolver, ResolvedSocketAddrs, Resolver};
use ureq::unversioned::transport::DefaultConnector;

pub const USER_AGENT: &str = concat!("pg_webhooks/", env!("CARGO_PKG_VERSION"));

/// What a masked header value shows (`webhooks.request()`).
pub const MASK: &str = "***";

/// How a subscription wants its requests signed.
#[derive(Clone, Debug)]
pub enum Signature {
    /// Standard Webhooks: `webhook-signature: v1,<base64>` (one per live secret).
    Standard,
    /// Lowercase hex HMAC of the raw body under the named header, newest secret only.
    Hex { header: String },
    /// HMAC-SHA256 as `signature_options` say (header, encoding, prefix, what is signed, a
    /// timestamp header), keyed by the secret's UTF-8 bytes, newest secret only.
    Hmac(signing::HmacOptions),
    /// Stripe's `t=<unix>,v1=<hex>[,v1=…]` under the named header, one `v1` per live secret.
    Stripe { header: String },
}

impl Signature {
    /// The style from a subscription's columns (`signature`, `signature_header`,
    /// `signature_options`), as subscribe stored them.
    pub fn from_columns(
        style: Option<&str>,
        header: Option<String>,
        options: Option<&str>,
    ) -> Self {
        match style {
            Some("hex") => Signature::Hex {
                header: header.unwrap_or_else(|| "X-Webhook-Signature".into()),
            },
            Some("hmac") => Signature::Hmac(signing::HmacOptions::from_stored(
                header.as_deref(),
                options,
            )),
            Some("stripe") => Signature::Stripe {
                header: header.unwrap_or_else(|| "Stripe-Signature".into()),
            },
            _ => Signature::Standard,
        }
    }
}

/// One attempt to make.
pub struct Job {
    pub delivery_id: i64,
    pub subscription_id: i64,
    pub event_id: String,
    pub event_type: String,
    pub created_at: String,
    pub data: String,
    pub url: String,
    pub signature: Signature,
    /// Newest first; the second one only during a rotation grace.
    pub secrets: Vec<String>,
    pub headers: Vec<(String, String)>,
    /// The subscription's TLS settings (`_secrets.tls`, JSON text), if any.
    pub tls: Option<String>,
    pub timeout: Duration,
    pub max_response_bytes: usize,
    /// Largest request body to send (`webhooks.max_payload_bytes`); a larger one is not sent.
    pub max_payload_bytes: usize,
    /// The subscription's request shape (event names, body template, headers), if it has one;
    /// `Err` if the stored shape cannot be read (every attempt then fails saying why).
    pub shape: Option<Result<Arc<Shape>, String>>,
    /// This attempt's number (1 for the first), for templates.
    pub attempt: i32,
}

/// What came of a job (deliveries of one subscription, sent one after the other): the attempts
/// made, in order, and the deliveries not attempted because an earlier one of the job did not
/// succeed (they are handed back as they were: a key's later deliveries wait behind it).
pub struct JobOutcome {
    pub subscription_id: i64,
    pub outcomes: Vec<Outcome>,
    pub skipped: Vec<i64>,
    /// For a growing chain (`Pool::submit_growing`): its tail's id.
    pub tail: Option<u64>,
    /// A report of a growing chain that goes on: these outcomes all succeeded, and the chain's
    /// next delivery (this one) is being sent. The job's slot stays taken.
    pub continues_with: Option<i64>,
    /// The chain is running low: the worker may append the next deliveries of its key.
    pub wants_more: bool,
}

/// The end of a chain that may grow while it is sent: the worker appends the next deliveries
/// of the chain's key, the HTTP thread sends them after those it has. Once the chain has ended
/// nothing more is taken.
pub struct Tail {
    id: u64,
    state: Mutex<TailState>,
}

struct TailState {
    jobs: Vec<Job>,
    ended: bool,
    /// The worker answered the chain's last ask (perhaps with nothing): it may ask again.
    answered: bool,
}

impl Tail {
    pub fn new(id: u64) -> Arc<Tail> {
        Arc::new(Tail { id, state: Mutex::new(TailState { jobs: Vec::new(), ended: false, answered: false }) })
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    /// Append `jobs` to the chain (the answer to its ask, perhaps empty); they come back if it
    /// has ended (nothing of them is sent).
    pub fn extend(&self, jobs: Vec<Job>) -> Result<(), Vec<Job>> {
        match self.state.lock() {
            Ok(mut s) if !s.ended => {
                s.jobs.extend(jobs);
                s.answered = true;
                Ok(())
            }
            _ => Err(jobs),
        }
    }

    /// What was appended since the last take, in order, and whether an answer came.
    fn take(&self) -> (Vec<Job>, bool) {
        match self.state.lock() {
            Ok(mut s) => (std::mem::take(&mut s.jobs), std::mem::take(&mut s.answered)),
            Err(_) => (Vec::new(), false),
        }
    }

    /// The chain ends: nothing is appended any more; what was appended and not taken comes back.
    fn end(&self) -> Vec<Job> {
        match self.state.lock() {
            Ok(mut s) => {
                s.ended = true;
                std::mem::take(&mut s.jobs)
            }
            Err(poisoned) => {
                let mut s = poisoned.into_inner();
                s.ended = true;
                std::mem::take(&mut s.jobs)
            }
        }
    }
}

/// A growing chain reports what it has done every this many outcomes (so that they are
/// recorded while it goes on, and its memory stays bounded)...
const REPORT_EVERY: usize = 500;
/// ... and asks for more when this many deliveries or fewer are left to send.
pub const LOW_WATER: usize = 1_000;

/// What an HTTP thread is handed: a chain, and its tail if it may grow.
struct Chain {
    jobs: Vec<Job>,
    tail: Option<Arc<Tail>>,
}

/// What came of one attempt.
pub struct Outcome {
    pub delivery_id: i64,
    pub subscription_id: i64,
    pub started_at: SystemTime,
    pub duration_ms: f64,
    pub status: Option<u16>,
    pub response_body: Option<String>,
    pub error: Option<String>,
    pub retry_after: Option<String>,
    /// Bytes of the request body sent (0 when none could be built).
    pub bytes_sent: u64,
    /// (body bytes, cap) when the body was larger than `max_payload_bytes` and nothing was
    /// sent: the delivery can never succeed, so it ends dead at once.
    pub oversized: Option<(usize, usize)>,
}

impl Outcome {
    /// Whether the endpoint acknowledged it (any 2xx).
    pub fn succeeded(&self) -> bool {
        self.status.is_some_and(|s| (200..300).contains(&s))
    }
}

/// The request's event type, body and the shape's headers. Without a shape the body is the
/// compact envelope `{"id","type","created_at","data"}`, in that order, `data` the stored jsonb
/// text with its insignificant white space removed, never re-parsed, so numbers such as
/// `59.90` or a 30-digit numeric reach the receiver exactly as stored. `timestamp` is the
/// attempt's unix seconds; the body is capped at `max_bytes` (src/shape.rs).
pub fn shaped(job: &Job, timestamp: i64, max_bytes: usize) -> Result<Rendered, RenderError> {
    let shape = match &job.shape {
        None => None,
        Some(Ok(shape)) => Some(shape.as_ref()),
        Some(Err(e)) => return Err(RenderError::Failed(e.clone())),
    };
    let envelope = Envelope {
        event_id: &job.event_id,
        event_type: &job.event_type,
        created_at: &job.created_at,
        data: &job.data,
        delivery_id: job.delivery_id,
        attempt: job.attempt,
        timestamp,
        subscription_id: job.subscription_id,
    };
    shape::render(shape, &envelope, max_bytes)
}

/// The headers pg_webhooks sets on the request for `job`, in the order it sets them, names in
/// lower case as they go on the wire (the HTTP client adds `host`, `content-length`, `accept`,
/// and `user-agent` unless a custom header sets one). `timestamp` is the attempt's unix
/// seconds, `body` what `shaped()` made, `shape_headers` its headers. With `masked`, no signature is computed: each one's
/// value is shown as `***` (`v1,***` per secret in the standard style, so a rotation's two
/// signatures show as two), and so is every custom header value, all of which may be secrets.
pub fn headers(
    job: &Job,
    timestamp: i64,
    body: &[u8],
    shape_headers: &[(String, String)],
    masked: bool,
) -> Result<Vec<(String, String)>, String> {
    let mut out = vec![
        ("content-type".to_string(), "application/json".to_string()),
        ("webhook-id".to_string(), job.event_id.clone()),
        ("webhook-timestamp".to_string(), timestamp.to_string()),
    ];
    for (name, value) in &job.headers {
        let value = if masked {
            MASK.to_string()
        } else {
            value.clone()
        };
        out.push((name.to_ascii_lowercase(), value));
    }
    // The shape's event type and delivery id headers: not secrets, shown as sent.
    for (name, value) in shape_headers {
        out.push((name.to_ascii_lowercase(), value.clone()));
    }
    match &job.signature {
        Signature::Standard => {
            let value = if masked {
                vec![format!("v1,{MASK}"); job.secrets.len().max(1)].join(" ")
            } else {
                let secrets: Vec<&str> = job.secrets.iter().map(String::as_str).collect();
                signing::standard_signature_header(&secrets, &job.event_id, timestamp, body)
                    .map_err(|e| format!("cannot sign: {e}"))?
            };
            out.push(("webhook-signature".to_string(), value));
        }
        Signature::Hex { header } => {
            let value = if masked {
                MASK.to_string()
            } else {
                let secret = job.secrets.first().map(String::as_str).unwrap_or_default();
                signing::sign_hex(secret, body)
            };
            out.push((header.to_ascii_lowercase(), value));
        }
        Signature::Hmac(options) => {
            if let Some(name) = &options.timestamp_header {
                out.push((name.to_ascii_lowercase(), options.timestamp_text(timestamp)));
            }
            let value = if masked {
                format!("{}{MASK}", options.prefix)
            } else {
                let secret = job.secrets.first().map(String::as_str).unwrap_or_default();
                options.sign(secret, timestamp, body)
            };
            out.push((options.header.to_ascii_lowercase(), value));
        }
        Signature::Stripe { header } => {
            let value = if masked {
                let v1 = vec![format!("v1={MASK}"); job.secrets.len().max(1)].join(",");
                format!("t={timestamp},{v1}")
            } else {
                let secrets: Vec<&str> = job.secrets.iter().map(String::as_str).collect();
                signing::stripe_signature_header(&secrets, timestamp, body)
            };
            out.push((header.to_ascii_lowercase(), value));
        }
    }
    Ok(out)
}

/// How long a host's addresses are used again without asking the system resolver. ureq
/// resolves before it looks for a pooled connection, so without this every request resolved,
/// and with a deadline set the system resolver runs on a thread spawned for each lookup (a
/// thread per request: most of an HTTP thread's time on a keep-alive connection). A pooled
/// connection goes on using the address it was opened with for up to its idle age (60 s)
/// anyway, so reusing a lookup for a few seconds is no staler than the pool.
const RESOLVED_FOR: Duration = Duration::from_secs(5);
/// Hosts remembered at most (all are forgotten when it is full: memory stays bounded).
const RESOLVED_MAX: usize = 1024;

/// Resolves with the system resolver, then drops addresses a webhook must not reach. What the
/// system resolver said is remembered for RESOLVED_FOR; the check runs on every request (a
/// change of webhooks.allow_private_network applies at once).
struct CheckedResolver {
    inner: DefaultResolver,
    allow_private: Arc<AtomicBool>,
    resolved: Mutex<std::collections::HashMap<String, (Instant, ResolvedSocketAddrs)>>,
}

impl std::fmt::Debug for CheckedResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckedResolver").finish_non_exhaustive()
    }
}

impl CheckedResolver {
    fn new(allow_private: Arc<AtomicBool>) -> Self {
        CheckedResolver {
            inner: DefaultResolver::default(),
            allow_private,
            resolved: Mutex::default(),
        }
    }

    /// The system resolver's addresses for `uri`'s scheme, host and port, remembered (by
    /// those alone: a URL's credentials are not kept as part of the key).
    fn lookup(
        &self,
        uri: &ureq::http::Uri,
        config: &ureq::config::Config,
        timeout: ureq::unversioned::transport::NextTimeout,
    ) -> Result<ResolvedSocketAddrs, ureq::Error> {
        let key = format!(
            "{}://{}:{:?}",
            uri.scheme_str().unwrap_or(""),
            uri.host().unwrap_or(""),
            uri.port_u16()
        );
        let now = Instant::now();
        {
            let cache = self.resolved.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((at, addrs)) = cache.get(&key) {
                if now.duration_since(*at) < RESOLVED_FOR {
                    return Ok(addrs.clone());
                }
            }
        }
        // Failures are not remembered: the next request asks again.
        let addrs = self.inner.resolve(uri, config, timeout)?;
        let mut cache = self.resolved.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= RESOLVED_MAX {
            cache.clear();
        }
        cache.insert(key, (now, addrs.clone()));
        Ok(addrs)
    }
}

impl Resolver for CheckedResolver {
    fn resolve(
        &self,
        uri: &ureq::http::Uri,
        config: &ureq::config::Config,
        timeout: ureq::unversioned::transport::NextTimeout,
    ) -> Result<ResolvedSocketAddrs, ureq::Error> {
        let all = self.lookup(uri, config, timeout)?;
        if self.allow_private.load(Ordering::Relaxed) {
            return Ok(all);
        }
        let mut allowed = self.inner.empty();
        let mut refused: Option<(SocketAddr, &'static str)> = None;
        for addr in all.iter() {
            match netcheck::forbidden_reason(addr.ip()) {
                None => allowed.push(*addr),
                Some(reason) => refused = Some((*addr, reason)),
            }
        }
        match (allowed.len(), refused) {
            (0, Some((addr, reason))) => Err(ureq::Error::Io(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!(
                    "destination {} is {reason}; set webhooks.allow_private_network to allow it",
                    addr.ip()
                ),
            ))),
            _ => Ok(allowed),
        }
    }
}

/// How every agent of the pool is made: the same settings, the same checked resolver; only
/// the TLS configuration differs.
#[derive(Clone)]
struct AgentFactory {
    threads: usize,
    allow_private: Arc<AtomicBool>,
}

impl AgentFactory {
    /// An agent keeping up to `idle` idle connections per host, for up to `hosts` hosts.
    fn build(&self, tls: Option<ureq::tls::TlsConfig>, idle: usize, hosts: usize) -> ureq::Agent {
        let mut config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .proxy(None)
            .user_agent(USER_AGENT)
            .max_idle_connections(idle * hosts)
            .max_idle_connections_per_host(idle)
            .max_idle_age(Duration::from_secs(60));
        if let Some(tls) = tls {
            config = config.tls_config(tls);
        }
        let resolver = CheckedResolver::new(self.allow_private.clone());
        ureq::Agent::with_parts(config.build(), DefaultConnector::default(), resolver)
    }
}

/// Agents of the subscriptions that have TLS settings of their own (a client certificate, a
/// CA bundle), each with its own connections, by subscription. An agent is made again when the
/// subscription's settings change (they are compared with the ones it was made from), and the
/// least recently used is dropped beyond `MAX_TLS_AGENTS`, so memory stays bounded however
/// many such subscriptions come and go.
#[derive(Default)]
struct TlsAgents {
    entries: std::collections::HashMap<i64, TlsAgent>,
    clock: u64,
}

struct TlsAgent {
    settings: String,
    agent: Result<ureq::Agent, String>,
    used: u64,
}

const MAX_TLS_AGENTS: usize = 64;

/// Idle connections an HTTP thread's own agent keeps per host (see `Agents::own`), and hosts at
/// most.
const IDLE_PER_HOST_PER_THREAD: usize = 1;
const IDLE_HOSTS_PER_THREAD: usize = 4;
/// A chain this long, or one that grows, is sent with the thread's own agent.
const OWN_CONNECTION_FROM: usize = 32;

/// What an HTTP thread sends with: the agent the threads share, its own, or a subscription's
/// (shared by the threads).
struct Agents {
    /// For subscriptions without TLS settings of their own: connections kept for any thread,
    /// up to one per thread for each host.
    shared: ureq::Agent,
    /// This thread's own, for a long chain of such a subscription. The shared pool hands out
    /// its oldest idle connection first (ureq's pool is a FIFO): one thread sending a key's
    /// deliveries in order then used every kept connection in turn, a different one (and on a
    /// receiver with a thread per connection, a different thread, cold) for each request; on
    /// this machine a hot key went from about 14,500 to 10,000 deliveries/s once 32 connections
    /// were kept. The thread's own agent sends a long chain over one connection. Short jobs
    /// (one delivery, a few heads) stay on the shared pool: with many receivers a thread could
    /// keep connections to only a few of them, and would open one (and do a TLS handshake)
    /// for most requests.
    own: ureq::Agent,
    tls: Arc<Mutex<TlsAgents>>,
    factory: AgentFactory,
}

impl Agents {
    fn new(factory: AgentFactory) -> Self {
        Agents {
            shared: factory.build(None, factory.threads, 4),
            own: factory.build(None, IDLE_PER_HOST_PER_THREAD, IDLE_HOSTS_PER_THREAD),
            tls: Arc::default(),
            factory,
        }
    }

    /// Another thread's: its own agent, the rest shared.
    fn for_thread(&self) -> Self {
        Agents {
            shared: self.shared.clone(),
            own: self.factory.build(None, IDLE_PER_HOST_PER_THREAD, IDLE_HOSTS_PER_THREAD),
            tls: self.tls.clone(),
            factory: self.factory.clone(),
        }
    }

    /// The agent for `job`, sent as part of a long chain or not.
    fn for_job(&self, job: &Job, long_chain: bool) -> Result<ureq::Agent, String> {
        let Some(settings) = &job.tls else {
            return Ok(if long_chain { self.own.clone() } else { self.shared.clone() });
        };
        let mut cache = self.tls.lock().unwrap_or_else(|p| p.into_inner());
        cache.clock += 1;
        let now = cache.clock;
        if let Some(entry) = cache.entries.get_mut(&job.subscription_id) {
            if &entry.settings == settings {
                entry.used = now;
                return entry.agent.clone();
            }
        }
        let agent = crate::tls::TlsSettings::parse(settings)
            .and_then(|s| s.ureq_config())
            .map(|config| {
                self.factory
                    .build(Some(config), self.factory.threads.min(4), 4)
            })
            .map_err(|e| format!("the subscription's TLS settings cannot be used: {e}"));
        if cache.entries.len() >= MAX_TLS_AGENTS
            && !cache.entries.contains_key(&job.subscription_id)
        {
            let oldest = cache
                .entries
                .iter()
                .min_by_key(|(_, e)| e.used)
                .map(|(id, _)| *id);
            if let Some(id) = oldest {
                cache.entries.remove(&id);
            }
        }
        cache.entries.insert(
            job.subscription_id,
            TlsAgent {
                settings: settings.clone(),
                agent: agent.clone(),
                used: now,
            },
        );
        agent
    }
}

pub struct Pool {
    threads: usize,
    jobs: Sender<Chain>,
    outcomes: Receiver<JobOutcome>,
    wake_read: std::fs::File,
    allow_private: Arc<AtomicBool>,
}

impl Pool {
    /// Start `threads` HTTP threads with keep-alive agents (see `Agents`).
    pub fn start(threads: usize, allow_private: bool) -> std::io::Result<Pool> {
        Pool::start_with(threads, allow_private, attempt)
    }

    /// As `start`, with the function that makes one attempt (tests hand in one that panics).
    fn start_with(
        threads: usize,
        allow_private: bool,
        attempt: fn(&ureq::Agent, &Job) -> Outcome,
    ) -> std::io::Result<Pool> {
        let (wake_read, wake_write) = nonblocking_pipe()?;
        let wake_write = Arc::new(wake_write);
        let allow_private = Arc::new(AtomicBool::new(allow_private));
        let agents = Agents::new(AgentFactory {
            threads,
            allow_private: allow_private.clone(),
        });
        let (jobs_tx, jobs_rx) = channel::<Chain>();
        let (out_tx, out_rx) = channel::<JobOutcome>();
        let jobs_rx = Arc::new(Mutex::new(jobs_rx));
        for i in 0..threads {
            let agents = agents.for_thread();
            let jobs_rx = jobs_rx.clone();
            let out_tx = out_tx.clone();
            let wake_write = wake_write.clone();
            std::thread::Builder::new()
                .name(format!("pg_webhooks http {i}"))
                .spawn(move || loop {
                    let chain = match jobs_rx.lock() {
                        Ok(rx) => match rx.recv() {
                            Ok(chain) => chain,
                            Err(_) => return, // the pool was dropped
                        },
                        Err(_) => return,
                    };
                    let report = |done: JobOutcome| {
                        if out_tx.send(done).is_err() {
                            return false;
                        }
                        // Wake the main thread; a full pipe already means "wake up".
                        let _ = (&*wake_write).write(&[1u8]);
                        true
                    };
                    if !run_job(&agents, chain, attempt, &report) {
                        return;
                    }
                })?;
        }
        Ok(Pool {
            threads,
            jobs: jobs_tx,
            outcomes: out_rx,
            wake_read,
            allow_private,
        })
    }

    /// HTTP threads (jobs sent at once).
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Hand over a chain (one or more deliveries of one subscription, sent in order).
    pub fn submit(&self, chain: Vec<Job>) -> bool {
        self.jobs.send(Chain { jobs: chain, tail: None }).is_ok()
    }

    /// Hand over a chain that may grow through `tail` while it is sent. It reports every
    /// REPORT_EVERY outcomes while it goes on, and asks for more when it runs low.
    pub fn submit_growing(&self, chain: Vec<Job>, tail: Arc<Tail>) -> bool {
        self.jobs.send(Chain { jobs: chain, tail: Some(tail) }).is_ok()
    }

    /// Chains that are done, without waiting.
    pub fn ready(&self) -> Vec<JobOutcome> {
        let mut buf = [0u8; 256];
        while matches!((&self.wake_read).read(&mut buf), Ok(n) if n > 0) {}
        self.outcomes.try_iter().collect()
    }

    /// File descriptor that becomes readable when an outcome is ready.
    pub fn wake_fd(&self) -> i32 {
        self.wake_read.as_raw_fd()
    }

    pub fn set_allow_private(&self, allow: bool) {
        self.allow_private.store(allow, Ordering::Relaxed);
    }
}

fn nonblocking_pipe() -> std::io::Result<(std::fs::File, std::fs::File)> {
    use std::os::fd::FromRawFd;
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 writes two new descriptors into `fds`, which we then own.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    unsafe {
        Ok((
            std::fs::File::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        ))
    }
}

/// Send a chain's jobs one after the other, until one does not succeed. A panic while sending
/// ends that attempt with an error (retried like any other), never the thread: its slot is
/// always given back. A growing chain (with a tail) takes what is appended to it, and reports
/// as it goes (see `JobOutcome::continues_with`). Returns false when the pool is gone.
fn run_job(
    agents: &Agents,
    chain: Chain,
    attempt: fn(&ureq::Agent, &Job) -> Outcome,
    report: &dyn Fn(JobOutcome) -> bool,
) -> bool {
    let Chain { jobs, tail } = chain;
    let subscription_id = jobs.first().map(|j| j.subscription_id).unwrap_or(0);
    let new_outcome = || JobOutcome {
        subscription_id,
        outcomes: Vec::new(),
        skipped: Vec::new(),
        tail: tail.as_ref().map(|t| t.id()),
        continues_with: None,
        wants_more: false,
    };
    let mut done = new_outcome();
    let long_chain = tail.is_some() || jobs.len() >= OWN_CONNECTION_FROM;
    let mut pending: std::collections::VecDeque<Job> = jobs.into();
    // Whether this chain has asked for more since it was last given some.
    let mut asked = false;
    loop {
        if pending.is_empty() {
            if let Some(t) = &tail {
                let (more, answered) = t.take();
                asked &= !answered;
                pending.extend(more);
            }
        }
        let Some(job) = pending.pop_front() else { break };
        let outcome = match agents.for_job(&job, long_chain) {
            Ok(agent) => {
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| attempt(&agent, &job)))
                    .unwrap_or_else(|panic| panicked(&job, panic))
            }
            Err(e) => not_sent(&job, e),
        };
        // An oversized delivery ends dead and releases its key: the chain goes on.
        let ok = outcome.succeeded() || outcome.oversized.is_some();
        done.outcomes.push(outcome);
        if !ok {
            break;
        }
        let Some(t) = &tail else { continue };
        if done.outcomes.len() < REPORT_EVERY {
            continue;
        }
        // A report that the chain goes on names the delivery it sends next: there must be one.
        // (What was appended is taken now, so that the ask below counts it.)
        let (more, answered) = t.take();
        asked &= !answered;
        pending.extend(more);
        let Some(next) = pending.front() else { continue };
        let mut partial = std::mem::replace(&mut done, new_outcome());
        partial.continues_with = Some(next.delivery_id);
        partial.wants_more = !asked && pending.len() <= LOW_WATER;
        asked |= partial.wants_more;
        if !report(partial) {
            return false;
        }
    }
    done.skipped = pending.into_iter().map(|j| j.delivery_id).collect();
    if let Some(t) = &tail {
        // Appended and never taken: handed back as well.
        done.skipped.extend(t.end().into_iter().map(|j| j.delivery_id));
    }
    report(done)
}

fn unix_seconds(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Sign and POST one job; every failure becomes an `Outcome` with an error text.
fn attempt(agent: &ureq::Agent, job: &Job) -> Outcome {
    // Whole microseconds, as `webhooks.attempts.started_at` keeps it: the second it falls in
    // (the webhook-timestamp sent) is then the second `webhooks.request()` reads back.
    let now = SystemTime::now();
    let started_at = now
        .duration_since(UNIX_EPOCH)
        .map(|d| UNIX_EPOCH + Duration::from_micros(d.as_micros() as u64))
        .unwrap_or(now);
    let clock = Instant::now();
    let mut outcome = Outcome {
        delivery_id: job.delivery_id,
        subscription_id: job.subscription_id,
        started_at,
        duration_ms: 0.0,
        status: None,
        response_body: None,
        error: None,
        retry_after: None,
        bytes_sent: 0,
        oversized: None,
    };
    let timestamp = unix_seconds(started_at);
    let result = match shaped(job, timestamp, job.max_payload_bytes) {
        Ok(request) => {
            outcome.bytes_sent = request.body.len() as u64;
            send(agent, job, &request, timestamp)
        }
        Err(RenderError::Oversized(size)) => {
            outcome.oversized = Some((size, job.max_payload_bytes));
            // A template stops making its body as soon as it passes the cap.
            let templated = matches!(&job.shape, Some(Ok(s)) if s.body.is_some());
            Err(format!(
                "payload of {}{size} bytes exceeds webhooks.max_payload_bytes ({}); not sent",
                if templated { "at least " } else { "" },
                job.max_payload_bytes
            ))
        }
        Err(e @ RenderError::Failed(_)) => Err(e.to_string()),
    };
    outcome.duration_ms = clock.elapsed().as_secs_f64() * 1000.0;
    match result {
        Ok((status, body, retry_after)) => {
            outcome.status = Some(status);
            outcome.response_body = Some(body);
            outcome.retry_after = retry_after;
            if !(200..300).contains(&status) {
                outcome.error = Some(format!("HTTP {status}"));
            }
        }
        Err(e) => outcome.error = Some(e),
    }
    outcome
}

/// The outcome of an attempt that panicked.
fn panicked(job: &Job, panic: Box<dyn std::any::Any + Send>) -> Outcome {
    let what = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into());
    not_sent(job, format!("internal error in the HTTP thread: {what}"))
}

/// The outcome of an attempt that sent nothing, with why.
fn not_sent(job: &Job, error: String) -> Outcome {
    Outcome {
        delivery_id: job.delivery_id,
        subscription_id: job.subscription_id,
        started_at: SystemTime::now(),
        duration_ms: 0.0,
        status: None,
        response_body: None,
        error: Some(error),
        retry_after: None,
        bytes_sent: 0,
        oversized: None,
    }
}

fn send(
    agent: &ureq::Agent,
    job: &Job,
    shaped: &Rendered,
    timestamp: i64,
) -> Result<(u16, String, Option<String>), String> {
    let body = &shaped.body[..];
    let mut request = agent
        .post(&job.url)
        .config()
        .timeout_global(Some(job.timeout))
        .build();
    for (name, value) in headers(job, timestamp, body, &shaped.headers, false)? {
        request = request.header(name, value);
    }
    let mut response = request
        .send(body)
        .map_err(|e| closed_during_tls(describe(&e, &job.url), job))?;
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let mut kept = Vec::new();
    let read = response
        .body_mut()
        .as_reader()
        .take(job.max_response_bytes as u64)
        .read_to_end(&mut kept);
    if let Err(e) = read {
        return Err(format!("reading the response failed: {e}"));
    }
    Ok((
        status,
        String::from_utf8_lossy(&kept).into_owned(),
        retry_after,
    ))
}

/// A TLS 1.3 server that wants a client certificate checks it after the handshake, while the
/// request is being written: it sends its alert and closes, and the write can fail (broken
/// pipe, reset) before the alert is read. Said so, when no client certificate was sent.
fn closed_during_tls(text: String, job: &Job) -> String {
    let closed = text.contains("Broken pipe") || text.contains("Connection reset");
    let https = job.url.get(..8).is_some_and(|s| s.eq_ignore_ascii_case("https://"));
    let has_certificate = job.tls.as_deref().is_some_and(|t| t.contains("\"client_certificate\""));
    if closed && https && !has_certificate {
        format!(
            "{text} (the server closed the TLS connection while the request was sent: a server that requires a client certificate does this when none is sent, see webhooks.set_tls; one that closes idle connections can too)"
        )
    } else {
        text
    }
}

/// An error text without the URL's credentials.
fn describe(e: &ureq::Error, url: &str) -> String {
    let text = match e {
        ureq::Error::Timeout(_) => "timeout".to_string(),
        other => certificate_problem(&other.to_string()),
    };
    text.replace(url, &netcheck::mask_url(url))
}

/// rustls' "invalid peer certificate: UnknownIssuer" said plainly, the original kept at the
/// end; any other text as it is. (Matched on the text: ureq hands the rustls error over
/// inside an `io::Error`.)
fn certificate_problem(text: &str) -> String {
    const MARK: &str = "invalid peer certificate: ";
    let Some(at) = text.find(MARK) else {
        return client_certificate_problem(text);
    };
    let what = &text[at + MARK.len()..];
    let reason = if what.contains("UnknownIssuer") || what.contains("CaUsedAsEndEntity") {
        "it is self-signed or not issued by a trusted certificate authority (or the server does not send its intermediate certificates)"
    } else if what.contains("Expired") {
        "it has expired"
    } else if what.contains("NotValidYet") {
        "it is not valid yet"
    } else if what.contains("NotValidForName") {
        "it is not valid for the URL's host name"
    } else if what.contains("Revoked") {
        "it has been revoked"
    } else {
        "it did not verify"
    };
    format!("TLS certificate verification failed: {reason} ({what})")
}

/// A TLS alert from the server said plainly: most of them are about our client certificate
/// (none sent, or one the server does not accept). The original is kept at the end.
fn client_certificate_problem(text: &str) -> String {
    const MARK: &str = "received fatal alert: ";
    let Some(at) = text.find(MARK) else {
        return text.to_string();
    };
    let alert = &text[at + MARK.len()..];
    let reason = if alert.starts_with("CertificateRequired") {
        "the server requires a client certificate and none was sent (see webhooks.set_tls)"
    } else if [
        "UnknownCA",
        "BadCertificate",
        "CertificateUnknown",
        "UnsupportedCertificate",
        "AccessDenied",
    ]
    .iter()
    .any(|a| alert.starts_with(a))
    {
        "the server refused the client certificate (it is not issued by a CA the server trusts, or not accepted for this client)"
    } else if alert.starts_with("CertificateExpired") {
        "the server refused the client certificate: it has expired"
    } else if alert.starts_with("CertificateRevoked") {
        "the server refused the client certificate: it has been revoked"
    } else {
        "the server ended the TLS handshake"
    };
    format!("TLS handshake failed: {reason} (received fatal alert: {alert})")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(data: &str) -> Job {
        Job {
            delivery_id: 1,
            subscription_id: 2,
            event_id: "0b4e0a55-0000-4000-8000-000000000001".into(),
            event_type: "order.shipped".into(),
            created_at: "2026-11-23T10:00:00.000000Z".into(),
            data: data.into(),
            url: "http://127.0.0.1:9/".into(),
            signature: Signature::Standard,
            secrets: vec![],
            headers: vec![],
            tls: None,
            timeout: Duration::from_secs(1),
            max_response_bytes: 10,
            max_payload_bytes: 1 << 20,
            shape: None,
            attempt: 1,
        }
    }

    fn body(job: &Job) -> Result<Vec<u8>, RenderError> {
        shaped(job, 0, usize::MAX).map(|r| r.body)
    }

    #[test]
    fn body_is_the_compact_envelope_with_data_exactly_as_stored() {
        let stored = r#"{"id": 7, "note": "a: b, \"c\" d", "total": 59.90, "big": 123456789012345678901234567890.5, "items": [{"sku": "A"}]}"#;
        let text = String::from_utf8(body(&job(stored)).expect("valid")).expect("utf8");
        assert_eq!(
            text,
            r#"{"id":"0b4e0a55-0000-4000-8000-000000000001","type":"order.shipped","created_at":"2026-11-23T10:00:00.000000Z","data":{"id":7,"note":"a: b, \"c\" d","total":59.90,"big":123456789012345678901234567890.5,"items":[{"sku":"A"}]}}"#
        );
        let v: serde_json::Value = serde_json::from_str(&text).expect("the body is valid JSON");
        assert_eq!(v["data"]["items"][0]["sku"], "A");
    }

    fn panics_on_odd_ids(_agent: &ureq::Agent, job: &Job) -> Outcome {
        if job.delivery_id % 2 == 1 {
            panic!("injected panic for delivery {}", job.delivery_id);
        }
        panicked(job, Box::new("not really"))
    }

    #[test]
    fn a_panicking_attempt_gives_back_its_slot_and_the_thread_goes_on() {
        let pool = Pool::start_with(1, true, panics_on_odd_ids).expect("pool");
        for id in 1..=6 {
            let mut j = job("{}");
            j.delivery_id = id;
            assert!(pool.submit(vec![j]));
        }
        let mut outcomes = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while outcomes.len() < 6 && Instant::now() < deadline {
            outcomes.extend(pool.ready().into_iter().flat_map(|c| c.outcomes));
            std::thread::sleep(Duration::from_millis(5));
        }
        // One thread: had the first panic killed it, nothing after delivery 1 would come back.
        let mut ids: Vec<i64> = outcomes.iter().map(|o| o.delivery_id).collect();
        ids.sort();
        assert_eq!(ids, [1, 2, 3, 4, 5, 6]);
        for o in outcomes.iter().filter(|o| o.delivery_id % 2 == 1) {
            let e = o.error.as_deref().unwrap_or_default();
            assert!(e.contains("injected panic for delivery"), "{e}");
            assert_eq!(o.status, None);
        }
    }

    fn fails_delivery_3(_agent: &ureq::Agent, job: &Job) -> Outcome {
        let mut o = panicked(job, Box::new("unused"));
        o.error = None;
        o.status = Some(if job.delivery_id == 3 { 500 } else { 200 });
        o
    }

    #[test]
    fn a_chain_stops_at_its_first_failure_and_hands_back_the_rest() {
        let pool = Pool::start_with(2, true, fails_delivery_3).expect("pool");
        let chain = |ids: std::ops::RangeInclusive<i64>| {
            ids.map(|id| {
                let mut j = job("{}");
                j.delivery_id = id;
                j
            })
            .collect::<Vec<_>>()
        };
        assert!(pool.submit(chain(1..=6)));
        assert!(pool.submit(chain(10..=12)));
        let mut done = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while done.len() < 2 && Instant::now() < deadline {
            done.extend(pool.ready());
            std::thread::sleep(Duration::from_millis(5));
        }
        done.sort_by_key(|c| c.outcomes.first().map(|o| o.delivery_id));
        let ids = |c: &JobOutcome| c.outcomes.iter().map(|o| o.delivery_id).collect::<Vec<_>>();
        assert_eq!(done.len(), 2);
        assert_eq!(ids(&done[0]), [1, 2, 3], "sent in order, up to the failure");
        assert_eq!(done[0].skipped, [4, 5, 6]);
        assert_eq!(ids(&done[1]), [10, 11, 12]);
        assert!(done[1].skipped.is_empty());
        assert_eq!(done[0].subscription_id, 2);
    }

    static GATE_OPEN: AtomicBool = AtomicBool::new(false);

    /// Succeeds, but delivery 520 waits for the gate, and 600 fails.
    fn gated_fails_600(_agent: &ureq::Agent, job: &Job) -> Outcome {
        if job.delivery_id == 520 {
            let deadline = Instant::now() + Duration::from_secs(20);
            while !GATE_OPEN.load(Ordering::SeqCst) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        let mut o = panicked(job, Box::new("unused"));
        o.error = None;
        o.status = Some(if job.delivery_id == 600 { 500 } else { 200 });
        o
    }

    #[test]
    fn a_growing_chain_reports_as_it_goes_takes_what_is_appended_and_hands_back_the_rest() {
        let pool = Pool::start_with(1, true, gated_fails_600).expect("pool");
        let jobs = |ids: std::ops::RangeInclusive<i64>| {
            ids.map(|id| {
                let mut j = job("{}");
                j.delivery_id = id;
                j
            })
            .collect::<Vec<_>>()
        };
        let next = |pool: &Pool| {
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if let Some(o) = pool.outcomes.try_recv().ok() {
                    return o;
                }
                assert!(Instant::now() < deadline, "no report");
                std::thread::sleep(Duration::from_millis(1));
            }
        };
        let ids = |c: &JobOutcome| c.outcomes.iter().map(|o| o.delivery_id).collect::<Vec<_>>();
        let tail = Tail::new(7);
        assert!(pool.submit_growing(jobs(1..=550), tail.clone()));
        // After REPORT_EVERY outcomes: a report that it goes on, naming what it sends next, and
        // asking for more (50 left, under LOW_WATER).
        let first = next(&pool);
        assert_eq!(ids(&first), (1..=500).collect::<Vec<_>>());
        assert_eq!(first.continues_with, Some(501));
        assert!(first.wants_more);
        assert_eq!(first.tail, Some(7));
        assert!(first.skipped.is_empty());
        // Appended while it runs: sent after what it has, in order, until 600 fails.
        assert!(tail.extend(jobs(551..=650)).is_ok());
        GATE_OPEN.store(true, Ordering::SeqCst);
        let last = next(&pool);
        assert_eq!(ids(&last), (501..=600).collect::<Vec<_>>());
        assert_eq!(last.continues_with, None, "the chain has ended");
        assert_eq!(last.skipped, (601..=650).collect::<Vec<_>>(), "the rest handed back, unsent");
        assert_eq!(last.outcomes.last().and_then(|o| o.status), Some(500));
        // An ended chain takes nothing more.
        assert!(tail.extend(jobs(651..=652)).is_err());
    }

    #[test]
    fn a_write_refused_by_a_tls_server_says_a_client_certificate_may_be_wanted() {
        let mut j = job("{}");
        j.url = "https://shop.example/hooks".into();
        let hinted = closed_during_tls("io: Broken pipe (os error 32)".into(), &j);
        assert!(hinted.starts_with("io: Broken pipe (os error 32) ("), "{hinted}");
        assert!(hinted.contains("requires a client certificate"), "{hinted}");
        // Not when one was sent, not over plain HTTP, not for other errors.
        j.tls = Some(r#"{"client_certificate": "x", "client_key": "y"}"#.into());
        assert_eq!(closed_during_tls("io: Broken pipe (os error 32)".into(), &j), "io: Broken pipe (os error 32)");
        j.tls = None;
        j.url = "http://shop.example/hooks".into();
        assert_eq!(closed_during_tls("io: Connection reset by peer".into(), &j), "io: Connection reset by peer");
        j.url = "https://shop.example/hooks".into();
        assert_eq!(closed_during_tls("timeout".into(), &j), "timeout");
    }

    #[test]
    fn an_oversized_body_is_not_sent_and_says_its_size() {
        // Nothing listens on the discard port: had a request been tried, the error would be a
        // connection error.
        let mut j = job(r#"{"note": "0123456789012345678901234567890123456789"}"#);
        let size = body(&j).expect("valid").len();
        j.max_payload_bytes = size - 1;
        let o = attempt(&ureq::Agent::new_with_defaults(), &j);
        assert_eq!(o.oversized, Some((size, size - 1)));
        assert_eq!(o.bytes_sent, 0);
        assert_eq!(o.status, None);
        let e = o.error.as_deref().unwrap_or_default();
        assert_eq!(
            e,
            format!(
                "payload of {size} bytes exceeds webhooks.max_payload_bytes ({}); not sent",
                size - 1
            )
        );
        j.max_payload_bytes = size;
        let o = attempt(&ureq::Agent::new_with_defaults(), &j);
        assert_eq!(o.oversized, None, "a body of exactly the cap is sent");
    }

    #[test]
    fn certificate_problems_are_said_plainly() {
        let t = certificate_problem(
            "io: invalid peer certificate: Other(OtherError(CaUsedAsEndEntity))",
        );
        assert!(
            t.starts_with("TLS certificate verification failed: it is self-signed"),
            "{t}"
        );
        assert!(t.ends_with("(Other(OtherError(CaUsedAsEndEntity)))"), "{t}");
        let t = certificate_problem("io: invalid peer certificate: UnknownIssuer");
        assert!(t.contains("self-signed or not issued by a trusted"), "{t}");
        let t = certificate_problem("io: invalid peer certificate: ExpiredContext { time: .. }");
        assert!(t.contains("it has expired"), "{t}");
        let t = certificate_problem("io: invalid peer certificate: NotValidForNameContext { .. }");
        assert!(t.contains("host name"), "{t}");
        assert_eq!(
            certificate_problem("io: Connection refused"),
            "io: Connection refused"
        );
    }

    /// A keep-alive HTTP server on 127.0.0.1 that answers every request with 200, and tells, per
    /// request, which of its connections (numbered as accepted) it came on. The first request
    /// of each connection is answered only once `together` connections have sent theirs (or
    /// after 10 s), so that that many are open at once.
    fn counting_server(together: usize) -> (String, std::sync::mpsc::Receiver<usize>) {
        use std::io::{BufRead, BufReader};
        use std::sync::Condvar;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
        let (tx, rx) = channel();
        let arrived = Arc::new((Mutex::new(0usize), Condvar::new()));
        std::thread::spawn(move || {
            for (n, stream) in listener.incoming().enumerate() {
                let Ok(stream) = stream else { return };
                let tx = tx.clone();
                let arrived = arrived.clone();
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
                    let mut out = stream;
                    let mut first = true;
                    loop {
                        let mut length = 0usize;
                        let mut line = String::new();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        loop {
                            line.clear();
                            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                                return;
                            }
                            let l = line.trim_end().to_ascii_lowercase();
                            if l.is_empty() {
                                break;
                            }
                            if let Some(v) = l.strip_prefix("content-length:") {
                                length = v.trim().parse().unwrap_or(0);
                            }
                        }
                        let mut body = vec![0u8; length];
                        if reader.read_exact(&mut body).is_err() {
                            return;
                        }
                        if std::mem::take(&mut first) {
                            let (count, all_in) = &*arrived;
                            let mut count = count.lock().expect("count");
                            *count += 1;
                            all_in.notify_all();
                            let _ = all_in
                                .wait_timeout_while(count, Duration::from_secs(10), |c| *c < together)
                                .expect("wait");
                        }
                        if tx.send(n).is_err()
                            || out.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").is_err()
                        {
                            return;
                        }
                    }
                });
            }
        });
        (url, rx)
    }

    #[test]
    fn a_long_chain_is_sent_over_one_connection_however_many_are_kept() {
        let (url, seen) = counting_server(4);
        let pool = Pool::start(4, true).expect("pool");
        let chain = |first: i64, n: i64| -> Vec<Job> {
            (first..first + n)
                .map(|id| {
                    let mut j = job("{}");
                    j.delivery_id = id;
                    j.url = url.clone();
                    j
                })
                .collect()
        };
        let wait = |n: usize| {
            let mut got = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(30);
            while got.len() < n && Instant::now() < deadline {
                got.extend(pool.ready().into_iter().flat_map(|c| c.outcomes));
                std::thread::sleep(Duration::from_millis(5));
            }
            assert_eq!(got.len(), n, "every attempt came back");
            assert!(got.iter().all(Outcome::succeeded), "all answered 200");
        };
        // Four single deliveries at once, answered only when all four have arrived: four
        // threads, four connections, all kept in the shared pool.
        for id in 0..4 {
            assert!(pool.submit(chain(id * 10, 1)));
        }
        wait(4);
        let first: std::collections::HashSet<usize> = seen.try_iter().collect();
        assert_eq!(first.len(), 4, "four connections were opened: {first:?}");
        // Then one key's long chain: every request over one connection, not over each kept
        // connection in turn (as the shared pool hands them out).
        let n = OWN_CONNECTION_FROM as i64 + 8;
        assert!(pool.submit(chain(100, n)));
        wait(n as usize);
        let used: Vec<usize> = seen.try_iter().collect();
        assert_eq!(used.len(), n as usize);
        assert!(used.iter().all(|c| *c == used[0]), "one connection: {used:?}");
        assert!(!first.contains(&used[0]), "the sending thread's own, not a shared one: {used:?}");
        // A short job still uses the kept ones.
        assert!(pool.submit(chain(200, 2)));
        wait(2);
        let short: Vec<usize> = seen.try_iter().collect();
        assert!(short.iter().all(|c| first.contains(c)), "kept connections: {short:?}");
    }

    #[test]
    fn tls_agents_are_per_subscription_remade_on_change_and_bounded() {
        let agents = Agents::new(AgentFactory {
            threads: 2,
            allow_private: Arc::new(AtomicBool::new(false)),
        });
        let mut j = job("{}");
        assert!(
            agents.for_job(&j, false).is_ok(),
            "no TLS settings: the shared agent"
        );
        assert!(agents.tls.lock().expect("cache").entries.is_empty());
        // Settings that cannot be used: the attempt fails with why, and the verdict is kept
        // like an agent would be.
        j.tls = Some(r#"{"ca_bundle": "no PEM here"}"#.into());
        let e = agents.for_job(&j, false).err().unwrap_or_default();
        assert!(
            e.starts_with("the subscription's TLS settings cannot be used: tls \"ca_bundle\""),
            "{e}"
        );
        j.tls = Some(r#"{"nope": 1}"#.into());
        let e = agents.for_job(&j, false).err().unwrap_or_default();
        assert!(
            e.contains("unknown key"),
            "changed settings are used at once: {e}"
        );
        assert_eq!(agents.tls.lock().expect("cache").entries.len(), 1);
        for id in 0..(MAX_TLS_AGENTS as i64 * 3) {
            j.subscription_id = 1000 + id;
            let _ = agents.for_job(&j, false);
        }
        let cache = agents.tls.lock().expect("cache");
        assert_eq!(cache.entries.len(), MAX_TLS_AGENTS);
        assert!(
            cache
                .entries
                .contains_key(&(1000 + MAX_TLS_AGENTS as i64 * 3 - 1)),
            "the newest stays"
        );
        assert!(
            !cache.entries.contains_key(&2),
            "the least recently used went first"
        );
    }

    #[test]
    fn lookups_are_remembered_and_the_network_check_runs_on_every_request() {
        let allow = Arc::new(AtomicBool::new(true));
        let resolver = CheckedResolver::new(allow.clone());
        let config = ureq::Agent::config_builder().build();
        let uri: ureq::http::Uri = "http://127.0.0.1:9/hook".parse().unwrap();
        let timeout = ureq::unversioned::transport::NextTimeout::default();
        let first = resolver.resolve(&uri, &config, timeout).expect("allowed");
        assert_eq!(first.iter().map(|a| a.to_string()).collect::<Vec<_>>(), ["127.0.0.1:9"]);
        assert_eq!(resolver.resolved.lock().unwrap().len(), 1);
        // Remembered: another path on the same host and port is the same entry.
        let other: ureq::http::Uri = "http://127.0.0.1:9/other".parse().unwrap();
        resolver.resolve(&other, &config, timeout).expect("allowed");
        assert_eq!(resolver.resolved.lock().unwrap().len(), 1);
        // The check is not remembered: turning private networks off refuses the cached address.
        allow.store(false, Ordering::Relaxed);
        let refused = resolver.resolve(&uri, &config, timeout).unwrap_err().to_string();
        assert!(refused.contains("set webhooks.allow_private_network"), "{refused}");
        // An old entry is asked again.
        allow.store(true, Ordering::Relaxed);
        resolver
            .resolved
            .lock()
            .unwrap()
            .values_mut()
            .for_each(|(at, _)| *at -= RESOLVED_FOR);
        let mut stale = resolver.inner.empty();
        stale.push("127.0.0.2:9".parse().unwrap());
        resolver
            .resolved
            .lock()
            .unwrap()
            .values_mut()
            .for_each(|(_, addrs)| *addrs = stale.clone());
        let again = resolver.resolve(&uri, &config, timeout).expect("allowed");
        assert_eq!(again.iter().map(|a| a.to_string()).collect::<Vec<_>>(), ["127.0.0.1:9"]);
        // Bounded: a full table is emptied before the next host is remembered.
        for port in 0..RESOLVED_MAX + 10 {
            let uri: ureq::http::Uri = format!("http://127.0.0.1:{}/", 1000 + port).parse().unwrap();
            resolver.resolve(&uri, &config, timeout).expect("allowed");
        }
        assert!(resolver.resolved.lock().unwrap().len() <= RESOLVED_MAX);
    }

    #[test]
    fn describe_masks_credentials() {
        let url = "https://bob:pw@example.invalid/x";
        let e = ureq::Error::BadUri(format!("bad {url}"));
        let text = describe(&e, url);
        assert!(!text.contains(":pw@"), "{text}");
    }
}
