//! A minimal HTTP/1.0 server and client for carrying real TCP through
//! moat in tests and the demo. Each response is a fixed body of `BODY`
//! bytes, so the client can tell a complete answer from a cut one.

use std::{
    io::{self, Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::Duration,
};

use crate::netns::NetNs;

pub const BODY: usize = 4096;

fn head() -> String {
    format!("HTTP/1.0 200 OK\r\nContent-Length: {BODY}\r\n\r\n")
}

/// Serves GETs on `addr:80` inside `ns` until `stop` is set; the thread
/// returns how many it answered.
pub fn serve(ns: &NetNs, addr: Ipv4Addr, stop: Arc<AtomicBool>) -> io::Result<JoinHandle<u32>> {
    let listener = {
        let _in = ns.enter()?;
        TcpListener::bind((addr, 80))?
    };
    listener.set_nonblocking(true)?;
    Ok(std::thread::spawn(move || {
        let body = vec![b'm'; BODY];
        let mut served = 0;
        while !stop.load(Ordering::Relaxed) {
            let Ok((mut s, _)) = listener.accept() else {
                std::thread::sleep(Duration::from_millis(2));
                continue;
            };
            let _ = s.set_nonblocking(false);
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let mut req = Vec::new();
            let mut chunk = [0u8; 512];
            while !req.ends_with(b"\r\n\r\n") {
                match s.read(&mut chunk) {
                    Ok(n) if n > 0 => req.extend_from_slice(&chunk[..n]),
                    _ => break,
                }
            }
            if !req.starts_with(b"GET /") {
                continue;
            }
            if s.write_all(head().as_bytes()).and_then(|_| s.write_all(&body)).is_ok() {
                served += 1;
            }
            let _ = s.shutdown(std::net::Shutdown::Write);
            let _ = s.read(&mut chunk);
        }
        served
    }))
}

/// One GET to `server:80` from the calling thread's namespace: Ok when the
/// complete answer came back.
pub fn get(server: Ipv4Addr, i: u32) -> io::Result<()> {
    let mut c = TcpStream::connect_timeout(&SocketAddr::from((server, 80)), Duration::from_secs(2))?;
    c.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(c, "GET /{i} HTTP/1.0\r\nHost: {server}\r\n\r\n")?;
    let mut resp = Vec::new();
    c.read_to_end(&mut resp)?;
    if !resp.starts_with(head().as_bytes()) || resp.len() != head().len() + BODY {
        return Err(io::Error::other(format!("incomplete response ({} bytes)", resp.len())));
    }
    Ok(())
}

/// `count` GETs from inside `ns`; how many complete answers came back.
pub fn get_many(ns: &NetNs, server: Ipv4Addr, count: u32) -> u32 {
    let Ok(_in) = ns.enter() else {
        return 0;
    };
    (0..count).filter(|i| get(server, *i).is_ok()).count() as u32
}

/// The daemon's Prometheus text, fetched from 127.0.0.1:9477 inside `ns`.
pub fn scrape_metrics(ns: &NetNs) -> io::Result<String> {
    let _in = ns.enter()?;
    let mut c = TcpStream::connect("127.0.0.1:9477")?;
    c.set_read_timeout(Some(Duration::from_secs(5)))?;
    c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
    let mut out = String::new();
    c.read_to_string(&mut out)?;
    Ok(out)
}

/// The value of the sample `name_and_labels` in Prometheus text, if present.
pub fn metric(text: &str, name_and_labels: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.trim().parse().ok())
}
