//! Test peer for end-to-end tests and the demo: tiny TCP/UDP servers that answer with their
//! name and the client address they saw, and clients that print the answer.
//!
//! ```text
//! lb-testsrv serve NAME ADDR:PORT...         TCP and UDP on every address, until killed
//! lb-testsrv tcp ADDR:PORT [TIMEOUT_MS [FROM]]
//!                                           one connection (from source address FROM, when
//!                                           given): print the answer or the error
//! lb-testsrv udp ADDR:PORT [TIMEOUT_MS [FROM]]
//!                                           one datagram: print the answer or the error
//! lb-testsrv tcp-hold ADDR:PORT SECONDS     connect, then send a line every 100 ms
//! lb-testsrv udp-stream ADDR:PORT COUNT INTERVAL_MS
//!                                           COUNT datagrams from ONE source port: prints
//!                                           `PORT <port>`, then `<i> <server>`, `<i> TIMEOUT`
//!                                           or `<i> REFUSED` per datagram, then `DONE`
//! ```
//!
//! A server named `@` answers with the address and port it serves instead of a name, so a
//! client sees which endpoint, and which target port, its connection reached.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::ExitCode;
use std::time::{Duration, Instant};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let res = match args.first().map(String::as_str) {
        Some("serve") if args.len() >= 3 => serve(&args[1], &args[2..]),
        Some("tcp") if args.len() >= 2 => tcp(&args[1], timeout(args.get(2)), args.get(3)),
        Some("udp") if args.len() >= 2 => udp(&args[1], timeout(args.get(2)), args.get(3)),
        Some("tcp-hold") if args.len() == 3 => hold(&args[1], &args[2]),
        Some("http") if args.len() == 3 => http(&args[1], &args[2]),
        Some("udp-stream") if args.len() == 4 => udp_stream(&args[1], &args[2], &args[3]),
        _ => Err("usage: lb-testsrv serve NAME ADDR... | tcp ADDR [MS] | udp ADDR [MS] | tcp-hold ADDR SECS | udp-stream ADDR COUNT MS".into()),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            println!("ERROR {e}");
            ExitCode::FAILURE
        }
    }
}

fn timeout(arg: Option<&String>) -> Duration {
    Duration::from_millis(arg.and_then(|s| s.parse().ok()).unwrap_or(2000))
}

fn addr(s: &str) -> Result<SocketAddr, String> {
    s.parse().map_err(|e| format!("bad address {s}: {e}"))
}

fn serve(name: &str, addrs: &[String]) -> Result<(), String> {
    let mut threads = Vec::new();
    for a in addrs {
        let a = addr(a)?;
        let tcp = TcpListener::bind(a).map_err(|e| format!("bind tcp {a}: {e}"))?;
        let udp = UdpSocket::bind(a).map_err(|e| format!("bind udp {a}: {e}"))?;
        // `@`: answer with the address served, so a client sees which endpoint *and port*
        // its connection reached.
        let n = if name == "@" {
            a.to_string()
        } else {
            name.to_string()
        };
        threads.push(std::thread::spawn(move || {
            for conn in tcp.incoming().flatten() {
                let n = n.clone();
                std::thread::spawn(move || handle_tcp(conn, &n));
            }
        }));
        let n = if name == "@" {
            a.to_string()
        } else {
            name.to_string()
        };
        threads.push(std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while let Ok((_, peer)) = udp.recv_from(&mut buf) {
                let _ = udp.send_to(format!("{n} {peer}\n").as_bytes(), peer);
            }
        }));
    }
    println!("READY");
    let _ = std::io::stdout().flush();
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

fn handle_tcp(mut conn: TcpStream, name: &str) {
    let peer = conn.peer_addr().map(|p| p.to_string()).unwrap_or_default();
    if conn
        .write_all(format!("{name} {peer}\n").as_bytes())
        .is_err()
    {
        return;
    }
    // Echo further lines (used by long-lived connections), until the client closes.
    let mut reader = BufReader::new(conn.try_clone().expect("clone socket"));
    let mut line = String::new();
    while reader.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
        if conn
            .write_all(format!("{name} {}", line).as_bytes())
            .is_err()
        {
            return;
        }
        line.clear();
    }
}

/// `http ADDR:PORT PATH`: one HTTP/1.0 GET; prints the status line, the headers and the body.
fn http(target: &str, path: &str) -> Result<(), String> {
    let a = addr(target)?;
    let mut s = TcpStream::connect_timeout(&a, Duration::from_secs(2))
        .map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {target}\r\n\r\n").as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut out = String::new();
    s.read_to_string(&mut out)
        .map_err(|e| format!("read: {e}"))?;
    print!("{out}");
    Ok(())
}

/// The source address `from` (an IP), port 0.
fn source(from: &str) -> Result<SocketAddr, String> {
    from.parse::<std::net::IpAddr>()
        .map(|ip| SocketAddr::new(ip, 0))
        .map_err(|_| format!("{from:?} is not an IP address"))
}

