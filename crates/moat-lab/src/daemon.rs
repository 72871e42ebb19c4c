//! Runs the `moat` daemon binary inside a test namespace: its own pin
//! directory and control socket, stopped and cleaned up (pins removed,
//! programs detached) when the value drops, also when a test fails.

use std::{
    fs::File,
    io,
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use crate::netns::{NetNs, PREFIX};

static SEQ: AtomicU32 = AtomicU32::new(0);

pub struct Daemon {
    bin: PathBuf,
    netns: String,
    dir: PathBuf,
    pub pin_dir: PathBuf,
    pub socket: PathBuf,
    pub config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    starts: u32,
    extra: Vec<String>,
}

impl Daemon {
    /// Writes `config` and starts `moat run` in `ns`; returns once it answers.
    pub fn start(bin: &Path, ns: &NetNs, config: &str) -> io::Result<Daemon> {
        Self::start_with(bin, ns, config, &[])
    }

    /// [`Daemon::start`] with extra `moat run` arguments.
    pub fn start_with(bin: &Path, ns: &NetNs, config: &str, extra: &[&str]) -> io::Result<Daemon> {
        let tag = format!(
            "{PREFIX}-d{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let dir = std::env::temp_dir().join(&tag);
        std::fs::create_dir_all(&dir)?;
        let mut d = Daemon {
            bin: bin.to_path_buf(),
            netns: ns.name().to_string(),
            pin_dir: PathBuf::from("/sys/fs/bpf").join(&tag),
            socket: dir.join("moat.sock"),
            config: dir.join("moat.yaml"),
            log: dir.join("moat.log"),
            dir,
            child: None,
            starts: 0,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        d.write_config(config)?;
        d.spawn()?;
        Ok(d)
    }

    pub fn write_config(&self, text: &str) -> io::Result<()> {
        std::fs::write(&self.config, text)
    }

    /// Everything the daemon logged so far (all runs).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn spawn(&mut self) -> io::Result<()> {
        let netns = File::open(format!("/run/netns/{}", self.netns))?;
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let mut cmd = Command::new(&self.bin);
        cmd.arg("run")
            .arg("-c")
            .arg(&self.config)
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .arg("--socket")
            .arg(&self.socket)
            .args(&self.extra)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let fd = netns.as_raw_fd();
        // SAFETY: between fork and exec only setns (async-signal-safe) runs;
        // only the network namespace changes, so the pins on the host's
        // /sys/fs/bpf stay visible.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn()?;
        drop(netns);
        self.child = Some(child);
        self.starts += 1;
        let deadline = Instant::now() + Duration::from_secs(30);
        let ready = format!("ready socket={}", self.socket.display());
        loop {
            if self.log().matches(&ready).count() >= self.starts as usize {
                return Ok(());
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                self.child = None;
                return Err(io::Error::other(format!(
                    "moat run exited with {status} before it was ready:\n{}",
                    self.log()
                )));
            }
            if Instant::now() > deadline {
                return Err(io::Error::other(format!(
                    "moat run not ready after 30 s:\n{}",
                    self.log()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The daemon's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends `signal` to the daemon.
    pub fn signal(&self, signal: libc::c_int) {
        if let Some(pid) = self.pid() {
            // SAFETY: plain syscall on our own child.
            unsafe { libc::kill(pid as libc::pid_t, signal) };
        }
    }

    /// SIGTERM and wait for the exit (the data plane stays pinned).
    pub fn stop(&mut self) -> io::Result<std::process::ExitStatus> {
        self.signal(libc::SIGTERM);
        let mut child = self.child.take().ok_or_else(|| io::Error::other("not running"))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(s) = child.try_wait()? {
                return Ok(s);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return Err(io::Error::other("moat run did not exit within 10 s of SIGTERM"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops the daemon and starts it again with the same paths.
    pub fn restart(&mut self) -> io::Result<()> {
        self.stop()?;
        self.spawn()
    }

    /// Runs `moat ARGS... --socket SOCKET`.
    pub fn cli(&self, args: &[&str]) -> io::Result<Output> {
        Command::new(&self.bin)
            .args(args)
            .arg("--socket")
            .arg(&self.socket)
            .output()
    }

    /// `moat status --json`, parsed.
    pub fn status(&self) -> io::Result<serde_json::Value> {
        let out = self.cli(&["status", "--json"])?;
        serde_json::from_slice(&out.stdout).map_err(|e| {
            io::Error::other(format!(
                "moat status --json: {e}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        })
    }

    /// `moat down` (through the daemon when it runs); waits for its exit.
    pub fn down(&mut self) -> io::Result<Output> {
        let out = Command::new(&self.bin)
            .args(["down", "--socket"])
            .arg(&self.socket)
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .output()?;
        if let Some(mut c) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(10);
            while c.try_wait()?.is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        Ok(out)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new(&self.bin)
            .args(["down", "--socket"])
            .arg(&self.socket)
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
