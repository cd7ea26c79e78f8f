//! A plain HTTP load client for the delivery benchmark: the sink's ceiling at a given
//! concurrency, with the same HTTP library and keep-alive pool the worker uses, and no
//! database, signing or bookkeeping. POSTs a body of the given size as fast as the sink answers.
//! Usage: cargo run --release --example load -- <url> <connections> <seconds> [body bytes]
//! Prints `requests=N seconds=S per_second=R`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let url = args.get(1).cloned().unwrap_or_else(|| "http://127.0.0.1:28833/load".into());
    let connections: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(32);
    let seconds: f64 = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(5.0);
    let size: usize = args.get(4).and_then(|a| a.parse().ok()).unwrap_or(1024);
    let body = format!("{{\"data\":\"{}\"}}", "x".repeat(size.saturating_sub(11)));
    let config = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_idle_connections(connections * 4)
        .max_idle_connections_per_host(connections)
        .build();
    let agent = ureq::Agent::new_with_config(config);
    let count = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let threads: Vec<_> = (0..connections)
        .map(|_| {
            let (agent, url, body) = (agent.clone(), url.clone(), body.clone());
            let (count, stop) = (count.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let sent = agent
                        .post(&url)
                        .header("content-type", "application/json")
                        .send(body.as_bytes());
                    if let Ok(mut r) = sent {
                        let _ = r.body_mut().read_to_vec();
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs_f64(seconds));
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    let elapsed = start.elapsed().as_secs_f64();
    let n = count.load(Ordering::Relaxed);
    println!("requests={n} seconds={elapsed:.2} per_second={:.0}", n as f64 / elapsed);
}
