//! `rqemu-serial`'s console: where the UART's output goes and its input comes from.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Errors setting up the console.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// Unknown `--console` value.
    #[error("--console must be stdio, file:PATH or socket:PATH, not {0:?}")]
    Syntax(String),
    /// Opening the file or socket failed.
    #[error("console {0}: {1}")]
    Open(PathBuf, #[source] io::Error),
}

/// Where the UART's output goes and its input comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleSpec {
    /// The daemon's stdin/stdout.
    Stdio,
    /// Output appended to a file (no input).
    File(PathBuf),
    /// A UNIX stream socket a user attaches to (`socat - UNIX-CONNECT:PATH`); one client at a
    /// time, output while nobody is attached is dropped.
    Socket(PathBuf),
}

impl std::str::FromStr for ConsoleSpec {
    type Err = ConsoleError;
    fn from_str(s: &str) -> Result<Self, ConsoleError> {
        if s == "stdio" {
            Ok(ConsoleSpec::Stdio)
        } else if let Some(p) = s.strip_prefix("file:") {
            Ok(ConsoleSpec::File(p.into()))
        } else if let Some(p) = s.strip_prefix("socket:") {
            Ok(ConsoleSpec::Socket(p.into()))
        } else {
            Err(ConsoleError::Syntax(s.into()))
        }
    }
}

/// What console input is typed into (the UART's receive FIFO): takes what fits of `bytes`
/// and returns how many it took (0 = full, try again later).
pub trait ConsoleInput: Send + 'static {
    /// Queues `bytes` for the guest; returns how many were taken.
    fn input(&mut self, bytes: &[u8]) -> usize;
}

/// The console output side.
pub enum ConsoleOut {
    /// stdout, flushed per write.
    Stdout,
    /// A file.
    File(File),
    /// The attached socket client, if any.
    Socket(Arc<Mutex<Option<UnixStream>>>),
}

impl Write for ConsoleOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            ConsoleOut::Stdout => {
                let mut o = io::stdout().lock();
                o.write_all(buf)?;
                o.flush()?;
                Ok(buf.len())
            }
            ConsoleOut::File(f) => f.write(buf),
            ConsoleOut::Socket(c) => {
                let mut c = c.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(s) = c.as_mut() {
                    if s.write_all(buf).is_err() {
                        *c = None; // the user detached
                    }
                }
                Ok(buf.len())
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn pump(dev: &Mutex<impl ConsoleInput>, mut src: impl Read) {
    let mut buf = [0u8; 64];
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let mut rest = &buf[..n];
        while !rest.is_empty() {
            let took = dev.lock().unwrap_or_else(|e| e.into_inner()).input(rest);
            rest = &rest[took..];
            if took == 0 {
                // FIFO full: the guest is not reading; wait for it.
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

/// An opened console: output, the socket console's listener, its attached client.
pub type Console = (
    ConsoleOut,
    Option<UnixListener>,
    Arc<Mutex<Option<UnixStream>>>,
);

/// Opens the console output; for inputs call [`spawn_input`] once the device exists.
pub fn open_console(spec: &ConsoleSpec) -> Result<Console, ConsoleError> {
    let client = Arc::new(Mutex::new(None));
    Ok(match spec {
        ConsoleSpec::Stdio => (ConsoleOut::Stdout, None, client),
        ConsoleSpec::File(p) => {
            let f = File::options()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| ConsoleError::Open(p.clone(), e))?;
            (ConsoleOut::File(f), None, client)
        }
        ConsoleSpec::Socket(p) => {
            let _ = std::fs::remove_file(p);
            let l = UnixListener::bind(p).map_err(|e| ConsoleError::Open(p.clone(), e))?;
            (ConsoleOut::Socket(client.clone()), Some(l), client)
        }
    })
}

/// Starts the console input thread(s).
pub fn spawn_input(
    spec: &ConsoleSpec,
    dev: Arc<Mutex<impl ConsoleInput>>,
    listener: Option<UnixListener>,
    client: Arc<Mutex<Option<UnixStream>>>,
) -> io::Result<()> {
    match (spec, listener) {
        (ConsoleSpec::Stdio, _) => {
            std::thread::Builder::new()
                .name("stdin".into())
                .spawn(move || pump(&dev, io::stdin()))?;
        }
        (ConsoleSpec::Socket(_), Some(l)) => {
            std::thread::Builder::new()
                .name("console".into())
                .spawn(move || {
                    for s in l.incoming().flatten() {
                        let Ok(reader) = s.try_clone() else { continue };
                        *client.lock().unwrap_or_else(|e| e.into_inner()) = Some(s);
                        tracing::info!("console attached");
                        pump(&dev, reader);
                        tracing::info!("console detached");
                    }
                })?;
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_specs_parse() {
        assert_eq!("stdio".parse::<ConsoleSpec>().unwrap(), ConsoleSpec::Stdio);
        assert_eq!(
            "file:/x".parse::<ConsoleSpec>().unwrap(),
            ConsoleSpec::File("/x".into())
        );
        assert_eq!(
            "socket:/s".parse::<ConsoleSpec>().unwrap(),
            ConsoleSpec::Socket("/s".into())
        );
        assert!("tcp:1".parse::<ConsoleSpec>().is_err());
    }
}
