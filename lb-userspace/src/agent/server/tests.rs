//! The routers with a fake agent loop (tower's `oneshot`), and `serve` on a real unix socket.

use std::time::{Duration, Instant};

use axum::{
    body::Body,
    http::{Method, Request},
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower::ServiceExt;

use super::*;
use crate::{
    api::{DatapathStatus, MapsStatus},
    client::{Api, BadRequest},
    route_epoch::RouteCacheStatus,
};

fn status() -> Status {
    Status {
        zone: None,
        announce: None,
        listeners: vec![],
        target_groups: vec![],
        datapath: DatapathStatus {
            pin_path: "/sys/fs/bpf/lb".into(),
            interfaces: vec![],
            maps: MapsStatus {
                in_sync: true,
                entries_in_doubt: 0,
                tables_building: false,
                failed_reconciliations: 0,
                last_error: None,
            },
            route_cache: RouteCacheStatus::default(),
            drops: vec![],
            access_log: None,
        },
    }
}

/// A status of `n` targets (a big answer).
fn big_status(n: usize) -> Status {
    let mut s = status();
    s.target_groups.push(crate::api::GroupStatus {
        name: "web".into(),
        fail_open: false,
        cross_zone: false,
        zone_scope: crate::state::ZoneScope::All,
        health_check: Default::default(),
        targets: (0..n)
            .map(|i| crate::api::TargetStatus {
                target: std::net::SocketAddr::new([10, 0, (i >> 8) as u8, i as u8].into(), 8080),
                weight: 100,
                zone: Some("a zone with a long name, to make the answer bigger".into()),
                origin: crate::model::Origin::Api,
                state: crate::health::TargetState::Healthy,
                reason: None,
                receives_new_flows: true,
                last_check: None,
                passive: None,
            })
            .collect(),
    });
    s
}

/// A fake agent loop: answers status with `status`, metrics with a line, registers with
/// `register`, deregisters and reloads as refused (409); what it was asked, in order.
fn fake_agent(
    status: Status,
    register: fn(&TargetRequest) -> Result<TargetReply, Failure>,
) -> (Commands, tokio::task::JoinHandle<Vec<String>>) {
    let (tx, mut rx) = mpsc::channel(8);
    let task = tokio::spawn(async move {
        let mut seen = Vec::new();
        while let Some(c) = rx.recv().await {
            match c {
                Command::Status(r) => {
                    seen.push("status".to_string());
                    let _ = r.send(status.clone());
                }
                Command::Metrics(r) => {
                    seen.push("metrics".into());
                    let _ = r.send("lb_up 1\n".into());
                }
                Command::Register(t, r) => {
                    seen.push(format!("register {} {}", t.group, t.target));
                    let _ = r.send(register(&t));
                }
                Command::Deregister(t, r) => {
                    seen.push(format!("deregister {} {}", t.group, t.target));
                    let _ = r.send(Err(Failure::new(StatusCode::CONFLICT, "no")));
                }
                Command::Reload(r) => {
                    seen.push("reload".into());
                    let _ = r.send(Err(Failure::bad_request("bad config")));
                }
                Command::Drain(d, r) => {
                    seen.push(format!("drain cancel={}", d.cancel));
                    let _ = r.send(Ok(crate::api::DrainStatus {
                        draining: !d.cancel,
                        ..Default::default()
                    }));
                }
                Command::DrainStatus(r) => {
                    seen.push("drain status".into());
                    let _ = r.send(crate::api::DrainStatus::default());
                }
                Command::Plan(p, r) => {
                    seen.push(format!("plan {:?}", p.path));
                    let _ = r.send(Err(Failure::bad_request("bad config")));
                }
            }
        }
        seen
    });
    (tx, task)
}

fn accept(t: &TargetRequest) -> Result<TargetReply, Failure> {
    Ok(TargetReply {
        ok: true,
        target: format!("{}/{}", t.group, t.target),
        maps_written_ms: 0.25,
    })
}

async fn call(app: &Router, method: &str, path: &str, body: &str) -> (StatusCode, String, Vec<u8>) {
    // As a client sends it: with its length.
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header(header::CONTENT_LENGTH, body.len())
        .body(Body::from(body.to_string()))
        .unwrap();
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let kind = response
        .headers()
        .get(header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let body = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    (status, kind, body.to_vec())
}

/// The error message of a JSON error answer (and that it is one).
fn error_of(kind: &str, body: &[u8]) -> String {
    assert_eq!(
        kind,
        "application/json",
        "{}",
        String::from_utf8_lossy(body)
    );
    serde_json::from_slice::<ApiError>(body)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(body)))
        .error
}

