//! The status page as a person sees it: headless Chromium (Debian's package) loads
//! `http://<agent.metrics>/` from a running agent in the balancer's namespace, runs the page's
//! script and renders it; the test reads the rendered DOM. A target shown healthy turns
//! unhealthy, with its reason, after its backend dies; the listener's rates are numbers after
//! traffic. Leaves a screenshot in target/web-status.png.

use std::{path::PathBuf, time::Duration};

use anyhow::{ensure, Context, Result};
use lb_tests::{
    harness::{config, poll, Balancer, URL},
    topology::{backend_addr, Topology},
};
use lb_userspace::health::TargetState;

const PAGE: &str = "http://127.0.0.1:9900/";

/// Chromium, headless, in host `lb`'s namespace with a profile of its own (removed after);
/// `what` is `--dump-dom` or `--screenshot=PATH`. The virtual-time budget lets the page's
/// timers run (it refreshes every second, so 3.5 s of it is three samples) while its fetches
/// take the real time they need. Without the background-networking flags Chromium's own
/// connections are refused by a closed network, many at a time.
fn chromium(b: &Balancer, what: &str) -> Result<String> {
    let profile = tempfile::tempdir()?;
    b.topo.exec(
        "lb",
        &format!(
            "timeout 60 chromium --headless --no-sandbox --disable-gpu --disable-quic \
             --no-first-run --disable-background-networking --disable-component-update \
             --disable-sync --disable-dev-shm-usage --user-data-dir={} \
             --window-size=1280,900 --virtual-time-budget=3500 {what} {PAGE} 2>/dev/null",
            profile.path().display()
        ),
    )
}

/// One row of the rendered page: the `<tr>` whose attribute `attr` is `value`.
fn row<'a>(dom: &'a str, attr: &str, value: &str) -> Option<&'a str> {
    let start = dom.find(&format!("{attr}=\"{value}\""))?;
    let end = dom[start..].find("</tr>")? + start;
    Some(&dom[start..end])
}

#[test]
fn the_status_page_shows_a_target_dying_and_the_traffic() -> Result<()> {
    let mut topo = Topology::routed(2)?;
    for i in 1..=2 {
        topo.backend(i)?;
    }
    let b = Balancer::start(topo, &config(2, "", "", "", ""), &[])?;
    b.wait_healthy(2)?;
    let b2 = format!("{}:8080", backend_addr(2));

    // Both targets healthy, as the page renders them.
    let dom = chromium(&b, "--dump-dom")?;
    ensure!(dom.contains("data-samples="), "not the status page:\n{dom}");
    let r = row(&dom, "data-target", &b2).with_context(|| format!("{b2} not shown:\n{dom}"))?;
    ensure!(r.contains("data-state=\"healthy\""), "{r}");
    ensure!(r.contains(">healthy<"), "{r}");
    let iface = row(&dom, "data-interface", "l0").with_context(|| format!("no l0:\n{dom}"))?;
    ensure!(iface.contains("data-mode=\""), "{iface}");

    // Traffic through the listener while the page takes its samples: its packets/s is a
    // number above 0 (two samples or more: the page refreshed). wrk keeps new connections
    // coming, bounded in time, while Chromium runs.
    let traffic = std::thread::scope(|s| {
        let load = s.spawn(|| {
            b.topo.exec(
                "cli",
                &format!("timeout 20 wrk -t1 -c4 -d6s -H 'Connection: close' {URL}"),
            )
        });
        let flowing = poll(
            Duration::from_secs(10),
            "traffic through the listener",
            || Ok((b.metric("lb_new_flows_total{listener=\"web\"}")? > 50.0).then_some(())),
        );
        let dom = flowing.and_then(|()| chromium(&b, "--dump-dom"));
        load.join().expect("the client thread")?;
        dom
    })?;
    let samples: u32 = traffic
        .split("data-samples=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .and_then(|n| n.parse().ok())
        .context("no data-samples")?;
    ensure!(samples >= 2, "the page did not refresh: {samples} samples");
    let web = row(&traffic, "data-listener", "web").context("no listener web")?;
    let rate = web
        .split("data-field=\"packets-per-second\">")
        .nth(1)
        .and_then(|s| s.split('<').next())
        .context("no packets/s cell")?;
    let per_second: f64 = rate
        .replace(',', "")
        .parse()
        .with_context(|| format!("packets/s {rate:?} in {web}"))?;
    ensure!(
        per_second > 0.0,
        "packets/s {rate:?} during traffic, in {web}"
    );

    // Backend 2 dies (its link goes down: checks time out); once the agent says so, the
    // page shows it unhealthy with NLB's reason.
    b.topo.set_backend_link(2, false)?;
    poll(Duration::from_secs(15), "backend 2 unhealthy", || {
        Ok((b.states()?.get(&format!("web/{b2}")).map(String::as_str)
            == Some(&TargetState::Unhealthy.to_string()))
        .then_some(()))
    })?;
    let dom = chromium(&b, "--dump-dom")?;
    let r = row(&dom, "data-target", &b2).with_context(|| format!("{b2} not shown:\n{dom}"))?;
    ensure!(
        r.contains("data-state=\"unhealthy\"") && r.contains(">unhealthy<"),
        "{r}"
    );
    ensure!(r.contains("Target.Timeout"), "no reason in {r}");
    let b1 = format!("{}:8080", backend_addr(1));
    let r1 = row(&dom, "data-target", &b1).context("backend 1 not shown")?;
    ensure!(r1.contains("data-state=\"healthy\""), "{r1}");

    let shot = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/web-status.png");
    chromium(&b, &format!("--screenshot={}", shot.display()))?;
    ensure!(
        std::fs::metadata(&shot)?.len() > 10_000,
        "no screenshot at {}",
        shot.display()
    );
    println!("FIGURE screenshot: {}", shot.display());
    Ok(())
}
