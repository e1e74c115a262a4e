use std::sync::{
    atomic::{AtomicUsize, Ordering},
    Arc, Mutex,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

use super::*;

fn fail(reason: Reason) -> Outcome {
    Outcome::Fail(reason, String::new())
}

#[test]
fn transitions_need_consecutive_results() {
    let mut t = Tracker::new(3, 2, TargetState::Initial);
    assert_eq!(t.reason(), Some(Reason::InitialHealthChecking));
    assert_eq!(t.record(&Outcome::Pass), None);
    assert_eq!(t.record(&Outcome::Pass), None);
    // A failure in between restarts the count of passes.
    assert_eq!(t.record(&fail(Reason::Timeout)), None);
    assert_eq!(t.record(&Outcome::Pass), None);
    assert_eq!(t.record(&Outcome::Pass), None);
    let up = t.record(&Outcome::Pass).expect("third consecutive pass");
    assert_eq!(
        (up.from, up.to, up.reason),
        (TargetState::Initial, TargetState::Healthy, None)
    );
    // Failures alternate with passes: never two in a row, never unhealthy.
    for _ in 0..5 {
        assert_eq!(t.record(&fail(Reason::Timeout)), None);
        assert_eq!(t.record(&Outcome::Pass), None);
    }
    assert_eq!(t.record(&fail(Reason::ConnectionRefused)), None);
    let down = t
        .record(&fail(Reason::ResponseCodeMismatch))
        .expect("second failure");
    assert_eq!(
        (down.from, down.to, down.reason),
        (
            TargetState::Healthy,
            TargetState::Unhealthy,
            Some(Reason::ResponseCodeMismatch)
        )
    );
    // Further failures keep the state and update the reason, without a transition.
    assert_eq!(t.record(&fail(Reason::Timeout)), None);
    assert_eq!(
        (t.state(), t.reason()),
        (TargetState::Unhealthy, Some(Reason::Timeout))
    );
    assert_eq!(t.record(&Outcome::Pass), None);
    assert_eq!(t.record(&Outcome::Pass), None);
    assert_eq!(
        t.record(&Outcome::Pass).map(|t| t.to),
        Some(TargetState::Healthy)
    );
}

#[test]
fn initial_target_that_fails_becomes_unhealthy() {
    let mut t = Tracker::new(5, 2, TargetState::Initial);
    assert_eq!(t.record(&fail(Reason::ConnectionRefused)), None);
    let tr = t.record(&fail(Reason::ConnectionRefused)).unwrap();
    assert_eq!(
        (tr.from, tr.to),
        (TargetState::Initial, TargetState::Unhealthy)
    );
    assert_eq!(tr.reason, Some(Reason::ConnectionRefused));
}

/// A probe that answers from a script and counts its calls.
struct Scripted {
    script: Arc<Mutex<Vec<Outcome>>>,
    calls: Arc<AtomicUsize>,
    takes: Duration,
}

impl Probe for Scripted {
    async fn probe(&self) -> Outcome {
        tokio::time::sleep(self.takes).await;
        self.calls.fetch_add(1, Ordering::SeqCst);
        let mut s = self.script.lock().unwrap();
        if s.len() > 1 {
            s.remove(0)
        } else {
            s[0].clone()
        }
    }
    fn describe(&self) -> String {
        "scripted".into()
    }
}

/// With the clock paused, tokio advances time only when every task waits: the checker's
/// schedule is measured in virtual time, with no real sleeping.
#[tokio::test(start_paused = true)]
async fn checker_schedule_and_failure_detection_time() {
    let script = Arc::new(Mutex::new(vec![
        Outcome::Pass,
        Outcome::Pass,
        fail(Reason::Timeout),
    ]));
    let calls = Arc::new(AtomicUsize::new(0));
    let probe = Scripted {
        script: script.clone(),
        calls: calls.clone(),
        takes: Duration::from_millis(500), // as a timeout of 500ms does
    };
    let schedule = Schedule {
        interval: Duration::from_secs(1),
        healthy_threshold: 2,
        unhealthy_threshold: 2,
    };
    let (tx, mut rx) = mpsc::channel(16);
    let cancel = CancellationToken::new();
    let start = Instant::now();
    tokio::spawn(run_checker(
        7u32,
        1,
        probe,
        schedule,
        TargetState::Initial,
        tx,
        cancel.clone(),
    ));

    let first = rx.recv().await.unwrap();
    assert_eq!(
        (first.target, first.outcome.clone(), first.transition),
        (7, Outcome::Pass, None)
    );
    // First probe within a tenth of the interval (plus its own 500 ms).
    assert!(
        first.at - start <= Duration::from_millis(600),
        "{:?}",
        first.at - start
    );
    let second = rx.recv().await.unwrap();
    assert_eq!(second.transition.map(|t| t.to), Some(TargetState::Healthy));
    let gap = second.at - first.at;
    assert!(
        gap >= Duration::from_millis(950) && gap <= Duration::from_millis(1050),
        "{gap:?}"
    );
    assert_eq!(second.latency, Duration::from_millis(500));

    // The target dies just after the second check: the next two fail.
    let died = second.at;
    let third = rx.recv().await.unwrap();
    assert_eq!(third.transition, None);
    let fourth = rx.recv().await.unwrap();
    let tr = fourth
        .transition
        .expect("second failure completes the threshold");
    assert_eq!(
        (tr.to, tr.reason),
        (TargetState::Unhealthy, Some(Reason::Timeout))
    );
    // Death to detection: two intervals (±5% each), the last probe's timeout included.
    let detection = fourth.at - died;
    assert!(
        detection >= Duration::from_millis(1900) && detection <= Duration::from_millis(2100),
        "{detection:?}"
    );
    cancel.cancel();
    assert!(
        rx.recv().await.is_none(),
        "the checker stops on cancellation"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 4);
}

/// A checker restarted (its spec changed) while its report is blocked on a full channel: the
/// report still arrives after the restart, tagged with the old generation, and the registry
/// does not count it; the new checker's reports do count.
#[tokio::test(start_paused = true)]
async fn a_restarted_checkers_in_flight_report_carries_its_old_generation() {
    let schedule = Schedule {
        interval: Duration::from_secs(1),
        healthy_threshold: 2,
        unhealthy_threshold: 2,
    };
    let scripted = |outcome: Outcome, calls: &Arc<AtomicUsize>| Scripted {
        script: Arc::new(Mutex::new(vec![outcome])),
        calls: calls.clone(),
        takes: Duration::from_millis(10),
    };
    // Room for one report: the old checker's second report waits in `send`.
    let (tx, mut rx) = mpsc::channel(1);
    let mut checkers = Checkers::default();
    let old_calls = Arc::new(AtomicUsize::new(0));
    let old = checkers.start(7u32, ("tcp old".into(), schedule));
    tokio::spawn(run_checker(
        7u32,
        old.generation,
        scripted(Outcome::Pass, &old_calls),
        schedule,
        TargetState::Initial,
        tx.clone(),
        old.cancel.clone(),
    ));
    // Two probes done: the first report fills the channel, the second waits to be sent.
    while old_calls.load(Ordering::SeqCst) < 2 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::task::yield_now().await;

    let new_calls = Arc::new(AtomicUsize::new(0));
    let new = checkers.start(7u32, ("tcp new".into(), schedule));
    assert!(
        old.cancel.is_cancelled(),
        "the restart stops the old checker"
    );
    assert_ne!(new.generation, old.generation);
    tokio::spawn(run_checker(
        7u32,
        new.generation,
        scripted(fail(Reason::Timeout), &new_calls),
        schedule,
        TargetState::Healthy,
        tx,
        new.cancel.clone(),
    ));

    let queued = rx.recv().await.unwrap();
    let in_flight = rx.recv().await.unwrap();
    for e in [&queued, &in_flight] {
        assert_eq!(
            (e.generation, &e.outcome),
            (old.generation, &Outcome::Pass),
            "{e:?}"
        );
        assert!(!checkers.is_current(e), "an old report counted: {e:?}");
    }
    // The second pass completed the old checker's transition to healthy: exactly what must not
    // be applied after the restart.
    assert_eq!(
        in_flight.transition.map(|t| t.to),
        Some(TargetState::Healthy)
    );
    let mut last = None;
    for _ in 0..3 {
        let e = rx.recv().await.unwrap();
        assert_eq!(e.generation, new.generation, "{e:?}");
        assert!(checkers.is_current(&e));
        last = Some(e);
    }
    assert_eq!(
        old_calls.load(Ordering::SeqCst),
        2,
        "the old checker probed on"
    );
    // A stopped checker's reports do not count either.
    checkers.stop_all();
    assert!(new.cancel.is_cancelled());
    assert!(!checkers.is_current(&last.unwrap()));
    assert!(rx.recv().await.is_none(), "both checkers stopped");
}

/// A loopback server that answers every connection with `behaviour`.
async fn server(behaviour: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut req = [0u8; 1024];
                let n = s.read(&mut req).await.unwrap_or(0);
                let req = String::from_utf8_lossy(&req[..n]).to_string();
                let well_formed = req.starts_with("GET /health HTTP/1.1\r\n")
                    && req.contains(&format!("\r\nHost: {addr}\r\n"))
                    && req.contains("\r\nConnection: close\r\n")
                    && req.ends_with("\r\n\r\n");
                if n == 0 {
                    return; // a TCP check: connect and close
                }
                if !well_formed {
                    let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
                    return;
                }
                match behaviour {
                    "200" => {
                        let _ = s
                            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                            .await;
                    }
                    "500" => {
                        let _ = s
                            .write_all(b"HTTP/1.1 500 Internal Server Error\r\n\r\n")
                            .await;
                    }
                    "silent" => {
                        let _ = s.read(&mut [0u8; 1]).await; // holds the connection open
                    }
                    "reset" => {
                        let _ = s.write_all(b"HTTP/1.1 20").await;
                        let _ = s.set_zero_linger();
                        drop(s); // RST
                    }
                    "endless-head" => {
                        let _ = s.write_all(b"HTTP/1.1 200 OK\r\n").await;
                        loop {
                            if s.write_all(b"X-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n")
                                .await
                                .is_err()
                            {
                                break;
                            }
                        }
                    }
                    _ => unreachable!(),
                }
            });
        }
    });
    addr
}

