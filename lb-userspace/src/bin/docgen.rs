//! `lb-agent-docgen OUT_DIR`: writes what the package ships about the command line, generated
//! from it (`lb_userspace::cli::command`): `OUT_DIR/man/lb-agent.1` and one page per
//! subcommand (`lb-agent-run.1`, `lb-agent-targets-register.1`, …), and the completions
//! `OUT_DIR/completions/lb-agent.bash`, `_lb-agent` (zsh) and `lb-agent.fish`.
//! `cargo xtask package` runs it.

use std::{
    fs,
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::{Context, Result};
use clap_complete::Shell;

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let (Some(out), None) = (args.next(), args.next()) else {
        eprintln!("usage: lb-agent-docgen OUT_DIR");
        return ExitCode::from(2);
    };
    match generate(Path::new(&out)) {
        Ok(files) => {
            for f in files {
                println!("{}", f.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("lb-agent-docgen: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn generate(out: &Path) -> Result<Vec<PathBuf>> {
    let mut cmd = lb_userspace::cli::command();
    // Subcommands get their full names (`lb-agent-run`) and inherit the version.
    cmd.build();
    let mut written = Vec::new();
    let man = out.join("man");
    fs::create_dir_all(&man).with_context(|| format!("creating {}", man.display()))?;
    // The pages leave clap's `help` subcommands out (each page is the help).
    let mut pages = lb_userspace::cli::command().disable_help_subcommand(true);
    pages.build();
    written.extend(man_pages(&pages, &man)?);
    let completions = out.join("completions");
    fs::create_dir_all(&completions)
        .with_context(|| format!("creating {}", completions.display()))?;
    for (shell, file) in [
        (Shell::Bash, "lb-agent.bash"),
        (Shell::Zsh, "_lb-agent"),
        (Shell::Fish, "lb-agent.fish"),
    ] {
        let path = completions.join(file);
        let mut buf = Vec::new();
        clap_complete::generate(shell, &mut cmd.clone(), "lb-agent", &mut buf);
        fs::write(&path, buf).with_context(|| format!("writing {}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

/// The page of `cmd` and of each of its subcommands, recursively, in `dir`; each with the
/// package's version.
fn man_pages(cmd: &clap::Command, dir: &Path) -> Result<Vec<PathBuf>> {
    let name = cmd.get_display_name().unwrap_or(cmd.get_name());
    let path = dir.join(format!("{name}.1"));
    let mut buf = Vec::new();
    clap_mangen::Man::new(cmd.clone().version(env!("CARGO_PKG_VERSION")))
        .render(&mut buf)
        .with_context(|| format!("rendering {name}.1"))?;
    fs::write(&path, buf).with_context(|| format!("writing {}", path.display()))?;
    let mut written = vec![path];
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        written.extend(man_pages(sub, dir)?);
    }
    Ok(written)
}
