//! A fast keep-alive HTTP sink on 127.0.0.1 for the delivery benchmark: answers every POST
//! with 200 at once and counts them (POSTs to paths under /fail get 500; under /hang, no
//! answer for 30 s). `GET /stats` returns
//! `{"requests": N, "first": unix_s, "last": unix_s, "paths": {"/p": [N, first, last], ...},
//! "arrivals": {"<webhook-id>": unix_s, ...}}`
//! (arrivals recorded only when started with --keep-ids).
//! Usage: cargo run --release --example sink -- <port> [--keep-ids]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Default)]
struct Stats {
    /// Per path: requests, first and last arrival.
    paths: HashMap<String, (u64, f64, f64)>,
    requests: u64,
    first: f64,
    last: f64,
    arrivals: HashMap<String, f64>,
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn serve(stream: TcpStream, stats: Arc<Mutex<Stats>>, keep_ids: bool) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut out = stream;
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line)? == 0 {
            return Ok(());
        }
        let (mut length, mut id) = (0usize, String::new());
        loop {
            let mut line = String::new();
            reader.read_line(&mut line)?;
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                match name.to_ascii_lowercase().as_str() {
                    "content-length" => length = value.trim().parse().unwrap_or(0),
                    "webhook-id" => id = value.trim().to_string(),
                    _ => {}
                }
            }
        }
        let mut body = vec![0u8; length];
        reader.read_exact(&mut body)?;
        let reply = if request_line.starts_with("GET /stats") {
            let s = stats
                .lock()
                .map_err(|_| std::io::Error::other("poisoned"))?;
            let arrivals: Vec<String> = s
                .arrivals
                .iter()
                .map(|(k, v)| format!("\"{k}\":{v}"))
                .collect();
            let paths: Vec<String> = s
                .paths
                .iter()
                .map(|(p, (n, first, last))| format!("\"{p}\":[{n},{first},{last}]"))
                .collect();
            format!(
                "{{\"requests\":{},\"first\":{},\"last\":{},\"paths\":{{{}}},\"arrivals\":{{{}}}}}",
                s.requests,
                s.first,
                s.last,
                paths.join(","),
                arrivals.join(",")
            )
        } else if request_line.starts_with("POST /hang") {
            // An endpoint that never answers in time: the delivery's deadline ends it.
            std::thread::sleep(std::time::Duration::from_secs(30));
            "late".to_string()
        } else {
            let t = now();
            let mut s = stats
                .lock()
                .map_err(|_| std::io::Error::other("poisoned"))?;
            s.requests += 1;
            if s.first == 0.0 {
                s.first = t;
            }
            s.last = t;
            let path = request_line.split_whitespace().nth(1).unwrap_or("/").to_string();
            let p = s.paths.entry(path).or_insert((0, t, t));
            p.0 += 1;
            p.2 = t;
            if keep_ids {
                s.arrivals.insert(id, t);
            }
            "ok".to_string()
        };
        // Paths under /fail answer 500 (they are counted like the others).
        let status = if request_line.starts_with("POST /fail") { "500 Internal Server Error" } else { "200 OK" };
        write!(out, "HTTP/1.1 {status}\r\nContent-Length: {}\r\nContent-Type: application/json\r\n\r\n{reply}", reply.len())?;
    }
}

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let port = args.get(1).map(String::as_str).unwrap_or("28831");
    let keep_ids = args.iter().any(|a| a == "--keep-ids");
    let listener = TcpListener::bind(format!("127.0.0.1:{port}"))?;
    let stats = Arc::new(Mutex::new(Stats::default()));
    println!("sink listening on 127.0.0.1:{port}");
    for stream in listener.incoming() {
        let stream = stream?;
        let _ = stream.set_nodelay(true);
        let stats = stats.clone();
        std::thread::spawn(move || serve(stream, stats, keep_ids));
    }
    Ok(())
}