fn http(addr: SocketAddr) -> HttpProbe {
    HttpProbe {
        addr,
        timeout: Duration::from_millis(300),
        path: "/health".into(),
        matcher: Matcher::default(),
    }
}

use crate::config::Matcher;

/// Runs a checker (interval 400ms, thresholds 2) against a real probe until its first
/// transition; the state and reason it reaches.
async fn settle<P: Probe>(probe: P) -> (TargetState, Option<Reason>, String) {
    let schedule = Schedule {
        interval: Duration::from_millis(400),
        healthy_threshold: 2,
        unhealthy_threshold: 2,
    };
    let (tx, mut rx) = mpsc::channel(16);
    let cancel = CancellationToken::new();
    tokio::spawn(run_checker(
        (),
        1,
        probe,
        schedule,
        TargetState::Initial,
        tx,
        cancel.clone(),
    ));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let e = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .expect("a transition within 10 s")
            .unwrap();
        if let Some(t) = e.transition {
            cancel.cancel();
            let detail = match e.outcome {
                Outcome::Pass => String::new(),
                Outcome::Fail(_, d) => d,
            };
            return (t.to, t.reason, detail);
        }
    }
}

#[tokio::test]
async fn http_200_is_healthy() {
    let (state, reason, _) = settle(http(server("200").await)).await;
    assert_eq!((state, reason), (TargetState::Healthy, None));
}

