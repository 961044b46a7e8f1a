//! JSON Lines over a Unix domain socket, for the mirror's front-end on the same device. Every
//! connected client gets every frame's line through its own bounded queue; a client that
//! cannot keep up loses lines (counted in `/metrics`) and never slows the pipeline.
//!
//! The socket gets an explicit mode (0660 by default: the service's user and group, so the
//! mirror's front-end joins the group rather than relying on the umask), serves a capped number
//! of clients, and never takes over a path another live instance is listening on.

use std::io::{self, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::Arc;
use std::time::Duration;

use super::Hub;

/// Lines a client may fall behind by before it loses some.
const CLIENT_QUEUE: usize = 64;
/// A client that takes a line slower than this is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
const TICK: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy)]
pub struct UnixOptions {
    /// Permission bits of the socket file.
    pub mode: u32,
    /// Clients served at once; more are closed as soon as they connect.
    pub max_clients: usize,
}

impl Default for UnixOptions {
    fn default() -> Self {
        Self {
            mode: 0o660,
            max_clients: 8,
        }
    }
}

pub struct UnixServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    acceptor: Option<std::thread::JoinHandle<()>>,
}

impl UnixServer {
    /// Listens on `path` with `options.mode`, replacing a stale socket left by an earlier run,
    /// but never a file that is not a socket nor a socket someone still listens on.
    pub fn bind(path: &Path, hub: Arc<Hub>, options: UnixOptions) -> io::Result<Self> {
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a socket", path.display()),
                ));
            }
            if UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!(
                        "{} is served by another running process; stop it or choose another path",
                        path.display()
                    ),
                ));
            }
            std::fs::remove_file(path)?;
        }
        let listener = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(options.mode))?;
        let stop = Arc::new(AtomicBool::new(false));
        let clients = Arc::new(AtomicUsize::new(0));
        let acceptor = {
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name("unix-accept".into())
                .spawn(move || {
                    for client in listener.incoming() {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let Ok(client) = client else {
                            // Out of descriptors, say: wait instead of spinning on the error.
                            std::thread::sleep(TICK);
                            continue;
                        };
                        let taken =
                            clients.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                                (n < options.max_clients).then_some(n + 1)
                            });
                        if taken.is_err() {
                            tracing::debug!("unix socket: client limit reached; closing");
                            continue;
                        }
                        let (hub, stop, slot) =
                            (Arc::clone(&hub), Arc::clone(&stop), Arc::clone(&clients));
                        let spawned = std::thread::Builder::new()
                            .name("unix-client".into())
                            .spawn(move || {
                                if let Err(e) = serve(client, &hub, &stop) {
                                    tracing::debug!("unix socket client: {e}");
                                }
                                slot.fetch_sub(1, Ordering::AcqRel);
                            });
                        if let Err(e) = spawned {
                            // The closure (and with it the client) is gone; give its place back.
                            clients.fetch_sub(1, Ordering::AcqRel);
                            tracing::warn!("unix socket: cannot start a client thread: {e}");
                        }
                    }
                })?
        };
        Ok(Self {
            path: path.to_path_buf(),
            stop,
            acceptor: Some(acceptor),
        })
    }
}

fn serve(mut client: UnixStream, hub: &Hub, stop: &AtomicBool) -> io::Result<()> {
    client.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let lines = hub.socket.subscribe(CLIENT_QUEUE);
    while !stop.load(Ordering::Relaxed) {
        match lines.recv_timeout(TICK) {
            Ok(line) => {
                client.write_all(&line)?;
                client.write_all(b"\n")?;
            }
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    Ok(())
}

impl Drop for UnixServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = UnixStream::connect(&self.path);
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}
