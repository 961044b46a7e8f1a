//! Results to a store's MQTT broker, so a fleet of mirrors reports to one backend.
//!
//! Under `TOPIC/` a mirror publishes `frames` (each frame record, masks optional, QoS 0),
//! `events` (each track `started`/`ended`, QoS 1) and a retained `status`
//! (`{"state":"online"}`, replaced by the broker with the last will `{"state":"offline"}` when
//! the mirror vanishes without saying goodbye, and by drape itself on a clean exit).
//!
//! The inference loop only ever hands a message to rumqttc's bounded request queue without
//! waiting (`try_publish`); a full queue loses the message and counts it
//! (`drape_mqtt_dropped_total`). rumqttc's blocking `Connection` runs on its own thread, which
//! reconnects after a failure with exponential backoff and republishes `online` on every
//! connection. Messages taken into rumqttc at the moment a link breaks may be lost when the
//! broker starts a clean session; a broker restart always does.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{
    Client, Connection, ConnectionError, Event, LastWill, MqttOptions, Outgoing, Packet, QoS,
    TlsConfiguration, Transport,
};

use super::{write_record, Emitted, Sink};
use crate::error::{Error, Result};
use crate::track::EventJson;

/// Environment variables holding the broker credentials (never command-line flags, which any
/// user of the box can read in the process list).
pub const USERNAME_ENV: &str = "DRAPE_MQTT_USERNAME";
pub const PASSWORD_ENV: &str = "DRAPE_MQTT_PASSWORD";
/// Messages waiting for the network at most; more are dropped and counted.
pub const QUEUE_CAPACITY: usize = 64;
/// Broker connection keep-alive; a dead link is noticed within about 1.5× this.
const KEEP_ALIVE: Duration = Duration::from_secs(10);
/// Reconnect backoff: doubles from the first to the last after each failed attempt.
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Largest message drape sends (a frame record with 100 masks fits many times over) and
/// accepts (it subscribes to nothing, so only acks arrive).
const MAX_OUTGOING_BYTES: usize = 16 << 20;
const MAX_INCOMING_BYTES: usize = 64 << 10;
/// How long dropping the sink waits for the goodbye to reach the broker.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(2);

/// Whether frame records on the broker carry masks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum MqttMasks {
    /// Boxes, classes, scores and tracks only: a few hundred bytes a frame.
    #[default]
    None,
    /// Masks as in the JSON lines (`--rle` picks the encoding).
    Rle,
}

/// Everything needed to reach the broker; filled from flags, the environment or a config file.
#[derive(Clone, PartialEq, Eq)]
pub struct MqttConfig {
    pub host: String,
    pub port: u16,
    /// Topic prefix: messages go to `topic/frames`, `topic/events`, `topic/status`.
    pub topic: String,
    /// `mqtts://`: TLS, verified against `ca`.
    pub tls: bool,
    /// PEM file of the CA that signed the broker's certificate.
    pub ca: Option<PathBuf>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub client_id: String,
    pub masks: MqttMasks,
    pub queue: usize,
}

impl std::fmt::Debug for MqttConfig {
    // The password stays out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("topic", &self.topic)
            .field("tls", &self.tls)
            .field("ca", &self.ca)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "…"))
            .field("client_id", &self.client_id)
            .field("masks", &self.masks)
            .field("queue", &self.queue)
            .finish()
    }
}

fn bad_url(url: &str, why: &str) -> Error {
    Error::Config(format!("MQTT URL `{url}`: {why}"))
}

