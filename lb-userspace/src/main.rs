//! `lb-agent`: the balancer's agent. The data plane and its map writer are in place (the
//! library); config, health checks and the control API come with the agent's own issue.

use std::process::ExitCode;

fn main() -> ExitCode {
    let cmd = std::env::args().nth(1).unwrap_or_default();
    match cmd.as_str() {
        "run" | "validate" | "status" | "targets" | "reload" => {
            eprintln!("lb-agent {cmd}: not implemented yet; this build ships the data plane only");
            ExitCode::from(1)
        }
        _ => {
            eprintln!("usage: lb-agent <run|validate|status|targets|reload> [options]");
            ExitCode::from(2)
        }
    }
}
