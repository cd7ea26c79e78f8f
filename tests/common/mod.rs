//! Real parts for end-to-end tests: a throwaway PostgreSQL cluster with the installed
//! extension preloaded, and the Python receiver (tests/receiver.py) on 127.0.0.1, which
//! verifies signatures with the official `standardwebhooks` library.
#![allow(dead_code)]

use postgres::error::SqlState;
use postgres::{Client, NoTls};
use serde_json::Value;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn pg_bindir() -> PathBuf {
    let pg_config = std::env::var("PG_CONFIG").unwrap_or_else(|_| "/usr/bin/pg_config".into());
    let out = Command::new(&pg_config)
        .arg("--bindir")
        .output()
        .expect("run pg_config");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

/// Run a PostgreSQL program as the `postgres` user when we are root (initdb refuses root).
fn pg_command(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// A fresh, empty directory for a cluster, owned by the user PostgreSQL runs as.
fn cluster_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pg_webhooks_{name}_{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("mkdir");
    if is_root() {
        let ok = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(&dir)
            .status()
            .expect("chown");
        assert!(ok.success(), "chown of the test cluster directory failed");
    }
    dir
}

pub struct Cluster {
    pub port: u16,
    pub dir: PathBuf,
    bindir: PathBuf,
}

impl Cluster {
    /// initdb + start with pg_webhooks preloaded; `settings` are extra postgresql.conf lines.
    pub fn start(name: &str, settings: &[&str]) -> Cluster {
        let bindir = pg_bindir();
        let dir = cluster_dir(name);
        let data = dir.join("data");
        let status = pg_command(&bindir.join("initdb"))
            .args([
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
                "-E",
                "UTF8",
                "-D",
            ])
            .arg(&data)
            .stdout(Stdio::null())
            .status()
            .expect("initdb");
        assert!(status.success(), "initdb failed");
        let port = free_port();
        let mut conf = format!(
            "port = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             shared_preload_libraries = 'pg_webhooks'\nfsync = off\n\
             webhooks.database = 'postgres'\nwebhooks.allow_http = on\nwebhooks.allow_private_network = on\n\
             log_min_messages = warning\n",
            dir.display()
        );
        for s in settings {
            conf.push_str(s);
            conf.push('\n');
        }
        std::fs::write(data.join("postgresql.auto.conf"), conf).expect("write conf");
        let cluster = Cluster { port, dir, bindir };
        cluster.pg_ctl(
            &["start", "-w", "-t", "60", "-l"],
            Some(&cluster.dir.join("server.log")),
        );
        let mut c = cluster.connect();
        c.batch_execute("CREATE EXTENSION pg_webhooks")
            .expect("create extension");
        cluster
    }

    fn pg_ctl(&self, args: &[&str], extra: Option<&Path>) {
        let mut cmd = pg_command(&self.bindir.join("pg_ctl"));
        cmd.arg("-D").arg(self.dir.join("data")).args(args);
        if let Some(p) = extra {
            cmd.arg(p);
        }
        let status = cmd.stdout(Stdio::null()).status().expect("pg_ctl");
        assert!(
            status.success(),
            "pg_ctl {args:?} failed; see {}",
            self.dir.join("server.log").display()
        );
    }

    pub fn connect(&self) -> Client {
        self.connect_db("postgres")
    }

    pub fn connect_db(&self, db: &str) -> Client {
        self.connect_as(db, "postgres")
    }

    /// A connection as `user` (trust authentication: tests play every role).
    pub fn connect_as(&self, db: &str, user: &str) -> Client {
        self.connect_as_result(db, user).expect("connect")
    }

    pub fn connect_as_result(&self, db: &str, user: &str) -> Result<Client, postgres::Error> {
        Client::connect(
            &format!(
                "host=127.0.0.1 port={} user={user} dbname='{}'",
                self.port,
                db.replace('\\', "\\\\").replace('\'', "\\'")
            ),
            NoTls,
        )
    }

    /// Stop cleanly and start again (settings in postgresql.auto.conf are read anew).
    pub fn restart(&self) {
        self.pg_ctl(&["stop", "-m", "fast", "-w"], None);
        self.pg_ctl(
            &["start", "-w", "-t", "60", "-l"],
            Some(&self.dir.join("server.log")),
        );
    }

    /// A streaming standby of this cluster (pg_basebackup -R), started and in recovery.
    pub fn start_standby(&self, name: &str) -> Cluster {
        let dir = cluster_dir(name);
        let data = dir.join("data");
        let status = pg_command(&self.bindir.join("pg_basebackup"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-R",
                "-X",
                "stream",
                "-D",
            ])
            .arg(&data)
            .status()
            .expect("pg_basebackup");
        assert!(status.success(), "pg_basebackup failed");
        let port = free_port();
        let mut conf =
            std::fs::read_to_string(data.join("postgresql.auto.conf")).expect("auto.conf");
        conf.push_str(&format!(
            "\nport = {port}\nunix_socket_directories = '{}'\n",
            dir.display()
        ));
        std::fs::write(data.join("postgresql.auto.conf"), conf).expect("write conf");
        let standby = Cluster {
            port,
            dir,
            bindir: self.bindir.clone(),
        };
        standby.pg_ctl(
            &["start", "-w", "-t", "60", "-l"],
            Some(&standby.dir.join("server.log")),
        );
        standby
    }

    /// Stop the server immediately, as a crash would, and leave it stopped.
    pub fn kill(&self) {
        self.pg_ctl(&["stop", "-m", "immediate", "-w"], None);
    }

    /// A new database with the extension created in it, for tests that count rows.
    pub fn fresh_db(&self, name: &str) -> Client {
        self.connect()
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .expect("create database");
        let mut c = self.connect_db(name);
        c.batch_execute("CREATE EXTENSION pg_webhooks")
            .expect("create extension");
        c
    }

    /// Stop the server at once, as a crash would, and start it again.
    pub fn crash_and_restart(&self) {
        self.pg_ctl(&["stop", "-m", "immediate", "-w"], None);
        self.pg_ctl(
            &["start", "-w", "-t", "60", "-l"],
            Some(&self.dir.join("server.log")),
        );
    }

    /// `pg_dump` of database `db` (plain SQL, as a superuser).
    pub fn dump(&self, db: &str) -> Vec<u8> {
        let out = Command::new(self.bindir.join("pg_dump"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                db,
            ])
            .output()
            .expect("pg_dump");
        assert!(
            out.status.success(),
            "pg_dump: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    /// Feed a plain dump to `psql` into database `db`, stopping at the first error.
    pub fn restore(&self, db: &str, dump: &[u8]) {
        use std::io::Write;
        let mut psql = Command::new(self.bindir.join("psql"))
            .args([
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
            ])
            .args(["-U", "postgres", "-d", db])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("psql");
        psql.stdin
            .take()
            .expect("stdin")
            .write_all(dump)
            .expect("feed the dump");
        let out = psql.wait_with_output().expect("psql");
        assert!(
            out.status.success(),
            "the restore failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn server_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }
}

impl Cluster {
    /// Stop at once and remove the cluster's directory.
    pub fn stop(&self) {
        let _ = pg_command(&self.bindir.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["stop", "-m", "immediate"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One cluster per test binary, stopped when the binary exits (statics are never dropped).
pub fn shared_cluster(name: &str, settings: &[&str]) -> &'static Cluster {
    static CLUSTER: std::sync::OnceLock<Cluster> = std::sync::OnceLock::new();
    CLUSTER.get_or_init(|| {
        extern "C" fn stop_at_exit() {
            if let Some(c) = CLUSTER.get() {
                c.stop();
            }
        }
        unsafe { libc::atexit(stop_at_exit) };
        Cluster::start(name, settings)
    })
}

/// Poll `f` until it returns Some, or panic after `timeout` with `what`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

pub struct Receiver {
    pub port: u16,
    /// The HTTPS listener's port (`start_tls`).
    pub tls_port: Option<u16>,
    child: Child,
    dir: PathBuf,
}

/// A new directory that no other receiver of any test binary, in this run or an earlier one,
/// has used: `create_dir` fails on an existing one, so a port file can never be another's.
pub fn private_dir(prefix: &str) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    loop {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!("{prefix}_{}_{n}_{nanos}", std::process::id()));
        match std::fs::create_dir(&dir) {
            Ok(()) => return dir,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => panic!("mkdir {}: {e}", dir.display()),
        }
    }
}

impl Receiver {
    pub fn start() -> Receiver {
        Receiver::start_with(None, None)
    }

    /// A receiver that also serves deliveries over HTTPS on `tls_port`, with the certificate
    /// and key in these PEM files (control API and log stay on the plain port).
    pub fn start_tls(cert: &Path, key: &Path) -> Receiver {
        Receiver::start_with(Some((cert, key)), None)
    }

    /// As `start_tls`, the HTTPS listener requiring a client certificate issued by the CA in
    /// `client_ca` (receiver.py --tls-client-ca).
    pub fn start_mtls(cert: &Path, key: &Path, client_ca: &Path) -> Receiver {
        Receiver::start_with(Some((cert, key)), Some(client_ca))
    }

    fn start_with(tls: Option<(&Path, &Path)>, client_ca: Option<&Path>) -> Receiver {
        // Each receiver gets a directory of its own. The receivers of concurrent tests used to
        // share one named after the test process and a port that had been free a moment
        // before; two could pick the same name, and one then read the other's port file and
        // talked to a receiver that its test stopped ("configure receiver: Connection refused").
        let dir = private_dir("pg_webhooks_receiver");
        let port_file = dir.join("port");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/receiver.py");
        let tls_port_file = dir.join("tls_port");
        let mut command = Command::new("python3");
        command
            .arg(script)
            .arg("--port-file")
            .arg(&port_file)
            .arg("--quiet");
        if let Some((cert, key)) = tls {
            command
                .arg("--tls-cert")
                .arg(cert)
                .arg("--tls-key")
                .arg(key);
            command.arg("--tls-port-file").arg(&tls_port_file);
        }
        if let Some(ca) = client_ca {
            command.arg("--tls-client-ca").arg(ca);
        }
        let mut child = command
            .stdout(Stdio::null())
            .spawn()
            .expect("start tests/receiver.py");
        let port = wait_for("the receiver to listen", Duration::from_secs(20), || {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("tests/receiver.py exited before listening: {status}");
            }
            std::fs::read_to_string(&port_file)
                .ok()
                .and_then(|s| s.trim().parse().ok())
        });
        // The HTTPS port is written before the plain one.
        let tls_port = tls.and_then(|_| {
            std::fs::read_to_string(&tls_port_file)
                .ok()
                .and_then(|s| s.trim().parse().ok())
        });
        assert!(
            tls.is_none() || tls_port.is_some(),
            "the receiver wrote no HTTPS port"
        );
        Receiver {
            port,
            tls_port,
            child,
            dir,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Configure how `path` answers and which secret verifies it (see receiver.py).
    pub fn configure(&self, config: Value) {
        let resp = ureq::post(&self.url("/_control/endpoint"))
            .header("content-type", "application/json")
            .send(config.to_string())
            .expect("configure receiver");
        assert_eq!(resp.status().as_u16(), 200);
    }

    /// The failed TLS handshakes of the HTTPS listener (their error texts).
    pub fn tls_failures(&self) -> Vec<String> {
        let log = self.get_json("/_tls_log");
        log.as_array()
            .expect("TLS log json")
            .iter()
            .map(|e| e["error"].as_str().unwrap_or_default().to_string())
            .collect()
    }

    /// The JSON a GET of the control API's `target` answers.
    fn get_json(&self, target: &str) -> Value {
        let mut resp = ureq::get(&self.url(target))
            .call()
            .unwrap_or_else(|e| panic!("receiver {target}: {e}"));
        let text = resp.body_mut().read_to_string().expect("receiver body");
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("receiver {target} json: {e}"))
    }

    /// Every request received on `path`, in arrival order.
    pub fn log(&self, path: &str) -> Vec<Value> {
        match self.get_json(&format!("/_log?path={path}")) {
            Value::Array(log) => log,
            other => panic!("receiver log is not an array: {other}"),
        }
    }

    /// How many requests `path` has received (without fetching them).
    pub fn count(&self, path: &str) -> usize {
        self.get_json(&format!("/_count?path={path}"))["n"].as_u64().expect("n") as usize
    }

    /// Wait until `path` has received at least `n` requests; returns them.
    pub fn wait_for_requests(&self, path: &str, n: usize, timeout: Duration) -> Vec<Value> {
        wait_for(&format!("{n} requests on {path}"), timeout, || {
            let log = self.log(path);
            (log.len() >= n).then_some(log)
        })
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// (type, data) of every event of `entity`, in commit order.
pub fn events(c: &mut Client, entity: &str) -> Vec<(String, Value)> {
    c.query(
        "SELECT type, data FROM webhooks.events WHERE entity = $1 ORDER BY seq",
        &[&entity],
    )
    .expect("events")
    .iter()
    .map(|r| (r.get::<_, String>(0), r.get::<_, Value>(1)))
    .collect()
}

/// `_events.data`'s compression method (`attcompression`): "l" (lz4), "p" (pglz) or "" (none).
pub fn events_data_method(c: &mut Client) -> String {
    c.query_one(
        "SELECT attcompression::text FROM pg_attribute
          WHERE attrelid = 'webhooks._events'::regclass AND attname = 'data'",
        &[],
    )
    .expect("_events.data's method")
    .get(0)
}

/// How each event of `entity` has its data stored (`pg_column_compression`), in commit order.
pub fn stored_compression(c: &mut Client, entity: &str) -> Vec<Option<String>> {
    c.query(
        "SELECT pg_column_compression(data) FROM webhooks._events WHERE entity = $1 ORDER BY seq",
        &[&entity],
    )
    .expect("stored compression")
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// Runs `sql`, which must fail with `state`; returns the message and hint.
pub fn fails(c: &mut Client, sql: &str, state: SqlState) -> String {
    let err = c.batch_execute(sql).expect_err(sql);
    let db = err
        .as_db_error()
        .unwrap_or_else(|| panic!("{sql}: not a database error: {err}"));
    assert_eq!(db.code(), &state, "{sql}: {}", db.message());
    format!("{} {}", db.message(), db.hint().unwrap_or_default())
}

/// The archived full script of an earlier `version` (sql/archive/), put where CREATE
/// EXTENSION ... VERSION finds it (a server that ran the old version had it there; the package
/// and `cargo pgrx install` ship only the update scripts beside the current version's).
pub fn install_archived_script(version: &str) {
    let pg_config = std::env::var("PG_CONFIG").unwrap_or_else(|_| "/usr/bin/pg_config".into());
    let out = std::process::Command::new(&pg_config)
        .arg("--sharedir")
        .output()
        .expect("pg_config --sharedir");
    let extdir = Path::new(String::from_utf8_lossy(&out.stdout).trim()).join("extension");
    let name = format!("pg_webhooks--{version}.sql");
    let archived = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("sql/archive")
        .join(&name);
    let text = std::fs::read(&archived).expect("archived script");
    let target = extdir.join(&name);
    if std::fs::read(&target).ok().as_deref() != Some(&text[..]) {
        // Written aside and renamed: a test creating the extension meanwhile reads either no
        // file or the whole one.
        let aside = extdir.join(format!(
            ".{name}.{}.{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::write(&aside, &text).unwrap_or_else(|e| panic!("write {}: {e}", aside.display()));
        std::fs::rename(&aside, &target)
            .unwrap_or_else(|e| panic!("rename to {}: {e}", target.display()));
    }
}

/// Appends `line` to this test binary's report, `target/tmp/reports/<binary>.txt`, which
/// scripts/test.sh prints after the suite: what the soak, failover, hostile-receiver, bounds
/// and model tests counted is then in CI's output although cargo test keeps a passing test's
/// output to itself. Use `report!`, which prints the line too.
pub fn append_report(line: &str) {
    use std::io::Write as _;
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("reports");
    let _ = std::fs::create_dir_all(&dir);
    let name = std::env::current_exe()
        .ok()
        .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .map(|s| s.rsplit_once('-').map(|(n, _)| n.to_string()).unwrap_or(s))
        .unwrap_or_else(|| "tests".into());
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("{name}.txt")))
    {
        let _ = writeln!(f, "{line}");
    }
}

/// `println!` that also goes into the binary's report (see `append_report`).
#[macro_export]
macro_rules! report {
    ($($arg:tt)*) => {{
        let line = format!($($arg)*);
        println!("{line}");
        $crate::common::append_report(&line);
    }};
}
