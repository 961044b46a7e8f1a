//! The README's demo in a real browser: `drape demo` on the bundled frames and model, the page
//! loaded in headless Chromium through ChromeDriver (WebDriver), live instances and latency
//! stats must appear, and a screenshot is saved as `demo-screenshot.png` in Cargo's
//! test scratch directory (`target/tmp` unless `CARGO_TARGET_DIR` moves it).
//!
//! Needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs them).

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{json, Value};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// Kills the child when the test ends, however it ends.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One HTTP/1.1 request with a JSON body; returns (status, body).
fn http(
    port: u16,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> std::io::Result<(u16, Vec<u8>)> {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let r = common::http_exchange(("127.0.0.1", port), &request, Duration::from_secs(60))?;
    Ok((r.status, r.body))
}

fn webdriver(port: u16, method: &str, path: &str, body: Option<Value>) -> Value {
    let (status, body) = http(port, method, path, body.as_ref()).expect("chromedriver answers");
    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    assert!(status == 200, "WebDriver {method} {path}: {status} {v}");
    v["value"].clone()
}

fn wait_until(what: &str, timeout: Duration, mut ready: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ready() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn demo_page_shows_live_instances_in_headless_chromium() {
    for tool in [CHROMIUM, CHROMEDRIVER] {
        assert!(
            std::path::Path::new(tool).exists(),
            "{tool} is missing: apt-get install chromium chromium-driver (as .ci/run does)"
        );
    }
    let demo_port = common::free_port();
    let _demo = Guard(
        common::drape_command()
            .args([
                "demo",
                "--http",
                &format!("127.0.0.1:{demo_port}"),
                "--no-profile",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_until("the demo server", Duration::from_secs(60), || {
        matches!(http(demo_port, "GET", "/healthz", None), Ok((200, _)))
    });

    let driver_port = common::free_port();
    let _driver = Guard(
        Command::new(CHROMEDRIVER)
            .arg(format!("--port={driver_port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_until("chromedriver", Duration::from_secs(30), || {
        matches!(http(driver_port, "GET", "/status", None), Ok((200, _)))
    });
    let profile = tempfile::tempdir().unwrap();
    let session = webdriver(
        driver_port,
        "POST",
        "/session",
        Some(json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                         "--disable-background-networking", "--disable-component-update",
                         "--disable-sync", "--window-size=1280,720",
                         format!("--user-data-dir={}", profile.path().display())]
            }
        }}})),
    );
    let id = session["sessionId"]
        .as_str()
        .expect("a session id")
        .to_string();
    webdriver(
        driver_port,
        "POST",
        &format!("/session/{id}/url"),
        Some(json!({"url": format!("http://127.0.0.1:{demo_port}/")})),
    );

    let find = |selector: &str| {
        webdriver(
            driver_port,
            "POST",
            &format!("/session/{id}/elements"),
            Some(json!({"using": "css selector", "value": selector})),
        )
        .as_array()
        .map_or(0, Vec::len)
    };
    let text_of = |selector: &str| {
        let el = webdriver(
            driver_port,
            "POST",
            &format!("/session/{id}/element"),
            Some(json!({"using": "css selector", "value": selector})),
        );
        let handle = el
            .as_object()
            .and_then(|o| o.values().next())
            .and_then(Value::as_str)
            .unwrap()
            .to_string();
        webdriver(
            driver_port,
            "GET",
            &format!("/session/{id}/element/{handle}/text"),
            None,
        )
        .as_str()
        .unwrap_or("")
        .to_string()
    };
    wait_until(
        "live instances on the page",
        Duration::from_secs(60),
        || find("li.instance") > 0,
    );
    wait_until("latency stats on the page", Duration::from_secs(30), || {
        text_of("#p50").ends_with("ms")
    });
    let script = |js: &str| {
        webdriver(
            driver_port,
            "POST",
            &format!("/session/{id}/execute/sync"),
            Some(json!({"script": js, "args": []})),
        )
    };
    // The live view shows the newest frame as soon as the server has one, and says it is
    // waiting until then: it is never an unexplained black box.
    wait_until(
        "the first frame in the live view",
        Duration::from_secs(30),
        || script("return document.getElementById('waiting').hidden").as_bool() == Some(true),
    );
    assert!(script("return document.getElementById('live').naturalWidth").as_u64() > Some(0));

    let png = webdriver(
        driver_port,
        "GET",
        &format!("/session/{id}/screenshot"),
        None,
    );
    let png = base64::engine::general_purpose::STANDARD
        .decode(png.as_str().unwrap())
        .unwrap();
    let shot = image::load_from_memory_with_format(&png, image::ImageFormat::Png)
        .unwrap()
        .to_rgb8();
    // What a person sees in the live view's box: a painted frame, not the empty black box.
    let rect = script(
        "const r = document.getElementById('live').getBoundingClientRect(); \
         return [r.x, r.y, r.width, r.height, window.devicePixelRatio];",
    );
    let r: Vec<f64> = rect
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let (x0, y0) = ((r[0] * r[4]) as u32, (r[1] * r[4]) as u32);
    let (w, h) = ((r[2] * r[4]) as u32, (r[3] * r[4]) as u32);
    assert!(w > 100 && h > 100, "live view is {w}x{h}");
    let pixels = (y0..(y0 + h).min(shot.height()))
        .flat_map(|y| (x0..(x0 + w).min(shot.width())).map(move |x| (x, y)))
        .map(|(x, y)| shot.get_pixel(x, y).0);
    let (mut lit, mut total) = (0usize, 0usize);
    for p in pixels {
        total += 1;
        lit += (p.iter().map(|&c| c as u32).sum::<u32>() > 60) as usize;
    }
    assert!(
        lit * 2 > total,
        "the live view is mostly black: {lit} of {total} pixels lit"
    );
    // Wherever the build goes: a `target/` beside the sources need not exist.
    let out = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("demo-screenshot.png");
    std::fs::write(&out, &png).unwrap();
    webdriver(driver_port, "DELETE", &format!("/session/{id}"), None);
}