fn tcp(target: &str, t: Duration, from: Option<&String>) -> Result<(), String> {
    let a = addr(target)?;
    let mut s: TcpStream = match from {
        None => TcpStream::connect_timeout(&a, t).map_err(|e| format!("connect: {e}"))?,
        Some(from) => {
            let sock = socket2::Socket::new(
                socket2::Domain::for_address(a),
                socket2::Type::STREAM,
                Some(socket2::Protocol::TCP),
            )
            .map_err(|e| e.to_string())?;
            sock.bind(&source(from)?.into())
                .map_err(|e| format!("bind {from}: {e}"))?;
            sock.connect_timeout(&a.into(), t)
                .map_err(|e| format!("connect: {e}"))?;
            sock.into()
        }
    };
    s.set_read_timeout(Some(t)).map_err(|e| e.to_string())?;
    let mut line = String::new();
    let mut buf = [0u8; 256];
    let n = s.read(&mut buf).map_err(|e| format!("read: {e}"))?;
    line.push_str(&String::from_utf8_lossy(&buf[..n]));
    print!("{line}");
    Ok(())
}

fn udp(target: &str, t: Duration, from: Option<&String>) -> Result<(), String> {
    let a = addr(target)?;
    let bind: SocketAddr = match from {
        Some(from) => source(from)?,
        None => if a.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }
            .parse()
            .expect("literal"),
    };
    let s = UdpSocket::bind(bind).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(t)).map_err(|e| e.to_string())?;
    // Connected, so ICMP errors (port unreachable) are reported to us.
    s.connect(a).map_err(|e| format!("connect: {e}"))?;
    s.send(b"hello\n").map_err(|e| format!("send: {e}"))?;
    let mut buf = [0u8; 256];
    let n = s.recv(&mut buf).map_err(|e| format!("recv: {e}"))?;
    print!("{}", String::from_utf8_lossy(&buf[..n]));
    Ok(())
}

/// Holds one connection for `secs`, sending a line every 100 ms and checking each echo; prints
/// `HELD <server> <count>` on success or an error as soon as the connection breaks.
fn hold(target: &str, secs: &str) -> Result<(), String> {
    let a = addr(target)?;
    let secs: u64 = secs.parse().map_err(|_| "bad seconds".to_string())?;
    let s = TcpStream::connect_timeout(&a, Duration::from_secs(2))
        .map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    let mut w = s.try_clone().map_err(|e| e.to_string())?;
    let mut r = BufReader::new(s);
    let mut greeting = String::new();
    r.read_line(&mut greeting)
        .map_err(|e| format!("greeting: {e}"))?;
    let server = greeting.split_whitespace().next().unwrap_or("").to_string();
    println!("CONNECTED {server}");
    let _ = std::io::stdout().flush();
    let end = Instant::now() + Duration::from_secs(secs);
    let mut count = 0u64;
    while Instant::now() < end {
        w.write_all(format!("ping {count}\n").as_bytes())
            .map_err(|e| format!("write after {count}: {e}"))?;
        let mut line = String::new();
        let n = r
            .read_line(&mut line)
            .map_err(|e| format!("read after {count}: {e}"))?;
        if n == 0 || !line.starts_with(&server) {
            return Err(format!("echo {count} broken: {line:?}"));
        }
        count += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("HELD {server} {count}");
    Ok(())
}

/// Sends `count` datagrams, one every `interval_ms`, all from the same socket (so the same
/// source port, hence the same conntrack entry while it lives), and reports who answered each.
/// The socket is connected, so an ICMP port-unreachable (a rejected datagram) reads as
/// `REFUSED`.
fn udp_stream(target: &str, count: &str, interval_ms: &str) -> Result<(), String> {
    let a = addr(target)?;
    let count: u64 = count.parse().map_err(|_| "bad count".to_string())?;
    let interval = Duration::from_millis(
        interval_ms
            .parse()
            .map_err(|_| "bad interval".to_string())?,
    );
    let bind: SocketAddr = if a.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }
        .parse()
        .expect("literal");
    let s = UdpSocket::bind(bind).map_err(|e| e.to_string())?;
    s.connect(a).map_err(|e| format!("connect: {e}"))?;
    let port = s.local_addr().map_err(|e| e.to_string())?.port();
    let mut out = std::io::stdout();
    let _ = writeln!(out, "PORT {port}");
    let _ = out.flush();
    let mut buf = [0u8; 256];
    for i in 0..count {
        let started = Instant::now();
        let deadline = started + interval.max(Duration::from_millis(50));
        // A pending ICMP error from the previous datagram may be reported by this send.
        if let Err(e) = s.send(format!("hello {i}\n").as_bytes()) {
            if e.kind() != std::io::ErrorKind::ConnectionRefused {
                return Err(format!("send {i}: {e}"));
            }
            s.send(format!("hello {i}\n").as_bytes())
                .map_err(|e| format!("send {i}: {e}"))?;
        }
        let outcome = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break "TIMEOUT".to_string();
            }
            s.set_read_timeout(Some(left)).map_err(|e| e.to_string())?;
            match s.recv(&mut buf) {
                Ok(n) => {
                    let reply = String::from_utf8_lossy(&buf[..n]);
                    break reply
                        .split_whitespace()
                        .next()
                        .unwrap_or("EMPTY")
                        .to_string();
                }
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    break "REFUSED".to_string();
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => return Err(format!("recv {i}: {e}")),
            }
        };
        let _ = writeln!(out, "{i} {outcome}");
        let _ = out.flush();
        std::thread::sleep(deadline.saturating_duration_since(Instant::now()));
    }
    let _ = writeln!(out, "DONE");
    Ok(())
}
