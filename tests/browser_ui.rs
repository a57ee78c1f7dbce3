//! The operator page in a real browser: headless Chromium driven through
//! chromedriver (WebDriver, fantoccini) against a real server, checking what
//! a person would see and do: the rows and their states, a filter, a live
//! change without a reload, Cancel through its button, an operation whose
//! message holds `<script>` shown as text. It saves a screenshot to
//! `target/ui-screenshot.png`.
//!
//! Needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs them;
//! `$OPSD_CHROMIUM` and `$OPSD_CHROMEDRIVER` name others). Without them the
//! test reports itself ignored, and fails under `CI=true`.

mod common;

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, ExitCode, Stdio},
    time::Duration,
};

use common::{
    any_string,
    calls::respond,
    create, op,
    outside::{self, Tool},
    status, TestServer,
};
use fantoccini::{Client, ClientBuilder, Locator};
use opsd::pb::opsd::v1::{
    complete_operation_request, CompleteOperationRequest, CreateOperationRequest,
};
use serde_json::json;

#[derive(Clone)]
struct Browser {
    chromium: PathBuf,
    chromedriver: PathBuf,
}

fn main() -> ExitCode {
    let browser = find_browser();
    outside::run(vec![outside::test(
        "the_operator_page_in_headless_chromium",
        &browser,
        |browser| outside::block_on(the_operator_page_in_headless_chromium(browser)),
    )])
}

fn find_browser() -> Tool<Browser> {
    let pick = |var: &str, names: &[&str]| -> Option<PathBuf> {
        if let Some(path) = std::env::var_os(var) {
            return Some(PathBuf::from(path));
        }
        let path = std::env::var_os("PATH")?;
        std::env::split_paths(&path)
            .flat_map(|dir| names.iter().map(move |n| dir.join(n)))
            .find(|p| p.is_file())
    };
    let chromium = pick(
        "OPSD_CHROMIUM",
        &["chromium", "chromium-browser", "google-chrome"],
    )
    .ok_or("no chromium on the PATH (apt-get install chromium)")?;
    let chromedriver = pick("OPSD_CHROMEDRIVER", &["chromedriver"])
        .ok_or("no chromedriver on the PATH (apt-get install chromium-driver)")?;
    Ok(Browser {
        chromium,
        chromedriver,
    })
}

/// A chromedriver on a free port, stopped on drop.
struct Driver {
    child: Child,
    url: String,
}

impl Driver {
    async fn start(path: &Path) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(path)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let url = format!("http://127.0.0.1:{port}");
        // Ready once it answers its status.
        common::eventually("chromedriver answers", || {
            let url = url.clone();
            async move { reqwest::get(format!("{url}/status")).await.is_ok() }
        })
        .await;
        Self { child, url }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn connect(driver: &Driver, chromium: &Path, profile: &Path) -> Client {
    let capabilities = json!({
        "goog:chromeOptions": {
            "binary": chromium,
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", "--disable-quic",
                "--window-size=1280,900",
                format!("--user-data-dir={}", profile.display()),
            ],
        }
    });
    let serde_json::Value::Object(capabilities) = capabilities else {
        unreachable!()
    };
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    ClientBuilder::new(connector)
        .capabilities(capabilities)
        .connect(&driver.url)
        .await
        .expect("a WebDriver session")
}

/// The state each row of the list shows, by operation name (read in one
/// script, so a row the page replaces meanwhile cannot go stale).
async fn states(client: &Client) -> Vec<(String, String)> {
    let rows = client
        .execute(
            "return [...document.querySelectorAll('tbody#rows tr')]\
               .map(r => [r.dataset.name || '', r.dataset.state || '']);",
            vec![],
        )
        .await
        .unwrap();
    serde_json::from_value(rows).unwrap()
}

/// Waits until `check` holds on what the page shows.
async fn until<F, Fut>(client: &Client, what: &str, mut check: F)
where
    F: FnMut(Client) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let give_up = tokio::time::Instant::now() + Duration::from_secs(15);
    while !check(client.clone()).await {
        if tokio::time::Instant::now() > give_up {
            let rows = states(client).await;
            panic!("the page never showed: {what}; rows: {rows:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn state_of(client: &Client, name: &str) -> Option<String> {
    states(client)
        .await
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, s)| s)
}

/// The text an element shows (empty when there is none).
async fn text_of(client: &Client, css: &str) -> String {
    let text = client
        .execute(
            "const e = document.querySelector(arguments[0]); return e ? e.textContent : '';",
            vec![json!(css)],
        )
        .await
        .unwrap();
    text.as_str().unwrap_or_default().to_owned()
}

