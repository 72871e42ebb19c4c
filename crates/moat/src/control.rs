//! The local control socket: one JSON request line, one JSON response line.
//! Root only (the socket is created with mode 0600 in a 0700 directory).

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::status::Status;

pub const DEFAULT_SOCKET: &str = "/run/moat/moat.sock";

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Command {
    Status,
    Reload,
    Down,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Request {
    pub command: Command,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    /// One line for humans.
    pub message: String,
    /// Diagnostics of a rejected configuration, `FILE:LINE:COL: error: ...`.
    #[serde(default)]
    pub errors: Vec<String>,
    #[serde(default)]
    pub status: Option<Box<Status>>,
}

/// Sends one request to the daemon listening on `socket`.
pub fn call(socket: &Path, command: Command, timeout: Duration) -> Result<Response> {
    let mut stream = UnixStream::connect(socket).with_context(|| {
        format!(
            "connecting to the moat daemon at {} (is `moat run` running? use --socket for another node)",
            socket.display()
        )
    })?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut line = serde_json::to_string(&Request { command })?;
    line.push('\n');
    stream.write_all(line.as_bytes())?;
    let mut reply = String::new();
    BufReader::new(&stream)
        .read_line(&mut reply)
        .context("reading the daemon's answer")?;
    if reply.is_empty() {
        bail!("the daemon closed the connection without answering");
    }
    serde_json::from_str(&reply).context("decoding the daemon's answer")
}
