//! The command line of `lb-agent`, defined once: the binary parses it, and the man pages and
//! shell completions of the package are generated from it ([`command`]).

use std::{net::SocketAddr, path::PathBuf};

use clap::{CommandFactory, Parser, Subcommand};

use crate::config;

#[derive(Parser)]
#[command(
    name = "lb-agent",
    version,
    about = "XDP L4 load balancer agent",
    long_about = "XDP L4 load balancer agent: `run` loads and attaches the XDP data plane and keeps its maps in step with the config, the health checks and the control API; the other commands are clients of a running agent's control API, or check a config file.",
    after_help = "Exit codes: 0 ok, 1 runtime failure, 2 bad input (config, arguments, a request the agent refused)."
)]
pub struct Cli {
    /// Control API of the running agent (client commands).
    #[arg(long, global = true, default_value = config::DEFAULT_API)]
    pub api: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Validate the config, load and attach XDP, run health checks, the control API and
    /// metrics until SIGINT/SIGTERM.
    Run {
        /// The config file (TOML).
        #[arg(long)]
        config: PathBuf,
        /// On exit leave programs, links and maps pinned (traffic keeps flowing); the next
        /// `run` adopts them.
        #[arg(long)]
        keep_datapath: bool,
    },
    /// Check a config file without touching the kernel.
    Validate {
        /// The config file (TOML).
        #[arg(long)]
        config: PathBuf,
    },
    /// Listeners, target groups and every target's state.
    Status {
        /// The status as the control API's JSON.
        #[arg(long)]
        json: bool,
    },
    /// Register or deregister targets at run time.
    Targets {
        #[command(subcommand)]
        action: TargetAction,
    },
    /// Re-read the config file and apply the difference (as SIGHUP does).
    Reload {
        /// Show what the reload would change (as `plan` does), and change nothing.
        #[arg(long)]
        dry_run: bool,
        /// With --dry-run: the plan as the control API's JSON.
        #[arg(long, requires = "dry_run")]
        json: bool,
    },
    /// Ask the running agent what a config would change, changing nothing: per group the
    /// share of table slots that move, the targets that start or stop receiving new flows,
    /// and the live flows whose target would be removed, terminated or drained.
    Plan {
        /// The config to preview (TOML); its text is sent to the agent.
        #[arg(long)]
        config: PathBuf,
        /// The plan as the control API's JSON.
        #[arg(long)]
        json: bool,
    },
    /// Scale-out: stop announcing this node's VIPs (BIRD withdraws them), keep forwarding
    /// what still arrives, and report progress until the router sends nothing here (or the
    /// timeout); then the node can stop.
    Drain {
        /// How long to wait for the client traffic to stop (default: announce.drain_timeout).
        #[arg(long, value_parser = humantime::parse_duration)]
        timeout: Option<std::time::Duration>,
        /// Withdraw and return at once, without waiting.
        #[arg(long)]
        no_wait: bool,
        /// End a drain: announce the VIPs again (while this node can serve them).
        #[arg(long, conflicts_with_all = ["timeout", "no_wait"])]
        cancel: bool,
        /// The drain's state as the control API's JSON (the last one, when waiting).
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum TargetAction {
    /// Add a target to a group (no restart, no dropped flows).
    Register {
        /// The target group.
        #[arg(long)]
        group: String,
        /// ADDR:PORT ([v6]:port for IPv6)
        target: SocketAddr,
        /// Its share of new flows, relative to the group's other targets.
        #[arg(long, default_value_t = config::DEFAULT_WEIGHT)]
        weight: u32,
        /// Recorded and shown in status.
        #[arg(long)]
        zone: Option<String>,
    },
    /// Start draining a target; it is removed after the group's deregistration delay.
    Deregister {
        /// The target group.
        #[arg(long)]
        group: String,
        /// ADDR:PORT ([v6]:port for IPv6)
        target: SocketAddr,
    },
}

/// The whole command line as clap sees it: what the man pages and completions are made from.
pub fn command() -> clap::Command {
    Cli::command()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        command().debug_assert();
    }

    #[test]
    fn run_takes_its_config_and_keep_datapath() {
        let cli = Cli::try_parse_from([
            "lb-agent",
            "run",
            "--config",
            "/etc/lb-agent/lb-agent.toml",
            "--keep-datapath",
        ])
        .expect("parses");
        assert_eq!(cli.api, config::DEFAULT_API);
        assert!(matches!(
            cli.command,
            Command::Run { ref config, keep_datapath: true } if config.to_str() == Some("/etc/lb-agent/lb-agent.toml")
        ));
    }
}
