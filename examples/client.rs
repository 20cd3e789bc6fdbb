//! An interactive client for taskd, like the seeds' PHP client ("输入Email:").
//!
//! ```text
//! cargo run --example client -- [ADDR] [--wait-ms MS]      (ADDR defaults to 127.0.0.1:9501)
//! cargo run --example client -- --ws 127.0.0.1:9502         (taskd --ws-port 9502: WebSocket)
//! ```
//!
//! Each line typed (or piped) on stdin is sent to the server as one request; every reply line
//! is printed as `< LINE` the moment it arrives, also while you are not typing, since a job's
//! `done` comes long after its `accepted`. At the end of stdin the client stops sending and
//! keeps printing replies until the server closes the connection or `--wait-ms` (default
//! 3000) pass without one, so `printf 'alice@example.com\n' | client` shows the `done` too.
//!
//! Two threads, std only: the main thread reads stdin and writes the socket, a second one
//! reads the socket and prints.

use std::io::{self, BufRead, BufReader, IsTerminal, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

const USAGE: &str =
    "usage: client [--ws] [ADDR] [--wait-ms MS]   (ADDR defaults to 127.0.0.1:9501; --ws: a WebSocket port)";
const PROMPT: &str = "> ";

struct Args {
    addr: String,
    wait: Duration,
    /// Speak WebSocket (to `taskd --ws-port`) instead of plain lines.
    ws: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut addr = None;
    let mut wait_ms = 3000u64;
    let mut ws = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let wait_value = match arg.strip_prefix("--wait-ms") {
            Some("") => Some(args.next().ok_or("--wait-ms needs a value")?),
            Some(rest) if rest.starts_with('=') => Some(rest[1..].to_string()),
            _ => None,
        };
        if let Some(v) = wait_value {
            wait_ms = v.parse().map_err(|_| format!("--wait-ms: {v:?} is not a number of milliseconds"))?;
        } else if arg == "--ws" {
            ws = true;
        } else if arg == "-h" || arg == "--help" {
            println!("{USAGE}");
            std::process::exit(0);
        } else if arg.starts_with('-') || addr.is_some() {
            return Err(format!("unexpected argument {arg:?}"));
        } else {
            addr = Some(arg);
        }
    }
    Ok(Args {
        addr: addr.unwrap_or_else(|| "127.0.0.1:9501".into()),
        wait: Duration::from_millis(wait_ms),
        ws,
    })
}

