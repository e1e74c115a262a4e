//! The failover picture: clients request the VIP continuously while backend 2 goes silent and
//! comes back; requests answered per backend per 100 ms, drawn as a PNG. The same run gives
//! the time from the death to the removal from the maps, and from the return to the maps.

use std::{
    collections::BTreeMap,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use plotters::prelude::*;

use crate::{
    harness::{config, poll, Balancer, URL},
    topology::Topology,
};

pub struct Failover {
    /// Seconds since the clients started: death, removal from the maps, return, back in the maps.
    pub died: f64,
    pub removed: f64,
    pub revived: f64,
    pub back: f64,
    /// Per 100 ms bucket: answers per backend name (and "ERR").
    pub buckets: Vec<BTreeMap<String, u32>>,
    /// `targets register` → maps written: (whole CLI call ms, agent-side ms) per call.
    pub register_ms: Vec<(f64, f64)>,
    /// From the check that completed b2's unhealthy threshold to its maps written (agent log).
    pub threshold_to_maps_ms: f64,
}

pub fn failover(seconds: f64) -> Result<Failover> {
    let mut topo = Topology::routed(3)?;
    for i in 1..=3 {
        topo.backend(i)?;
    }
    let mut b = Balancer::start(topo, &config(3, "", "", "", ""), &[])?;
    b.log_on_drop = false;
    b.wait_healthy(3)?;
    let script = b.topo.dir().join("client.py");
    std::fs::write(&script, include_str!("../client.py"))?;
    // Eight clients, so that one stuck on the dead backend does not stop the others; their
    // times are counted from `start` (both sides read CLOCK_MONOTONIC).
    let start = Instant::now();
    let origin = monotonic_seconds();
    let child = std::process::Command::new("ip")
        .args(["netns", "exec", &b.topo.ns("cli"), "python3"])
        .arg(&script)
        .args([
            "loop",
            URL,
            &seconds.to_string(),
            "0.02",
            "8",
            &format!("{origin:.6}"),
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let at = |s: f64| start + Duration::from_secs_f64(s);
    let b2 = "10.0.2.12:8080";
    std::thread::sleep(at(seconds * 0.25).saturating_duration_since(Instant::now()));
    let died = start.elapsed().as_secs_f64();
    b.topo.set_backend_link(2, false)?;
    poll(Duration::from_secs(10), "b2 out of the maps", || {
        Ok((!b.table_targets(0)?.contains(b2)).then_some(()))
    })?;
    let removed = start.elapsed().as_secs_f64();
    let log = b.agent_log();
    let threshold_to_maps_ms = log
        .lines()
        .find(|l| l.contains("maps follow the health transition") && l.contains(b2))
        .and_then(|l| l.split("after_check_us=").nth(1))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok())
        .with_context(|| format!("no transition line for {b2} in the agent log:\n{log}"))?
        / 1e3;
    std::thread::sleep(at(seconds * 0.6).saturating_duration_since(Instant::now()));
    let revived = start.elapsed().as_secs_f64();
    b.topo.set_backend_link(2, true)?;
    poll(Duration::from_secs(10), "b2 back in the maps", || {
        Ok(b.table_targets(0)?.contains(b2).then_some(()))
    })?;
    let back = start.elapsed().as_secs_f64();
    let out = child.wait_with_output()?;
    // Whole 100 ms buckets only.
    let mut buckets: Vec<BTreeMap<String, u32>> =
        vec![BTreeMap::new(); (seconds * 10.0).floor() as usize];
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some((t, who)) = line.split_once(' ') else {
            continue;
        };
        let Ok(t) = t.parse::<f64>() else { continue };
        if let Some(bucket) = buckets.get_mut((t * 10.0) as usize) {
            *bucket.entry(who.to_string()).or_default() += 1;
        }
    }
    // register → maps written, five new targets (nothing listens there: they stay initial).
    let mut register_ms = Vec::new();
    for i in 0..5 {
        let target = format!("10.0.2.{}:8080", 20 + i);
        let started = Instant::now();
        let (code, text) = b.cli(&["targets", "register", "--group", "web", &target])?;
        let call = started.elapsed().as_secs_f64() * 1e3;
        anyhow::ensure!(code == 0, "register: {text}");
        let agent: f64 = text
            .split("maps written in ")
            .nth(1)
            .and_then(|r| r.split(' ').next())
            .and_then(|v| v.parse().ok())
            .context("maps written in … ms")?;
        register_ms.push((call, agent));
    }
    Ok(Failover {
        died,
        removed,
        revived,
        back,
        buckets,
        register_ms,
        threshold_to_maps_ms,
    })
}

/// CLOCK_MONOTONIC in seconds, the clock Python's `time.monotonic()` reads.
pub fn monotonic_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out-parameter.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// A picture of counts per 100 ms over time: one line per series, vertical markers.
pub struct Picture<'a> {
    pub caption: &'a str,
    pub y_desc: &'a str,
    /// Per 100 ms bucket: the count of each series key.
    pub buckets: &'a [BTreeMap<String, u32>],
    /// (key, legend label, colour).
    pub series: Vec<(&'a str, String, RGBColor)>,
    /// (seconds, text).
    pub markers: Vec<(f64, &'a str)>,
}

/// Draws the buckets to `path`.
pub fn draw(f: &Failover, path: &Path) -> Result<()> {
    let series = [("b1", BLUE), ("b2", RED), ("b3", GREEN), ("ERR", BLACK)]
        .into_iter()
        .map(|(name, color)| {
            let label = if name == "ERR" {
                "client errors".to_string()
            } else {
                format!("backend {}", &name[1..])
            };
            (name, label, color)
        })
        .collect();
    draw_picture(
        &Picture {
            caption: "Requests answered per backend per 100 ms (8 clients): backend 2 goes silent, then returns",
            y_desc: "requests / 100 ms",
            buckets: &f.buckets,
            series,
            markers: vec![
                (f.died, "b2 link down"),
                (f.removed, "out of the maps"),
                (f.revived, "b2 link up"),
                (f.back, "back in the maps"),
            ],
        },
        path,
    )
}

/// Draws `p` to `path` (PNG, 1000 × 480).
pub fn draw_picture(p: &Picture<'_>, path: &Path) -> Result<()> {
    let font = ["/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"]
        .iter()
        .find_map(|p| std::fs::read(p).ok())
        .context("no DejaVuSans.ttf (Debian: fonts-dejavu-core; cargo xtask setup installs it)")?;
    plotters::style::register_font(
        "sans-serif",
        FontStyle::Normal,
        Box::leak(font.into_boxed_slice()),
    )
    .map_err(|_| anyhow::anyhow!("the font did not load"))?;
    let root = BitMapBackend::new(path, (1000, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let seconds = p.buckets.len() as f64 / 10.0;
    let max = p
        .buckets
        .iter()
        .flat_map(|b| b.values())
        .copied()
        .max()
        .unwrap_or(1) as f64
        * 1.15;
    let mut chart = ChartBuilder::on(&root)
        .caption(p.caption, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..seconds, 0f64..max)?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc(p.y_desc)
        .label_style(("sans-serif", 14))
        .draw()?;
    for (name, label, color) in &p.series {
        let color = *color;
        let points: Vec<(f64, f64)> = p
            .buckets
            .iter()
            .enumerate()
            .map(|(i, b)| (i as f64 / 10.0, b.get(*name).copied().unwrap_or(0) as f64))
            .collect();
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))?
            .label(label.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    for (i, (t, text)) in p.markers.iter().enumerate() {
        chart.draw_series(std::iter::once(PathElement::new(
            vec![(*t, 0.0), (*t, max)],
            BLACK.mix(0.4),
        )))?;
        // Markers close together: their texts one under the other.
        chart.draw_series(std::iter::once(Text::new(
            text.to_string(),
            (*t + 0.05, max * (0.97 - 0.06 * (i % 2) as f64)),
            ("sans-serif", 13),
        )))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()?;
    root.present()?;
    Ok(())
}
