//! JSON Lines over a Unix domain socket, for the mirror's front-end on the same device. Every
//! connected client gets every frame's line through its own bounded queue; a client that
//! cannot keep up loses lines (counted in `/metrics`) and never slows the pipeline.

use std::io::{self, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::Arc;
use std::time::Duration;

use super::Hub;

/// Lines a client may fall behind by before it loses some.
const CLIENT_QUEUE: usize = 64;
/// A client that takes a line slower than this is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
const TICK: Duration = Duration::from_secs(1);

pub struct UnixServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    acceptor: Option<std::thread::JoinHandle<()>>,
}

impl UnixServer {
    /// Listens on `path`, replacing a stale socket left by an earlier run (but never a file
    /// that is not a socket).
    pub fn bind(path: &Path, hub: Arc<Hub>) -> io::Result<Self> {
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a socket", path.display()),
                ));
            }
            std::fs::remove_file(path)?;
        }
        let listener = UnixListener::bind(path)?;
        let stop = Arc::new(AtomicBool::new(false));
        let acceptor = {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                for client in listener.incoming() {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let Ok(client) = client else { continue };
                    let (hub, stop) = (Arc::clone(&hub), Arc::clone(&stop));
                    std::thread::spawn(move || {
                        if let Err(e) = serve(client, &hub, &stop) {
                            tracing::debug!("unix socket client: {e}");
                        }
                    });
                }
            })
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