impl MqttConfig {
    /// Parses `mqtt://HOST[:PORT]/TOPIC` or `mqtts://…` (ports default to 1883 and 8883; an
    /// IPv6 host goes in brackets). Credentials do not belong in the URL.
    pub fn from_url(url: &str, client_id: &str) -> Result<Self> {
        let (tls, rest) = if let Some(r) = url.strip_prefix("mqtt://") {
            (false, r)
        } else if let Some(r) = url.strip_prefix("mqtts://") {
            (true, r)
        } else {
            return Err(bad_url(url, "must start with mqtt:// or mqtts://"));
        };
        let (authority, topic) = rest
            .split_once('/')
            .ok_or_else(|| bad_url(url, "no topic: use mqtt://HOST:PORT/TOPIC"))?;
        if authority.contains('@') {
            return Err(bad_url(
                url,
                &format!("credentials go in {USERNAME_ENV} and {PASSWORD_ENV}, not the URL"),
            ));
        }
        let topic = topic.trim_end_matches('/');
        if topic.is_empty()
            || topic.contains(['+', '#', '\0'])
            || topic.split('/').any(str::is_empty)
        {
            return Err(bad_url(
                url,
                "the topic must be non-empty, without wildcards (+ #) or empty levels",
            ));
        }
        let (host, port) = match authority.strip_prefix('[') {
            Some(v6) => {
                let (host, after) = v6
                    .split_once(']')
                    .ok_or_else(|| bad_url(url, "unclosed [ in the host"))?;
                (host, after.strip_prefix(':'))
            }
            None => match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            },
        };
        if host.is_empty() {
            return Err(bad_url(url, "no host"));
        }
        let port = match port {
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|&p| p > 0)
                .ok_or_else(|| bad_url(url, &format!("bad port `{p}`")))?,
            None if tls => 8883,
            None => 1883,
        };
        if client_id.is_empty() || client_id.len() > 65535 {
            return Err(Error::Config(format!(
                "MQTT client id `{client_id}` must be 1 to 65535 bytes"
            )));
        }
        Ok(Self {
            host: host.to_string(),
            port,
            topic: topic.to_string(),
            tls,
            ca: None,
            username: None,
            password: None,
            client_id: client_id.to_string(),
            masks: MqttMasks::None,
            queue: QUEUE_CAPACITY,
        })
    }

    /// Takes the credentials from [`USERNAME_ENV`] and [`PASSWORD_ENV`] where set.
    pub fn credentials_from_env(mut self) -> Result<Self> {
        let var = |name: &str| match std::env::var(name) {
            Ok(v) => Ok(Some(v)),
            Err(std::env::VarError::NotPresent) => Ok(None),
            Err(std::env::VarError::NotUnicode(_)) => {
                Err(Error::Config(format!("{name} is not valid UTF-8")))
            }
        };
        if let Some(u) = var(USERNAME_ENV)? {
            self.username = Some(u);
        }
        if let Some(p) = var(PASSWORD_ENV)? {
            self.password = Some(p);
        }
        Ok(self)
    }

    /// Checks what can be checked before connecting: TLS has its CA, a password its user.
    pub fn validate(&self) -> Result<()> {
        if self.tls && self.ca.is_none() {
            return Err(Error::Config(
                "mqtts:// needs the broker's CA certificate (--mqtt-ca FILE)".into(),
            ));
        }
        if !self.tls && self.ca.is_some() {
            return Err(Error::Config(
                "a CA certificate was given for a plain mqtt:// URL; use mqtts://".into(),
            ));
        }
        if self.password.is_some() && self.username.is_none() {
            return Err(Error::Config(format!(
                "{PASSWORD_ENV} is set but {USERNAME_ENV} is not"
            )));
        }
        if self.queue == 0 {
            return Err(Error::Config(
                "the MQTT queue must hold at least one message".into(),
            ));
        }
        Ok(())
    }

    fn topic(&self, leaf: &str) -> String {
        format!("{}/{leaf}", self.topic)
    }

    fn status(&self, state: &str) -> Vec<u8> {
        serde_json::json!({ "state": state, "client_id": self.client_id })
            .to_string()
            .into()
    }

    fn options(&self) -> Result<MqttOptions> {
        let mut o = MqttOptions::new(&self.client_id, &self.host, self.port);
        o.set_keep_alive(KEEP_ALIVE)
            .set_max_packet_size(MAX_INCOMING_BYTES, MAX_OUTGOING_BYTES)
            .set_last_will(LastWill::new(
                self.topic("status"),
                self.status("offline"),
                QoS::AtLeastOnce,
                true,
            ));
        if let Some(user) = &self.username {
            o.set_credentials(user, self.password.as_deref().unwrap_or(""));
        }
        if let Some(ca) = &self.ca {
            let pem = std::fs::read(ca).map_err(|source| Error::Io {
                path: ca.clone(),
                source,
            })?;
            if !pem.windows(11).any(|w| w == b"-----BEGIN ") {
                return Err(Error::Config(format!(
                    "{}: not a PEM certificate file",
                    ca.display()
                )));
            }
            o.set_transport(Transport::tls_with_config(TlsConfiguration::Simple {
                ca: pem,
                alpn: None,
                client_auth: None,
            }));
        }
        Ok(o)
    }
}

