//! `drape run --mqtt` against a real Mosquitto broker that each test starts on a free loopback
//! port: records and track events arrive and parse, a broker restarted mid-run is reconnected
//! to without help, the last will marks a killed mirror offline, and TLS with credentials from
//! the environment gets through where a wrong CA or password does not. Every wait is bounded;
//! nothing depends on how fast the machine is. Needs Debian's `mosquitto`, `mosquitto-clients`
//! and `openssl` (installed by `.ci/run`).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use drape::stream::mqtt::{MqttConfig, MqttSink, MqttStats};
use drape::stream::{write_record, Emitted, FrameRecord, Sink};
use serde_json::Value;

/// Bounds hangs only; every wait ends as soon as its condition holds.
const TIMEOUT: Duration = Duration::from_secs(60);
const TOPIC: &str = "store/1/mirror";

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < TIMEOUT, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn mosquitto_binary() -> PathBuf {
    [
        "/usr/sbin/mosquitto",
        "/usr/bin/mosquitto",
        "/usr/local/sbin/mosquitto",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
    .expect("mosquitto is not installed (apt-get install mosquitto mosquitto-clients)")
}

/// A Mosquitto broker on 127.0.0.1:`port`, killed on drop whatever the test's outcome.
struct Broker {
    port: u16,
    dir: tempfile::TempDir,
    /// Listener settings beyond the port (TLS, authentication).
    extra: String,
    child: Option<Child>,
}

impl Broker {
    fn start(port: u16) -> Self {
        Self::with(port, tempfile::tempdir().unwrap(), String::new())
    }

    fn with(port: u16, dir: tempfile::TempDir, extra: String) -> Self {
        let mut b = Self {
            port,
            dir,
            extra,
            child: None,
        };
        b.restart();
        b
    }

    fn restart(&mut self) {
        assert!(self.child.is_none());
        let conf = self.dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {} 127.0.0.1\npersistence false\n{}\n",
                self.port,
                if self.extra.is_empty() {
                    "allow_anonymous true"
                } else {
                    &self.extra
                }
            ),
        )
        .unwrap();
        let child = Command::new(mosquitto_binary())
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let port = self.port;
        wait_until("the broker to listen", || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `mosquitto_sub` on `TOPIC/#`, collecting (topic, payload) pairs.
struct Subscriber {
    child: Child,
    messages: Arc<Mutex<Vec<(String, String)>>>,
}

impl Subscriber {
    fn start(port: u16) -> Self {
        Self::with(port, &[])
    }

    fn with(port: u16, extra: &[&str]) -> Self {
        let mut child = Command::new("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-v", "-q", "1"])
            .args(extra)
            .args(["-t", &format!("{TOPIC}/#")])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto_sub (mosquitto-clients) is not installed");
        let messages = Arc::new(Mutex::new(Vec::new()));
        let (out, sink) = (child.stdout.take().unwrap(), Arc::clone(&messages));
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if let Some((topic, payload)) = line.split_once(' ') {
                    sink.lock()
                        .unwrap()
                        .push((topic.to_string(), payload.to_string()));
                }
            }
        });
        Self { child, messages }
    }

    fn on(&self, leaf: &str) -> Vec<Value> {
        let topic = format!("{TOPIC}/{leaf}");
        self.messages
            .lock()
            .unwrap()
            .iter()
            .filter(|(t, _)| *t == topic)
            .map(|(t, p)| serde_json::from_str(p).unwrap_or_else(|e| panic!("{t}: {e}: {p}")))
            .collect()
    }

    fn last_status(&self) -> Option<String> {
        let s = self.on("status").pop()?;
        Some(s["state"].as_str().unwrap().to_string())
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `drape run` on the bundled frames, publishing to the broker; killed on drop.
struct Drape {
    child: Child,
    jsonl: PathBuf,
    http: Arc<Mutex<Option<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Drape {
    fn start(port: u16, dir: &Path, extra: &[&str]) -> Self {
        Self::with(&format!("mqtt://127.0.0.1:{port}/{TOPIC}"), dir, extra, &[])
    }

    fn with(url: &str, dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Self {
        let jsonl = dir.join("run.jsonl");
        let mut child = common::drape_command()
            .envs(env.iter().copied())
            .args(["run", "--source"])
            .arg(common::fixtures().join("frames"))
            .args([
                "--loop",
                "--fps",
                "10",
                "--budget-ms",
                "5000",
                "--no-profile",
            ])
            .args(["--http", "127.0.0.1:0", "--mqtt-client-id", "drape-test"])
            .args(["--mqtt", url])
            .args(extra)
            .arg("--jsonl")
            .arg(&jsonl)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let http = Arc::new(Mutex::new(None));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let (err, found, log) = (
            child.stderr.take().unwrap(),
            Arc::clone(&http),
            Arc::clone(&stderr),
        );
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                if let Some(url) = line.strip_prefix("drape: live preview at http://") {
                    *found.lock().unwrap() = Some(url.trim_end_matches('/').to_string());
                }
                log.lock().unwrap().push(line);
            }
        });
        Self {
            child,
            jsonl,
            http,
            stderr,
        }
    }

    fn logged(&self, text: &str) -> bool {
        self.stderr.lock().unwrap().iter().any(|l| l.contains(text))
    }

    fn lines(&self) -> usize {
        std::fs::read_to_string(&self.jsonl).map_or(0, |s| s.lines().count())
    }

    fn metrics(&self) -> String {
        let addr = self
            .http
            .lock()
            .unwrap()
            .clone()
            .expect("no preview address yet");
        let mut s = TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        write!(
            s,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).unwrap();
        body
    }

    fn terminate(&self) {
        common::terminate(&self.child);
    }
}

