//! Running under systemd: the `sd_notify` protocol, written against its documentation
//! (<https://www.freedesktop.org/software/systemd/man/latest/sd_notify.html>): newline-separated
//! `KEY=VALUE` assignments in one datagram to the Unix socket named by `$NOTIFY_SOCKET`, a path
//! or, when it starts with `@`, a Linux abstract-namespace address.
//!
//! drape sends `READY=1` once the model is warm (`Type=notify` units are started then),
//! `WATCHDOG=1` from the inference loop while frames are processed (a stuck pipeline misses
//! `WatchdogSec=` and is restarted), and `STOPPING=1` when the run ends.

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::atomic::{AtomicBool, Ordering};

/// The environment variable systemd names the socket in.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

pub struct Notifier {
    socket: UnixDatagram,
    addr: SocketAddr,
    /// A failed send is logged once, not at every frame.
    warned: AtomicBool,
}

impl Notifier {
    /// The notifier `$NOTIFY_SOCKET` names; `Ok(None)` when not run by systemd.
    pub fn from_env() -> io::Result<Option<Self>> {
        match std::env::var(NOTIFY_SOCKET) {
            Ok(path) if !path.is_empty() => Self::new(&path).map(Some),
            _ => Ok(None),
        }
    }

    /// A notifier for the socket `address`: a path, or `@name` for an abstract one.
    pub fn new(address: &str) -> io::Result<Self> {
        let addr = match address.strip_prefix('@') {
            Some(name) => abstract_address(name.as_bytes())?,
            None => SocketAddr::from_pathname(address)?,
        };
        Ok(Self {
            socket: UnixDatagram::unbound()?,
            addr,
            warned: AtomicBool::new(false),
        })
    }

    /// Sends `state` (e.g. `READY=1`); failures are logged once and otherwise ignored, since a
    /// supervisor that cannot be told is no reason to stop serving.
    pub fn notify(&self, state: &str) {
        if let Err(e) = self.socket.send_to_addr(state.as_bytes(), &self.addr) {
            if !self.warned.swap(true, Ordering::Relaxed) {
                tracing::warn!(error = %e, "cannot notify systemd");
            }
        }
    }
}

#[cfg(target_os = "linux")]
fn abstract_address(name: &[u8]) -> io::Result<SocketAddr> {
    use std::os::linux::net::SocketAddrExt;
    SocketAddr::from_abstract_name(name)
}

#[cfg(not(target_os = "linux"))]
fn abstract_address(_: &[u8]) -> io::Result<SocketAddr> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "abstract socket addresses need Linux",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifies_a_path_and_an_abstract_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        Notifier::new(path.to_str().unwrap())
            .unwrap()
            .notify("READY=1");
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");

        #[cfg(target_os = "linux")]
        {
            use std::os::linux::net::SocketAddrExt;
            let name = format!("drape-test-{}", std::process::id());
            let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
            let listener = UnixDatagram::bind_addr(&addr).unwrap();
            Notifier::new(&format!("@{name}"))
                .unwrap()
                .notify("WATCHDOG=1");
            let n = listener.recv(&mut buf).unwrap();
            assert_eq!(&buf[..n], b"WATCHDOG=1");
        }
    }
}