/// What the MQTT output has done so far, for `/metrics`.
#[derive(Debug, Default)]
pub struct MqttStats {
    /// Messages handed to the network thread.
    pub queued: AtomicU64,
    /// Messages lost because the queue was full (broker down or too slow).
    pub dropped: AtomicU64,
    /// Successful connections (the first one included).
    pub connects: AtomicU64,
    pub connected: AtomicBool,
}

/// The pipeline side: serialises and queues; never waits for the network.
pub struct MqttSink {
    config: MqttConfig,
    client: Client,
    stats: Arc<MqttStats>,
    frames_topic: String,
    events_topic: String,
    status_topic: String,
    /// The masks-free record, rewritten each frame.
    line: Vec<u8>,
    event: Vec<u8>,
    stopping: Arc<AtomicBool>,
    finished: Option<mpsc::Receiver<()>>,
}

impl MqttSink {
    /// Starts the network thread; the connection is made there, so a broker that is down at
    /// start-up is retried like one that goes down later.
    pub fn start(config: MqttConfig, stats: Arc<MqttStats>) -> Result<Self> {
        config.validate()?;
        let options = config.options()?;
        let (client, connection) = Client::new(options, config.queue);
        let stopping = Arc::new(AtomicBool::new(false));
        let (done_tx, done_rx) = mpsc::channel();
        {
            let (client, stats, stopping) =
                (client.clone(), Arc::clone(&stats), Arc::clone(&stopping));
            let status = (config.topic("status"), config.status("online"));
            let target = format!("{}:{}", config.host, config.port);
            std::thread::Builder::new()
                .name("mqtt".into())
                .spawn(move || {
                    drive(connection, &client, &stats, &stopping, status, &target);
                    let _ = done_tx.send(());
                })
                .map_err(|e| Error::Output(format!("starting the MQTT thread: {e}")))?;
        }
        Ok(Self {
            frames_topic: config.topic("frames"),
            events_topic: config.topic("events"),
            status_topic: config.topic("status"),
            config,
            client,
            stats,
            line: Vec::with_capacity(4096),
            event: Vec::with_capacity(256),
            stopping,
            finished: Some(done_rx),
        })
    }

    fn queue(&self, topic: &str, qos: QoS, retain: bool, payload: &[u8]) {
        match self.client.try_publish(topic, qos, retain, payload) {
            Ok(()) => self.stats.queued.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.stats.dropped.fetch_add(1, Ordering::Relaxed),
        };
    }
}

impl Sink for MqttSink {
    fn frame(&mut self, out: &Emitted<'_>) -> std::io::Result<()> {
        let line = match self.config.masks {
            MqttMasks::Rle => out.line,
            MqttMasks::None => {
                let mut light = *out.record;
                light.masks = None;
                write_record(&mut self.line, &light).map_err(std::io::Error::other)?;
                &self.line
            }
        };
        self.queue(&self.frames_topic, QoS::AtMostOnce, false, line);
        for e in &out.record.tracks.events {
            self.event.clear();
            serde_json::to_writer(&mut self.event, &EventJson(out.record.labels, e))
                .map_err(std::io::Error::other)?;
            self.queue(&self.events_topic, QoS::AtLeastOnce, false, &self.event);
        }
        Ok(())
    }
}

impl Drop for MqttSink {
    /// Says goodbye (the retained status becomes `offline`, no last will needed) and waits a
    /// bounded time for it to leave.
    fn drop(&mut self) {
        let bye = self.config.status("offline");
        self.queue(&self.status_topic, QoS::AtLeastOnce, true, &bye);
        self.stopping.store(true, Ordering::Relaxed);
        if self.client.try_disconnect().is_err() {
            tracing::warn!("MQTT queue full at exit: the broker will publish the last will");
        }
        if let Some(done) = self.finished.take() {
            if done.recv_timeout(SHUTDOWN_WAIT).is_err() {
                tracing::warn!("MQTT broker did not take the goodbye in time");
            }
        }
    }
}

