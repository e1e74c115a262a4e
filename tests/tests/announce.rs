//! The agent with `[announce]` when BIRD is not there, or not set up for it: it goes on
//! serving, says why in status and metrics, and announces as soon as BIRD can take it.

use std::{path::Path, time::Duration};

use anyhow::{Context, Result};
use lb_tests::harness::{config, poll, Balancer};
use lb_userspace::api::AnnounceStatus;

fn announce(b: &Balancer) -> Result<Option<AnnounceStatus>> {
    Ok(b.status().ok().and_then(|s| s.announce))
}

#[test]
fn bird_away_or_without_the_include_never_wedges_the_agent_and_it_announces_once_bird_can(
) -> Result<()> {
    let mut text = config(2, "", "", "", "");
    text.push_str(
        "\n[announce]\nbird_socket = \"DIR/bird.ctl\"\nbird_config = \"DIR/lb-bird/vips.conf\"\n",
    );
    let mut b = Balancer::with_backends(
        lb_tests::topology::Options {
            backends: 2,
            ..Default::default()
        },
        &text,
    )?;
    b.wait_healthy(2)?;
    let dir = b.topo.dir().to_path_buf();

    // No BIRD: the agent serves, wants the VIP announced, and says it cannot reach BIRD.
    let a = poll(Duration::from_secs(10), "BIRD's absence in status", || {
        Ok(announce(&b)?.filter(|a| a.bird_error.is_some()))
    })?;
    let error = a.bird_error.clone().unwrap_or_default();
    assert!(error.contains("connecting to BIRD at"), "{error}");
    assert!(
        a.routes.iter().all(|r| r.wanted && r.announced.is_none()),
        "{a:?}"
    );
    assert_eq!(b.metric("lb_bird_up")?, 0.0);
    let (answers, _) = b.spread(lb_tests::harness::URL, 20)?;
    assert!(!answers.contains_key("ERR"), "{answers:?}");

    // BIRD without the include: the agent says what is missing.
    let conf = dir.join("bird.conf");
    std::fs::write(&conf, "router id 10.0.2.1;\nprotocol device {}\n")?;
    let sock = dir.join("bird.ctl");
    let s = |p: &Path| p.to_string_lossy().into_owned();
    b.topo.spawn(
        "lb",
        "bird",
        Path::new("bird"),
        &[
            "-f",
            "-c",
            &s(&conf),
            "-s",
            &s(&sock),
            "-P",
            &s(&dir.join("bird.pid")),
        ],
    )?;
    let a = poll(
        Duration::from_secs(10),
        "the missing include in status",
        || {
            Ok(announce(&b)?.filter(|a| {
                a.bird_error
                    .as_deref()
                    .is_some_and(|e| e.contains("does its config include"))
            }))
        },
    )?;
    let error = a.bird_error.unwrap_or_default();
    assert!(
        error.contains(&format!(
            "include \"{}/*.conf\"",
            dir.join("lb-bird").display()
        )),
        "{error}"
    );

    // The include added and BIRD reconfigured by its operator: the agent announces.
    std::fs::write(
        &conf,
        format!(
            "router id 10.0.2.1;\nprotocol device {{}}\ninclude \"{}/*.conf\";\n",
            dir.join("lb-bird").display()
        ),
    )?;
    let out = std::process::Command::new("birdc")
        .arg("-s")
        .arg(&sock)
        .arg("configure")
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let a = poll(Duration::from_secs(10), "the VIP announced", || {
        Ok(announce(&b)?.filter(|a| {
            a.bird_error.is_none() && a.routes.iter().all(|r| r.announced == Some(true))
        }))
    })?;
    assert_eq!(a.routes[0].prefix, "10.0.100.10/32");
    assert_eq!(b.metric("lb_bird_up")?, 1.0);
    assert_eq!(b.metric("lb_vip_announced{vip=\"10.0.100.10\"}")?, 1.0);
    let shown = std::process::Command::new("birdc")
        .arg("-s")
        .arg(&sock)
        .args(["show", "route", "10.0.100.10/32"])
        .output()?;
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.contains("lb_vip_10_0_100_10"), "{shown}");
    // The file the agent wrote is BIRD's to read.
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(dir.join("lb-bird/vips.conf"))
            .context("the agent's file")?
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o644);
    Ok(())
}