#[tokio::test]
async fn http_500_is_a_response_code_mismatch() {
    let (state, reason, detail) = settle(http(server("500").await)).await;
    assert_eq!(
        (state, reason),
        (TargetState::Unhealthy, Some(Reason::ResponseCodeMismatch))
    );
    assert!(detail.contains("status 500"), "{detail}");
    // The same server passes when the matcher accepts 500.
    let mut p = http(server("500").await);
    p.matcher = "200,500".parse().unwrap();
    assert_eq!(settle(p).await.0, TargetState::Healthy);
}

#[tokio::test]
async fn accepting_and_never_answering_is_a_timeout() {
    let (state, reason, _) = settle(http(server("silent").await)).await;
    assert_eq!(
        (state, reason),
        (TargetState::Unhealthy, Some(Reason::Timeout))
    );
}

#[tokio::test]
async fn refused_connections() {
    // A port nobody listens on: bind one, learn it, close it.
    let addr = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let (state, reason, _) = settle(http(addr)).await;
    assert_eq!(
        (state, reason),
        (TargetState::Unhealthy, Some(Reason::ConnectionRefused))
    );
    let tcp = TcpProbe {
        addr,
        timeout: Duration::from_millis(300),
    };
    assert_eq!(settle(tcp).await.1, Some(Reason::ConnectionRefused));
}

#[tokio::test]
async fn reset_mid_response_fails() {
    let (state, reason, detail) = settle(http(server("reset").await)).await;
    assert_eq!(
        (state, reason),
        (TargetState::Unhealthy, Some(Reason::FailedHealthChecks))
    );
    assert!(detail.contains("response"), "{detail}");
}

#[tokio::test]
async fn response_head_is_bounded() {
    let (state, reason, detail) = settle(http(server("endless-head").await)).await;
    assert_eq!(
        (state, reason),
        (TargetState::Unhealthy, Some(Reason::FailedHealthChecks))
    );
    assert!(detail.contains("longer than 8192"), "{detail}");
}

#[tokio::test]
async fn tcp_connect_is_healthy() {
    let addr = server("silent").await;
    let (state, _, _) = settle(TcpProbe {
        addr,
        timeout: Duration::from_millis(300),
    })
    .await;
    assert_eq!(state, TargetState::Healthy);
}