/// The network thread: polls the connection, republishes `online` on every connection and
/// backs off between failed attempts, until the sink says it is stopping.
fn drive(
    mut connection: Connection,
    client: &Client,
    stats: &MqttStats,
    stopping: &AtomicBool,
    (status_topic, online): (String, Vec<u8>),
    target: &str,
) {
    let mut backoff = BACKOFF_MIN;
    let mut status_due = false;
    let mut failures = 0u64;
    loop {
        let event = match connection.recv() {
            Ok(e) => e,
            // Every client handle is gone.
            Err(_) => return,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                stats.connects.fetch_add(1, Ordering::Relaxed);
                stats.connected.store(true, Ordering::Relaxed);
                tracing::info!(broker = target, "MQTT connected");
                backoff = BACKOFF_MIN;
                failures = 0;
                status_due = true;
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) if stopping.load(Ordering::Relaxed) => {
                return;
            }
            Ok(_) => {}
            Err(e) => {
                stats.connected.store(false, Ordering::Relaxed);
                if stopping.load(Ordering::Relaxed) {
                    return;
                }
                failures += 1;
                // The first failure of an outage is worth a warning; the retries are not.
                if failures == 1 {
                    tracing::warn!(broker = target, "MQTT connection lost: {}", describe(&e));
                } else {
                    tracing::debug!(
                        broker = target,
                        failures,
                        "MQTT reconnect failed: {}",
                        describe(&e)
                    );
                }
                let wake = std::time::Instant::now() + backoff;
                while std::time::Instant::now() < wake && !stopping.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(50));
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
                if stopping.load(Ordering::Relaxed) {
                    return;
                }
                continue;
            }
        }
        // Retried on later events until the queue has room for it.
        if status_due && !stopping.load(Ordering::Relaxed) {
            status_due = client
                .try_publish(&status_topic, QoS::AtLeastOnce, true, online.clone())
                .is_err();
        }
    }
}

fn describe(e: &ConnectionError) -> String {
    match e {
        ConnectionError::Io(io) => format!("{io}"),
        ConnectionError::ConnectionRefused(code) => format!("refused by the broker: {code:?}"),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_or_name_their_fault() {
        let ok = |url: &str| MqttConfig::from_url(url, "m1").unwrap();
        let c = ok("mqtt://broker.local/store/7/mirror-2");
        assert_eq!(
            (c.host.as_str(), c.port, c.topic.as_str(), c.tls),
            ("broker.local", 1883, "store/7/mirror-2", false)
        );
        let c = ok("mqtts://10.0.0.5:9000/mirrors/");
        assert_eq!((c.port, c.topic.as_str(), c.tls), (9000, "mirrors", true));
        let c = ok("mqtt://[::1]:1884/t");
        assert_eq!((c.host.as_str(), c.port), ("::1", 1884));
        assert_eq!(ok("mqtts://h/t").port, 8883);
        for (url, fault) in [
            ("http://h/t", "mqtt://"),
            ("mqtt://h", "no topic"),
            ("mqtt://h/", "topic"),
            ("mqtt://h/a/#", "wildcards"),
            ("mqtt://h/a//b", "empty levels"),
            ("mqtt://h:0/t", "bad port"),
            ("mqtt://h:99999/t", "bad port"),
            ("mqtt://:1883/t", "no host"),
            ("mqtt://user:pw@h/t", USERNAME_ENV),
            ("mqtt://[::1/t", "unclosed"),
        ] {
            let e = MqttConfig::from_url(url, "m1").unwrap_err().to_string();
            assert!(e.contains(fault) && e.contains(url), "{url}: {e}");
        }
    }

    #[test]
    fn inconsistent_settings_are_refused() {
        let base = MqttConfig::from_url("mqtts://h/t", "m1").unwrap();
        assert!(base
            .validate()
            .unwrap_err()
            .to_string()
            .contains("--mqtt-ca"));
        let plain = MqttConfig {
            ca: Some("ca.pem".into()),
            ..MqttConfig::from_url("mqtt://h/t", "m1").unwrap()
        };
        assert!(plain
            .validate()
            .unwrap_err()
            .to_string()
            .contains("mqtts://"));
        let no_user = MqttConfig {
            password: Some("pw".into()),
            ..MqttConfig::from_url("mqtt://h/t", "m1").unwrap()
        };
        assert!(no_user
            .validate()
            .unwrap_err()
            .to_string()
            .contains(USERNAME_ENV));
        assert!(format!("{no_user:?}").contains("password: Some(\"…\")"));
        assert!(MqttConfig::from_url("mqtt://h/t", "").is_err());
    }

    #[test]
    fn a_ca_file_that_is_not_pem_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, b"not a certificate").unwrap();
        let config = MqttConfig {
            ca: Some(ca.clone()),
            ..MqttConfig::from_url("mqtts://h/t", "m1").unwrap()
        };
        let e = config.options().unwrap_err().to_string();
        assert!(e.contains("ca.pem") && e.contains("PEM"), "{e}");
    }
}