/// Tries every address the name resolves to, with a timeout, so that a firewalled host does
/// not leave the user staring at nothing for the kernel's default of minutes.
fn connect(addr: &str) -> io::Result<TcpStream> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, "the address resolves to nothing");
    for sa in addr.to_socket_addrs()? {
        match TcpStream::connect_timeout(&sa, Duration::from_secs(3)) {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(last)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("client: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    if args.ws {
        return run_websocket(&args);
    }
    let stream = match connect(&args.addr) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("client: cannot connect to {}: {e}", args.addr);
            eprintln!("client: is taskd running there? (cargo run -- --port PORT)");
            return ExitCode::FAILURE;
        }
    };
    let reader = match stream.try_clone() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("client: {e}");
            return ExitCode::FAILURE;
        }
    };
    let interactive = io::stdin().is_terminal();
    if interactive {
        eprintln!("connected to {}; type a request per line (Ctrl-D to end)", args.addr);
    }
    // Whether stdin may still bring requests: the reader re-prints the prompt after a reply
    // only then, and ends the process itself if the server closes the connection meanwhile.
    let input_open = Arc::new(AtomicBool::new(true));
    // One message per reply line: after stdin ends, the main thread waits on it for silence.
    let (replies, reply_rx) = mpsc::channel::<()>();
    {
        let input_open = Arc::clone(&input_open);
        thread::spawn(move || print_replies(reader, interactive, &input_open, &replies));
    }

    let mut writer = &stream;
    let mut line = String::new();
    let mut stdin = io::stdin().lock();
    loop {
        if interactive {
            print!("{PROMPT}");
            let _ = io::stdout().flush();
        }
        line.clear();
        match stdin.read_line(&mut line) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => {
                eprintln!("client: cannot read stdin: {e}");
                return ExitCode::FAILURE;
            }
        }
        let request = line.trim_end_matches(['\r', '\n']);
        // An empty line is most likely a stray Enter, not a request worth an error reply.
        if request.trim().is_empty() {
            continue;
        }
        if let Err(e) = writer.write_all(format!("{request}\n").as_bytes()) {
            eprintln!("client: cannot send to {}: {e}", args.addr);
            return ExitCode::FAILURE;
        }
    }

    // End of input: tell the server we are done sending (it may still be working on our jobs),
    // then print replies until it closes the connection or goes quiet.
    input_open.store(false, Ordering::Relaxed);
    if interactive {
        println!();
    }
    let _ = stream.shutdown(Shutdown::Write);
    // Replies that came while we were reading stdin do not count towards the silence.
    while reply_rx.try_recv().is_ok() {}
    loop {
        match reply_rx.recv_timeout(args.wait) {
            Ok(()) => continue,
            Err(RecvTimeoutError::Timeout) => {
                eprintln!("client: no reply for {} ms, closing", args.wait.as_millis());
                break;
            }
            // The reader ended: the server closed the connection (it said so).
            Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    let _ = io::stdout().flush();
    ExitCode::SUCCESS
}

/// Prints every reply line as it arrives, until the server closes the connection.
fn print_replies(stream: TcpStream, interactive: bool, input_open: &AtomicBool, replies: &mpsc::Sender<()>) {
    let mut reader = BufReader::new(stream);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) => break,
            Ok(_) => {
                let text = String::from_utf8_lossy(&buf);
                let text = text.trim_end_matches(['\r', '\n']);
                let mut out = io::stdout().lock();
                if interactive && input_open.load(Ordering::Relaxed) {
                    // Over the prompt the user is looking at, then a fresh prompt below.
                    let _ = write!(out, "\r< {text}\n{PROMPT}");
                } else {
                    let _ = writeln!(out, "< {text}");
                }
                let _ = out.flush();
                let _ = replies.send(());
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                eprintln!("\nclient: connection error: {e}");
                std::process::exit(1);
            }
        }
    }
    if input_open.load(Ordering::Relaxed) {
        // The main thread is blocked reading stdin, which nothing can interrupt, and there is
        // no one left to send to: end the process here.
        eprintln!("\nclient: the server closed the connection");
        std::process::exit(0);
    }
    eprintln!("client: the server closed the connection");
}

/// The same client over WebSocket: each line typed is one text message, each reply one too.
/// tungstenite's socket is not split between threads: a stdin thread hands lines over, and
/// one loop sends them and reads replies with a short timeout.
fn run_websocket(args: &Args) -> ExitCode {
    let stream = match connect(&args.addr) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("client: cannot connect to {}: {e}", args.addr);
            return ExitCode::FAILURE;
        }
    };
    let url = format!("ws://{}/", args.addr);
    let mut ws = match tungstenite::client(url.as_str(), stream) {
        Ok((ws, _)) => ws,
        Err(e) => {
            eprintln!("client: {url} is no WebSocket endpoint: {e}");
            return ExitCode::FAILURE;
        }
    };
    let _ = ws.get_ref().set_read_timeout(Some(Duration::from_millis(50)));
    let (lines, line_rx) = mpsc::channel::<String>();
    thread::spawn(move || {
        for line in io::stdin().lock().lines().map_while(Result::ok) {
            if !line.trim().is_empty() && lines.send(line).is_err() {
                break;
            }
        }
    });
    let mut input_open = true;
    let mut quiet_since = std::time::Instant::now();
    loop {
        loop {
            match line_rx.try_recv() {
                Ok(line) => {
                    if let Err(e) = ws.send(tungstenite::Message::text(line)) {
                        eprintln!("client: cannot send: {e}");
                        return ExitCode::FAILURE;
                    }
                }
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    if input_open {
                        input_open = false;
                        quiet_since = std::time::Instant::now();
                    }
                    break;
                }
            }
        }
        match ws.read() {
            Ok(tungstenite::Message::Text(text)) => {
                println!("< {}", text.as_str());
                quiet_since = std::time::Instant::now();
            }
            Ok(tungstenite::Message::Close(_)) => {
                eprintln!("client: the server closed the connection");
                return ExitCode::SUCCESS;
            }
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
            Err(e) => {
                eprintln!("client: connection error: {e}");
                return ExitCode::FAILURE;
            }
        }
        if !input_open && quiet_since.elapsed() >= args.wait {
            let _ = ws.close(None);
            let _ = ws.flush();
            return ExitCode::SUCCESS;
        }
    }
}