async fn the_operator_page_in_headless_chromium(browser: Browser) {
    let server = TestServer::start().await;
    let (mut ops, mut workers) = (server.operations().await, server.workers().await);
    let parent = "projects/demo/locations/us";
    let running = create(
        &mut workers,
        CreateOperationRequest {
            metadata: Some(any_string("42%")),
            ..op(parent, "a-running")
        },
    )
    .await
    .name;
    let succeeded = create(&mut workers, op(parent, "b-succeeded")).await.name;
    workers
        .complete_operation(respond(&succeeded, "done"))
        .await
        .unwrap();
    let hostile = create(&mut workers, op(parent, "c-failed")).await.name;
    workers
        .complete_operation(CompleteOperationRequest {
            name: hostile.clone(),
            result: Some(complete_operation_request::Result::Error(status(
                13,
                "<script>window.pwned = true</script><img src=x onerror=\"window.pwned=true\">",
            ))),
            metadata: None,
        })
        .await
        .unwrap();
    let cancelled = create(&mut workers, op(parent, "d-cancelled")).await.name;
    ops.cancel_operation(opsd::pb::google::longrunning::CancelOperationRequest {
        name: cancelled.clone(),
    })
    .await
    .unwrap();
    let to_cancel = create(&mut workers, op(parent, "e-to-cancel")).await.name;

    // The page is served with its security headers.
    let page = reqwest::get(format!("{}/ui/", server.url)).await.unwrap();
    assert_eq!(page.status(), 200);
    let csp = page.headers()["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("script-src 'self'") && csp.contains("default-src 'none'"));

    let driver = Driver::start(&browser.chromedriver).await;
    let profile = std::env::temp_dir().join(format!("opsd-chromium-{}", std::process::id()));
    let client = connect(&driver, &browser.chromium, &profile).await;
    client.goto(&format!("{}/ui/", server.url)).await.unwrap();

    // Every operation, with its state.
    until(&client, "five rows", |c| async move {
        states(&c).await.len() == 5
    })
    .await;
    let shown = states(&client).await;
    let expect = [
        (&running, "running"),
        (&succeeded, "succeeded"),
        (&hostile, "failed"),
        (&cancelled, "cancelled"),
        (&to_cancel, "running"),
    ];
    for (name, state) in expect {
        assert!(
            shown.contains(&(name.clone(), state.to_owned())),
            "{name} {state} in {shown:?}"
        );
    }
    assert!(text_of(&client, "tbody#rows").await.contains("42%"));
    until(&client, "the live feed", |c| async move {
        c.find(Locator::Css("#live"))
            .await
            .unwrap()
            .attr("data-live")
            .await
            .unwrap()
            .as_deref()
            == Some("on")
    })
    .await;

    // A filter narrows the list; a bad one shows the server's message.
    let filter = client.find(Locator::Id("filter")).await.unwrap();
    filter.send_keys("done = true").await.unwrap();
    client
        .find(Locator::Css("button[type=submit]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    until(&client, "three done rows", |c| async move {
        let rows = states(&c).await;
        rows.len() == 3 && rows.iter().all(|(_, s)| s != "running")
    })
    .await;
    filter.clear().await.unwrap();
    filter.send_keys("colour = red").await.unwrap();
    client
        .find(Locator::Css("button[type=submit]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    until(&client, "the server's error", |c| async move {
        text_of(&c, "#message").await.contains("INVALID_ARGUMENT")
    })
    .await;
    assert!(text_of(&client, "#message").await.contains("colour"));
    filter.clear().await.unwrap();
    client
        .find(Locator::Css("button[type=submit]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    until(&client, "five rows again", |c| async move {
        states(&c).await.len() == 5
    })
    .await;

    // A live change: the worker completes an operation; its row turns done
    // without a reload.
    workers
        .complete_operation(respond(&running, "finished"))
        .await
        .unwrap();
    let name = running.clone();
    until(&client, "the completed row", move |c| {
        let name = name.clone();
        async move { state_of(&c, &name).await.as_deref() == Some("succeeded") }
    })
    .await;

    // Cancel through the button, after the confirmation.
    client
        .find(Locator::Css(&format!("tr[data-name=\"{to_cancel}\"]")))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    until(&client, "the detail", |c| async move {
        text_of(&c, "#detail-name").await.ends_with("e-to-cancel")
    })
    .await;
    client
        .find(Locator::Id("cancel"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    client.accept_alert().await.unwrap();
    until(&client, "the server's answer", |c| async move {
        text_of(&c, "#answer").await.contains("200 {}")
    })
    .await;
    let name = to_cancel.clone();
    until(&client, "the cancelled row", move |c| {
        let name = name.clone();
        async move { state_of(&c, &name).await.as_deref() == Some("cancelled") }
    })
    .await;
    let got = ops
        .get_operation(opsd::pb::google::longrunning::GetOperationRequest {
            name: to_cancel.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(got.done, "the button cancelled it on the server");

    // Markup in operation data is text, never HTML.
    client
        .find(Locator::Css(&format!("tr[data-name=\"{hostile}\"]")))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    until(&client, "the failed operation's error", |c| async move {
        text_of(&c, "#result").await.contains("<script>")
    })
    .await;
    assert!(text_of(&client, "#result")
        .await
        .contains("<img src=x onerror="));
    assert_eq!(
        client
            .execute("return window.pwned === undefined;", vec![])
            .await
            .unwrap(),
        json!(true)
    );
    assert!(client
        .find_all(Locator::Css("#detail script, #detail img"))
        .await
        .unwrap()
        .is_empty());

    let png = client.screenshot().await.unwrap();
    let shot = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/ui-screenshot.png");
    std::fs::write(&shot, &png).unwrap();
    assert!(png.starts_with(b"\x89PNG"));

    client.close().await.unwrap();
    std::fs::remove_dir_all(&profile).ok();
    server.stop().await;
}
