//! `lb-agent`: the load balancer's agent (`run`, `validate`) and the clients of its control API
//! (`status`, `targets`, `reload`). Exit codes: 0 ok, 1 runtime failure, 2 bad input.

use std::process::ExitCode;

use anyhow::Result;
use clap::Parser;
use lb_userspace::{
    agent,
    api::{PlanRequest, TargetRequest},
    cli::{Cli, Command, TargetAction},
    client, config,
};

fn init_logs() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("lb-agent: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(dispatch(cli));
    match result {
        Ok(code) => code,
        Err(e) => {
            if let Some(problems) = e.downcast_ref::<config::ConfigErrors>() {
                eprintln!("{problems}");
                return ExitCode::from(2);
            }
            if let Some(client::BadRequest(msg)) = e.downcast_ref::<client::BadRequest>() {
                eprintln!("lb-agent: {msg}");
                return ExitCode::from(2);
            }
            eprintln!("lb-agent: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn dispatch(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Run {
            config,
            keep_datapath,
        } => {
            init_logs();
            agent::run(agent::RunOptions {
                config_path: config,
                keep_datapath,
            })
            .await?;
        }
        Command::Validate { config } => {
            let c = config::load(&config)?;
            println!("{}: ok: {}", config.display(), c.summary());
        }
        Command::Status { json } => {
            let status = client::Api::new(&cli.api)?.status().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", client::status_table(&status));
            }
        }
        Command::Targets { action } => {
            let api = client::Api::new(&cli.api)?;
            let reply = match action {
                TargetAction::Register {
                    group,
                    target,
                    weight,
                    zone,
                } => {
                    api.register(&TargetRequest {
                        group,
                        target,
                        weight,
                        zone,
                    })
                    .await?
                }
                TargetAction::Deregister { group, target } => {
                    api.deregister(&TargetRequest {
                        group,
                        target,
                        weight: config::DEFAULT_WEIGHT,
                        zone: None,
                    })
                    .await?
                }
            };
            println!(
                "{}: ok (maps written in {:.2} ms)",
                reply.target, reply.maps_written_ms
            );
        }
        Command::Reload {
            dry_run: true,
            json,
        } => {
            let plan = client::Api::new(&cli.api)?
                .plan(&PlanRequest::default())
                .await?;
            print_plan(&plan, json)?;
        }
        Command::Plan { config, json } => {
            let text = std::fs::read_to_string(&config)
                .map_err(|e| client::BadRequest(format!("reading {}: {e}", config.display())))?;
            let plan = client::Api::new(&cli.api)?
                .plan(&PlanRequest {
                    config: Some(text),
                    path: Some(config.display().to_string()),
                })
                .await?;
            print_plan(&plan, json)?;
        }
        Command::Drain {
            timeout,
            no_wait,
            cancel,
            json,
        } => return drain(&cli.api, timeout, no_wait, cancel, json).await,
        Command::Reload { dry_run: false, .. } => {
            let reply = client::Api::new(&cli.api)?.reload().await?;
            println!("reloaded: {}", reply.summary);
            for note in &reply.notes {
                println!("note: {note}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `lb-agent drain`: withdraw, then (unless --no-wait) a line a second until the router sends
/// nothing here; exit 1 when the timeout comes first.
async fn drain(
    api: &str,
    timeout: Option<std::time::Duration>,
    no_wait: bool,
    cancel: bool,
    json: bool,
) -> anyhow::Result<ExitCode> {
    use lb_userspace::api::DrainRequest;
    let api = client::Api::new(api)?;
    let mut d = api.drain(&DrainRequest { cancel }).await?;
    if cancel || no_wait {
        if json {
            println!("{}", serde_json::to_string_pretty(&d)?);
        } else if cancel {
            println!(
                "drain cancelled: the VIPs are announced again while this node can serve them"
            );
        } else {
            println!("draining: the VIPs are being withdrawn (`lb-agent drain` again follows it)");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let limit = timeout.unwrap_or(std::time::Duration::from_secs_f64(d.timeout_s));
    let started = std::time::Instant::now();
    let mut printed = -1.0;
    loop {
        if !json && (d.done || d.elapsed_s - printed >= 1.0) {
            println!("{}", client::drain_line(&d));
            printed = d.elapsed_s;
        }
        if d.done || started.elapsed() >= limit {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        d = api.drain_status().await?;
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&d)?);
    }
    if d.done {
        if !json {
            println!(
                "drained after {:.1} s: no client packet for {:.1} s; the node can stop ({} reply packets/s still pass: targets route replies through it until it goes)",
                d.elapsed_s, d.quiet_for_s, d.reply_packets_per_s
            );
        }
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!(
            "lb-agent: not drained after {limit:?}: client packets still arrive (the VIPs stay withdrawn; `lb-agent drain` follows it again, --cancel announces again)"
        );
        Ok(ExitCode::from(1))
    }
}

fn print_plan(plan: &lb_userspace::api::Plan, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(plan)?);
    } else {
        print!("{}", lb_userspace::plan::table(plan));
    }
    Ok(())
}
