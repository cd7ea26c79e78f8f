//! The misbehaving receivers of tests/chaos_receiver.py (one port per endpoint, modes switched
//! while the test runs), for the soak and the hostile-peer tests.
#![allow(dead_code)]

use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Chaos {
    child: Child,
    dir: PathBuf,
    control: u16,
    ports: HashMap<String, u16>,
}

impl Chaos {
    /// Start one receiver process serving `endpoints`, each in mode `ok`.
    pub fn start(endpoints: &[&str]) -> Chaos {
        let dir = std::env::temp_dir().join(format!(
            "pg_webhooks_chaos_{}_{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let port_file = dir.join("ports.json");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/chaos_receiver.py");
        let mut child = Command::new("python3")
            .arg(script)
            .arg("--endpoints")
            .arg(endpoints.join(","))
            .arg("--port-file")
            .arg(&port_file)
            .stdout(Stdio::null())
            .spawn()
            .expect("start tests/chaos_receiver.py");
        let started = Instant::now();
        let ports: Value = loop {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("tests/chaos_receiver.py exited before listening: {status}");
            }
            if let Some(v) = std::fs::read_to_string(&port_file)
                .ok()
                .and_then(|s| serde_json::from_str(&s).ok())
            {
                break v;
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "the chaos receiver did not start"
            );
            std::thread::sleep(Duration::from_millis(25));
        };
        let control = ports["control"].as_u64().expect("control port") as u16;
        let ports = ports["endpoints"]
            .as_object()
            .expect("endpoint ports")
            .iter()
            .map(|(k, v)| (k.clone(), v.as_u64().expect("port") as u16))
            .collect();
        Chaos {
            child,
            dir,
            control,
            ports,
        }
    }

    pub fn port(&self, endpoint: &str) -> u16 {
        self.ports[endpoint]
    }

    pub fn url(&self, endpoint: &str) -> String {
        format!("http://127.0.0.1:{}/hook", self.port(endpoint))
    }

    pub fn https_url(&self, endpoint: &str) -> String {
        format!("https://127.0.0.1:{}/hook", self.port(endpoint))
    }

    fn post(&self, body: Value) {
        let resp = ureq::post(&format!("http://127.0.0.1:{}/mode", self.control))
            .header("content-type", "application/json")
            .send(body.to_string())
            .expect("control the chaos receiver");
        assert_eq!(resp.status().as_u16(), 200);
    }

    /// Switch `endpoint` to `mode` (see tests/chaos_receiver.py).
    pub fn set_mode(&self, endpoint: &str, mode: &str) {
        self.post(json!({"endpoint": endpoint, "mode": mode}));
    }

    /// Verify `endpoint`'s requests with this Standard Webhooks secret.
    pub fn set_secret(&self, endpoint: &str, secret: &str) {
        self.post(json!({"endpoint": endpoint, "secret": secret}));
    }

    /// Every request received, in arrival order.
    pub fn log(&self) -> Vec<Value> {
        let mut resp = ureq::get(&format!("http://127.0.0.1:{}/log", self.control))
            .call()
            .expect("chaos receiver log");
        let text = resp
            .body_mut()
            .with_config()
            .limit(1 << 30)
            .read_to_string()
            .expect("log body");
        serde_json::from_str(&text).expect("log json")
    }

    /// Requests (and connections) per endpoint and mode.
    pub fn counts(&self) -> Value {
        let mut resp = ureq::get(&format!("http://127.0.0.1:{}/counts", self.control))
            .call()
            .expect("chaos receiver counts");
        serde_json::from_str(&resp.body_mut().read_to_string().expect("counts")).expect("json")
    }
}

impl Drop for Chaos {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