#[tokio::test]
async fn status_and_register_reach_the_loop_typed() {
    let (tx, seen) = fake_agent(status(), accept);
    let app = api_router(tx, LIMITS);
    let (code, kind, body) = call(&app, "GET", "/v1/status", "").await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(kind, "application/json");
    assert_eq!(serde_json::from_slice::<Status>(&body).unwrap(), status());
    // Weight and zone are optional; any content type is read as JSON (curl -d sends a form's).
    let (code, _, body) = call(
        &app,
        "POST",
        "/v1/targets/register",
        r#"{"group":"web","target":"[fd00::2]:8080"}"#,
    )
    .await;
    assert_eq!(code, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    let reply: TargetReply = serde_json::from_slice(&body).unwrap();
    assert_eq!(reply.target, "web/[fd00::2]:8080");
    let (code, kind, body) = call(&app, "GET", "/metrics", "").await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(kind, crate::metrics::CONTENT_TYPE);
    assert_eq!(body, b"lb_up 1\n");
    drop(app);
    assert_eq!(
        seen.await.unwrap(),
        ["status", "register web [fd00::2]:8080", "metrics"]
    );
}

#[tokio::test]
async fn a_bad_body_is_a_400_naming_the_field() {
    let (tx, seen) = fake_agent(status(), accept);
    let app = api_router(tx, LIMITS);
    for (body, says) in [
        (
            r#"{"group":"web","target":"10.0.2.14"}"#,
            "bad request body: target: invalid socket address syntax",
        ),
        (
            r#"{"group":"web","target":"10.0.2.14:80","wieght":5}"#,
            "unknown field `wieght`",
        ),
        (
            r#"{"group":"web","target":"10.0.2.14:80","weight":"heavy"}"#,
            "bad request body: weight: invalid type: string \"heavy\"",
        ),
        (r#"{"target":"10.0.2.14:80"}"#, "missing field `group`"),
        ("", "bad request body: EOF while parsing"),
        (
            r#"{"group":"web","target":"10.0.2.14:80"} {}"#,
            "bad request body: trailing characters",
        ),
    ] {
        let (code, kind, answer) = call(&app, "POST", "/v1/targets/register", body).await;
        assert_eq!(code, StatusCode::BAD_REQUEST, "{body}");
        let error = error_of(&kind, &answer);
        assert!(error.contains(says), "{body}: {error}");
    }
    drop(app);
    assert!(
        seen.await.unwrap().is_empty(),
        "a bad body reached the loop"
    );
}

#[tokio::test]
async fn drain_starts_on_an_empty_body_cancels_on_request_and_reports_on_get() {
    let (tx, seen) = fake_agent(status(), accept);
    let app = api_router(tx, LIMITS);
    for body in ["", "{}", r#"{"cancel":true}"#] {
        let (code, _, answer) = call(&app, "POST", "/v1/drain", body).await;
        assert_eq!(code, StatusCode::OK, "{body}");
        let d: crate::api::DrainStatus = serde_json::from_slice(&answer).unwrap();
        assert_eq!(d.draining, !body.contains("cancel"));
    }
    let (code, _, _) = call(&app, "GET", "/v1/drain", "").await;
    assert_eq!(code, StatusCode::OK);
    let (code, kind, answer) = call(&app, "POST", "/v1/drain", r#"{"cancle":true}"#).await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    assert!(error_of(&kind, &answer).contains("unknown field `cancle`"));
    drop(app);
    assert_eq!(
        seen.await.unwrap(),
        [
            "drain cancel=false",
            "drain cancel=false",
            "drain cancel=true",
            "drain status"
        ]
    );
}

#[tokio::test]
async fn the_loop_refusing_keeps_its_status() {
    let (tx, _seen) = fake_agent(status(), |_| {
        Err(Failure::new(
            StatusCode::CONFLICT,
            "web/10.0.2.14:80 refused: address: taken",
        ))
    });
    let app = api_router(tx, LIMITS);
    let body = r#"{"group":"web","target":"10.0.2.14:80"}"#;
    let (code, kind, answer) = call(&app, "POST", "/v1/targets/register", body).await;
    assert_eq!(code, StatusCode::CONFLICT);
    assert_eq!(
        error_of(&kind, &answer),
        "web/10.0.2.14:80 refused: address: taken"
    );
    let (code, kind, answer) = call(&app, "POST", "/v1/reload", "").await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    assert_eq!(error_of(&kind, &answer), "bad config");
}

#[tokio::test]
async fn a_body_over_the_limit_is_a_413() {
    let (tx, seen) = fake_agent(status(), accept);
    let app = api_router(tx, LIMITS);
    let zone = "z".repeat(LIMITS.body);
    let body = format!(r#"{{"group":"web","target":"10.0.2.14:80","zone":"{zone}"}}"#);
    let (code, kind, answer) = call(&app, "POST", "/v1/targets/register", &body).await;
    assert_eq!(code, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(!error_of(&kind, &answer).is_empty());
    // Also where no body is read.
    let (code, kind, answer) = call(&app, "POST", "/v1/reload", &body).await;
    assert_eq!(code, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(!error_of(&kind, &answer).is_empty());
    // A config to preview may be bigger (it reaches the agent, here refused as a bad config),
    // up to its own limit.
    let config = |n: usize| format!(r#"{{"config":"{}"}}"#, "#".repeat(n));
    let (code, kind, answer) = call(&app, "POST", "/v1/plan", &config(LIMITS.body)).await;
    assert_eq!(
        (code, error_of(&kind, &answer).as_str()),
        (StatusCode::BAD_REQUEST, "bad config")
    );
    let (code, _, _) = call(&app, "POST", "/v1/plan", &config(LIMITS.config_body)).await;
    assert_eq!(code, StatusCode::PAYLOAD_TOO_LARGE);
    // Just under the limit is read.
    let zone = "z".repeat(LIMITS.body - 100);
    let body = format!(r#"{{"group":"web","target":"10.0.2.14:80","zone":"{zone}"}}"#);
    let (code, _, answer) = call(&app, "POST", "/v1/targets/register", &body).await;
    assert_eq!(code, StatusCode::OK, "{}", String::from_utf8_lossy(&answer));
    drop(app);
    assert_eq!(
        seen.await.unwrap(),
        ["plan None", "register web 10.0.2.14:80"]
    );
}

#[tokio::test]
async fn unknown_paths_and_wrong_methods_answer_json() {
    let (tx, _seen) = fake_agent(status(), accept);
    let app = api_router(tx, LIMITS);
    let (code, kind, answer) = call(&app, "GET", "/v1/nope", "").await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    assert_eq!(error_of(&kind, &answer), "no such endpoint /v1/nope");
    for (method, path) in [
        ("POST", "/v1/status"),
        ("GET", "/v1/reload"),
        ("GET", "/v1/targets/register"),
        ("DELETE", "/v1/targets/deregister"),
    ] {
        let (code, kind, answer) = call(&app, method, path, "").await;
        assert_eq!(code, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
        assert_eq!(error_of(&kind, &answer), "method not allowed");
    }
}

#[tokio::test]
async fn the_metrics_listener_only_reads() {
    let (tx, seen) = fake_agent(status(), accept);
    let app = metrics_router(tx, LIMITS);
    assert_eq!(call(&app, "GET", "/metrics", "").await.0, StatusCode::OK);
    assert_eq!(call(&app, "GET", "/v1/status", "").await.0, StatusCode::OK);
    let body = r#"{"group":"web","target":"10.0.2.14:80"}"#;
    for path in [
        "/v1/targets/register",
        "/v1/targets/deregister",
        "/v1/reload",
        "/v1/drain",
    ] {
        let (code, kind, answer) = call(&app, "POST", path, body).await;
        assert_eq!(code, StatusCode::NOT_FOUND, "{path}");
        error_of(&kind, &answer);
    }
    drop(app);
    assert_eq!(seen.await.unwrap(), ["metrics", "status"]);
}

#[tokio::test]
async fn a_gone_or_slow_loop_is_a_5xx() {
    let (tx, rx) = mpsc::channel(1);
    drop(rx);
    let app = api_router(tx, LIMITS);
    let (code, kind, answer) = call(&app, "GET", "/v1/status", "").await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(error_of(&kind, &answer), "the agent is shutting down");

    // A loop that takes the command and never answers: the call's deadline.
    let (tx, mut rx) = mpsc::channel(1);
    let keep = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Some(c) = rx.recv().await {
            held.push(c);
        }
    });
    let limits = Limits {
        request: Duration::from_millis(100),
        ..LIMITS
    };
    let app = api_router(tx, limits);
    let (code, kind, answer) =
        tokio::time::timeout(Duration::from_secs(5), call(&app, "GET", "/v1/status", ""))
            .await
            .expect("no deadline on the call");
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(error_of(&kind, &answer), "the call took too long");
    keep.abort();
}

/// `serve` on a unix socket in a fresh directory, with `limits`; the client's view of it.
fn serve_unix(app: Router, limits: Limits) -> (tempfile::TempDir, std::path::PathBuf, Api) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("api.sock");
    let listener = UnixListener::bind(&path).unwrap();
    tokio::spawn(serve(listener, app, limits, "test API"));
    let api = Api::new(&format!("unix:{}", path.display())).unwrap();
    (dir, path, api)
}

/// Reads until the peer closes (Ok) or `limit` passes (Err).
async fn closed_within(s: &mut tokio::net::UnixStream, limit: Duration) -> Result<(), String> {
    let mut buf = vec![0u8; 64 * 1024];
    tokio::time::timeout(limit, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .map_err(|_| format!("still open after {limit:?}"))
}

#[tokio::test]
async fn the_client_reads_typed_answers_and_4xx_as_bad_requests() {
    let (tx, _seen) = fake_agent(status(), accept);
    let (_dir, _, api) = serve_unix(api_router(tx, LIMITS), LIMITS);
    assert_eq!(api.status().await.unwrap(), status());
    let request = TargetRequest {
        group: "web".into(),
        target: "10.0.2.14:80".parse().unwrap(),
        weight: 100,
        zone: None,
    };
    assert_eq!(
        api.register(&request).await.unwrap().target,
        "web/10.0.2.14:80"
    );
    let e = api.deregister(&request).await.unwrap_err();
    assert_eq!(
        e.downcast_ref::<BadRequest>().map(|b| b.0.as_str()),
        Some("no")
    );
    let e = api.reload().await.unwrap_err();
    assert_eq!(
        e.downcast_ref::<BadRequest>().map(|b| b.0.as_str()),
        Some("bad config")
    );
    let (code, body) = api.raw(Method::GET, "/nope", vec![]).await.unwrap();
    assert_eq!(code, StatusCode::NOT_FOUND);
    assert_eq!(
        error_of("application/json", &body),
        "no such endpoint /nope"
    );
}

#[tokio::test]
async fn a_silent_connection_is_dropped_after_the_header_timeout() {
    let (tx, _seen) = fake_agent(status(), accept);
    let limits = Limits {
        header_read: Duration::from_millis(300),
        ..LIMITS
    };
    let (_dir, path, api) = serve_unix(api_router(tx, limits), limits);
    let mut silent = tokio::net::UnixStream::connect(&path).await.unwrap();
    // Half a request head: as silent as none.
    silent
        .write_all(b"GET /v1/status HTTP/1.1\r\n")
        .await
        .unwrap();
    // Others are answered meanwhile.
    let started = Instant::now();
    assert_eq!(api.status().await.unwrap(), status());
    assert!(
        started.elapsed() < limits.header_read,
        "{:?}",
        started.elapsed()
    );
    closed_within(&mut silent, Duration::from_secs(3))
        .await
        .unwrap();
    assert!(started.elapsed() >= limits.header_read - Duration::from_millis(50));
}

#[tokio::test]
async fn more_connections_than_the_limit_do_not_wedge_the_api() {
    let (tx, _seen) = fake_agent(status(), accept);
    let limits = Limits {
        connections: 2,
        header_read: Duration::from_millis(200),
        ..LIMITS
    };
    let (_dir, path, api) = serve_unix(api_router(tx, limits), limits);
    let mut silent = Vec::new();
    for _ in 0..6 {
        silent.push(tokio::net::UnixStream::connect(&path).await.unwrap());
    }
    // Queued behind them, answered once the slots they hold time out.
    let started = Instant::now();
    let answered = tokio::time::timeout(Duration::from_secs(5), api.status()).await;
    assert_eq!(answered.expect("the API is wedged").unwrap(), status());
    // At most two served at a time: the six silent ones took three rounds of the timeout.
    assert!(
        started.elapsed() >= limits.header_read * 3 - Duration::from_millis(50),
        "answered after {:?}: more than {} connections served at once",
        started.elapsed(),
        limits.connections
    );
    for s in &mut silent {
        closed_within(s, Duration::from_secs(3)).await.unwrap();
    }
}

#[tokio::test]
async fn a_peer_that_does_not_read_loses_its_connection_after_the_write_deadline() {
    let big = big_status(20_000);
    assert!(serde_json::to_vec(&big).unwrap().len() > 2 * 1024 * 1024);
    let (tx, _seen) = fake_agent(big.clone(), accept);
    let limits = Limits {
        connections: 1,
        write: Duration::from_millis(300),
        ..LIMITS
    };
    let (_dir, path, api) = serve_unix(api_router(tx, limits), limits);
    let mut stalled = tokio::net::UnixStream::connect(&path).await.unwrap();
    stalled
        .write_all(b"GET /v1/status HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    // It holds the only connection slot until its write stalls for the deadline.
    let answered = tokio::time::timeout(Duration::from_secs(10), api.status()).await;
    assert_eq!(answered.expect("the API is wedged").unwrap(), big);
    drop(stalled);
}

/// The status page and its files on the metrics listener: each with its type, no caching of
/// stale copies, and a policy that allows only the page's own files; not on the control API.
#[tokio::test]
async fn the_metrics_listener_serves_the_status_page() {
    let (tx, _seen) = fake_agent(status(), accept);
    let app = metrics_router(tx, LIMITS);
    for (path, kind) in [
        ("/", "text/html; charset=utf-8"),
        ("/app.js", "text/javascript; charset=utf-8"),
        ("/style.css", "text/css; charset=utf-8"),
    ] {
        let request = Request::builder().uri(path).body(Body::empty()).unwrap();
        let response = app.clone().oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        let h = response.headers();
        assert_eq!(h[header::CONTENT_TYPE], kind, "{path}");
        assert_eq!(h[header::CACHE_CONTROL], "no-cache", "{path}");
        assert!(
            h[header::CONTENT_SECURITY_POLICY]
                .to_str()
                .unwrap()
                .starts_with("default-src 'self'"),
            "{path}"
        );
        assert_eq!(h[header::X_CONTENT_TYPE_OPTIONS], "nosniff", "{path}");
        let body = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        assert_eq!(&body[..], crate::web::asset(path).unwrap().body, "{path}");
    }
    let (code, kind, answer) = call(&app, "GET", "/missing.js", "").await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    error_of(&kind, &answer);

    let (tx, _seen) = fake_agent(status(), accept);
    let api = api_router(tx, LIMITS);
    assert_eq!(call(&api, "GET", "/", "").await.0, StatusCode::NOT_FOUND);
}