impl Drop for Drape {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} missing from /metrics:\n{text}"))
}

#[test]
fn records_events_and_status_arrive_and_parse_and_a_clean_exit_says_offline() {
    let broker = Broker::start(common::free_port());
    let sub = Subscriber::start(broker.port);
    let dir = tempfile::tempdir().unwrap();
    // Every new track starts at once, so events come with the first garments.
    let mut drape = Drape::start(broker.port, dir.path(), &["--track-confirm", "1"]);
    wait_until("5 frame records and a track event", || {
        sub.on("frames").len() >= 5 && !sub.on("events").is_empty()
    });
    assert_eq!(sub.last_status().as_deref(), Some("online"));
    assert_eq!(sub.on("status")[0]["client_id"], "drape-test");
    for f in sub.on("frames") {
        assert!(
            f["seq"].is_u64() && f["timings_ms"]["track"].is_f64(),
            "{f}"
        );
        for i in f["instances"].as_array().unwrap() {
            assert!(i["track_id"].is_u64() && i["label"].is_string(), "{i}");
            // --mqtt-masks defaults to none: light records.
            assert!(i.get("mask").is_none(), "{i}");
        }
        assert!(f["events"].is_array());
    }
    for e in sub.on("events") {
        assert!(
            ["started", "ended"].contains(&e["event"].as_str().unwrap()),
            "{e}"
        );
        assert!(e["track_id"].is_u64() && e["label"].is_string() && e["box"].is_array());
    }
    // The JSON lines keep their masks.
    let jsonl = std::fs::read_to_string(&drape.jsonl).unwrap();
    assert!(jsonl.contains("\"mask\":"));

    drape.terminate();
    let start = Instant::now();
    let status = loop {
        if let Some(s) = drape.child.try_wait().unwrap() {
            break s;
        }
        assert!(start.elapsed() < TIMEOUT, "drape ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
    wait_until("the goodbye status", || {
        sub.last_status().as_deref() == Some("offline")
    });
}

#[test]
fn a_broker_restarted_mid_run_is_reconnected_to_and_the_other_outputs_carry_on() {
    let mut broker = Broker::start(common::free_port());
    let dir = tempfile::tempdir().unwrap();
    let drape = Drape::start(broker.port, dir.path(), &[]);
    {
        let sub = Subscriber::start(broker.port);
        wait_until("frames before the restart", || sub.on("frames").len() >= 3);
    }
    wait_until("the preview address", || {
        drape.http.lock().unwrap().is_some()
    });
    assert_eq!(metric(&drape.metrics(), "drape_mqtt_connects_total"), 1);

    broker.stop();
    wait_until("drape to notice the broker is gone", || {
        metric(&drape.metrics(), "drape_mqtt_connected") == 0
    });
    // JSON lines and HTTP go on without the broker.
    let before = drape.lines();
    wait_until("JSON lines while the broker is down", || {
        drape.lines() >= before + 3
    });
    assert!(drape.metrics().contains("drape_mqtt_dropped_total "));

    broker.restart();
    let sub = Subscriber::start(broker.port);
    wait_until("frames after the restart", || sub.on("frames").len() >= 3);
    // The broker kept nothing (no persistence): the status is drape's own, sent again.
    wait_until("online again", || {
        sub.last_status().as_deref() == Some("online")
    });
    assert_eq!(metric(&drape.metrics(), "drape_mqtt_connects_total"), 2);
    assert_eq!(metric(&drape.metrics(), "drape_mqtt_connected"), 1);
}

#[test]
fn the_last_will_marks_a_killed_mirror_offline() {
    let broker = Broker::start(common::free_port());
    let sub = Subscriber::start(broker.port);
    let dir = tempfile::tempdir().unwrap();
    let mut drape = Drape::start(broker.port, dir.path(), &[]);
    wait_until("online", || sub.last_status().as_deref() == Some("online"));
    // SIGKILL: no goodbye; only the broker's last will can say it.
    drape.child.kill().unwrap();
    drape.child.wait().unwrap();
    wait_until("the last will", || {
        sub.last_status().as_deref() == Some("offline")
    });
    // Retained: a dashboard that subscribes later still sees the mirror offline.
    let late = Subscriber::start(broker.port);
    wait_until("the retained offline status", || {
        late.last_status().as_deref() == Some("offline")
    });
    assert_eq!(late.on("status")[0]["client_id"], "drape-test");
}

#[test]
fn with_no_broker_the_queue_fills_and_every_further_message_is_counted_dropped() {
    // A port nothing listens on: rumqttc keeps retrying and takes nothing from the queue.
    let port = common::free_port();
    let mut config =
        MqttConfig::from_url(&format!("mqtt://127.0.0.1:{port}/{TOPIC}"), "drape-drops").unwrap();
    config.queue = 4;
    let stats = Arc::new(MqttStats::default());
    let mut sink = MqttSink::start(config, Arc::clone(&stats)).unwrap();
    let model = common::tiny_model();
    let frame = drape::capture::Frame::with_capacity(0, 0);
    let (result, tracks) = (drape::Detections::default(), Default::default());
    let counters = Default::default();
    let record = FrameRecord {
        labels: model.labels(),
        frame: &frame,
        result: &result,
        tracks: &tracks,
        age_ms: 0.0,
        latency_ms: 0.0,
        budget_met: true,
        masks: Some(Default::default()),
    };
    let mut line = Vec::new();
    write_record(&mut line, &record).unwrap();
    let started = Instant::now();
    for _ in 0..10 {
        sink.frame(&Emitted {
            record: &record,
            line: &line,
            counters: &counters,
        })
        .unwrap();
    }
    // Queuing never waits for the network.
    assert!(started.elapsed() < TIMEOUT);
    assert_eq!(stats.queued.load(Ordering::Relaxed), 4);
    assert_eq!(stats.dropped.load(Ordering::Relaxed), 6);
    assert!(!stats.connected.load(Ordering::Relaxed));
}

/// Runs `openssl` with `args` in `dir`, for the test's throwaway certificates.
fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl is not installed");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn mqtts_with_credentials_from_the_environment_reaches_a_tls_broker_that_requires_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A throwaway CA and a broker certificate for 127.0.0.1 signed by it; a second CA that
    // signed nothing, which must not be trusted.
    for ca in ["ca", "other"] {
        openssl(
            d,
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "1",
                "-subj",
                &format!("/CN=drape test {ca}"),
                "-keyout",
                &format!("{ca}.key"),
                "-out",
                &format!("{ca}.pem"),
            ],
        );
    }
    openssl(
        d,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ],
    );
    std::fs::write(d.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    openssl(
        d,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            "san.ext",
            "-out",
            "server.pem",
        ],
    );
    let passwd = Command::new("mosquitto_passwd")
        .args(["-b", "-c"])
        .arg(d.join("passwords"))
        .args(["mirror", "s3cret"])
        .status()
        .expect("mosquitto_passwd is not installed");
    assert!(passwd.success());
    // Mosquitto drops root for its own user before reading the password file.
    for f in ["passwords", "server.key", "server.pem", "ca.pem"] {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(d.join(f), std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    std::fs::set_permissions(d, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let extra = format!(
        "allow_anonymous false\npassword_file {p}/passwords\ncafile {p}/ca.pem\n\
         certfile {p}/server.pem\nkeyfile {p}/server.key",
        p = d.display()
    );
    let port = common::free_port();
    let ca = d.join("ca.pem").display().to_string();
    let other = d.join("other.pem").display().to_string();
    let url = format!("mqtts://127.0.0.1:{port}/{TOPIC}");
    let broker = Broker::with(port, dir, extra);
    let sub = Subscriber::with(port, &["--cafile", &ca, "-u", "mirror", "-P", "s3cret"]);
    let run_dir = tempfile::tempdir().unwrap();
    let creds = [
        ("DRAPE_MQTT_USERNAME", "mirror"),
        ("DRAPE_MQTT_PASSWORD", "s3cret"),
    ];

    // A CA that did not sign the broker's certificate, then a wrong password: refused, said so
    // in the log, while the JSON lines carry on.
    for (ca, password, why) in [
        (&other, "s3cret", "UnknownIssuer"),
        (&ca, "wrong", "refused by the broker"),
    ] {
        let run = Drape::with(
            &url,
            run_dir.path(),
            &["--mqtt-ca", ca],
            &[creds[0], ("DRAPE_MQTT_PASSWORD", password)],
        );
        wait_until("the refusal", || run.logged(why));
        wait_until("JSON lines without the broker", || run.lines() >= 3);
        wait_until("the preview address", || run.http.lock().unwrap().is_some());
        assert_eq!(metric(&run.metrics(), "drape_mqtt_connects_total"), 0);
    }
    assert!(sub.on("frames").is_empty());

    let _run = Drape::with(&url, run_dir.path(), &["--mqtt-ca", &ca], &creds);
    wait_until("frames over TLS", || sub.on("frames").len() >= 3);
    assert_eq!(sub.last_status().as_deref(), Some("online"));
    drop(broker);
}
