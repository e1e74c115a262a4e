//! The Debian package: what it holds (`dpkg-deb -c`, its fields and maintainer scripts), that
//! its unit passes `systemd-analyze verify` once installed, and that the unit's `ExecStart`,
//! run as written (its `ExecStartPre`, as the unit's user with only the unit's capabilities,
//! the unit's limits and directories, in a network namespace), brings the agent up serving
//! and tells systemd so through `NOTIFY_SOCKET`: ready once attached, the watchdog, reloads,
//! stopping; and that a restart adopts the data plane the stop left.
//!
//! The package is `LB_DEB` (`cargo xtask test` builds one of the debug build, `cargo xtask
//! package --dev`), else the newest `lb-agent_VERSION-*.deb` in target/debian-dev or
//! target/debian.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::ErrorKind,
    os::unix::{fs::PermissionsExt, net::UnixDatagram},
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use anyhow::{bail, ensure, Context, Result};
use lb_tests::{
    harness::{config, poll},
    topology::{Topology, VIP},
};
use lb_userspace::{api::Status, health::TargetState};

const VERSION: &str = env!("CARGO_PKG_VERSION");
const UNIT: &str = "/usr/lib/systemd/system/lb-agent.service";
const CONFIG: &str = "/etc/lb-agent/lb-agent.toml";

fn deb() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("LB_DEB") {
        let p = PathBuf::from(p);
        ensure!(p.exists(), "LB_DEB={} does not exist", p.display());
        return Ok(p);
    }
    let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target");
    let prefix = format!("lb-agent_{VERSION}-");
    ["debian-dev", "debian"]
        .iter()
        .filter_map(|d| std::fs::read_dir(target.join(d)).ok())
        .flatten()
        .filter_map(|e| e.ok())
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.starts_with(&prefix) && name.ends_with(".deb")
        })
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())
        .map(|e| e.path())
        .with_context(|| {
            format!(
                "no package: set LB_DEB, or build one into {}/debian-dev (`cargo xtask package --dev`; `cargo xtask test` does)",
                target.display()
            )
        })
}

fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd.output().with_context(|| format!("spawning {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out)
}

fn stdout(cmd: &mut Command) -> Result<String> {
    Ok(String::from_utf8(run(cmd)?.stdout)?)
}

/// The package unpacked into a scratch root (`dpkg-deb -x`: the files, no scripts run).
struct Unpacked {
    dir: tempfile::TempDir,
}

impl Unpacked {
    fn new(deb: &Path) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(dir.path()))?;
        Ok(Self { dir })
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }

    /// `path` (absolute, as installed) in the scratch root.
    fn path(&self, path: &str) -> PathBuf {
        self.root().join(path.trim_start_matches('/'))
    }

    fn unit(&self) -> Result<Unit> {
        Unit::parse(&std::fs::read_to_string(self.path(UNIT))?)
    }
}

/// A systemd unit file: its settings, by section, in order (a key may repeat).
struct Unit {
    sections: BTreeMap<String, Vec<(String, String)>>,
}

impl Unit {
    fn parse(text: &str) -> Result<Self> {
        let mut sections: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
        let mut section = None;
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
                continue;
            }
            ensure!(!line.ends_with('\\'), "line {}: a continued line", n + 1);
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = Some(name.to_string());
                continue;
            }
            let (key, value) = line
                .split_once('=')
                .with_context(|| format!("line {}: no key=value: {line}", n + 1))?;
            let section = section
                .clone()
                .with_context(|| format!("line {}: outside any section", n + 1))?;
            sections
                .entry(section)
                .or_default()
                .push((key.trim().to_string(), value.trim().to_string()));
        }
        Ok(Self { sections })
    }

    fn all(&self, section: &str, key: &str) -> Vec<&str> {
        self.sections
            .get(section)
            .into_iter()
            .flatten()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The one value of `[Service] key`.
    fn service(&self, key: &str) -> Result<&str> {
        match self.all("Service", key)[..] {
            [v] => Ok(v),
            ref vs => bail!("[Service] {key}: {} values", vs.len()),
        }
    }
}

/// A command line of the unit split into words (it quotes nothing).
fn words(line: &str) -> Result<Vec<String>> {
    ensure!(
        !line.contains(['"', '\'', '\\']),
        "quoting in a command line: {line}"
    );
    Ok(line.split_whitespace().map(String::from).collect())
}

/// `CAP_BPF CAP_NET_ADMIN` as setpriv's `-all,+bpf,+net_admin`.
fn setpriv_caps(caps: &str) -> Result<String> {
    let mut set = String::from("-all");
    for cap in caps.split_whitespace() {
        let name = cap
            .strip_prefix("CAP_")
            .with_context(|| format!("not a capability: {cap}"))?;
        set.push_str(&format!(",+{}", name.to_lowercase()));
    }
    Ok(set)
}

/// `/usr/share/man/man1/NAME.1.gz` for the command and every subcommand (clap's `help`
/// subcommands have none: each page is the help).
fn man_pages(cmd: &clap::Command, out: &mut Vec<String>) {
    let name = cmd.get_display_name().unwrap_or(cmd.get_name());
    out.push(format!("/usr/share/man/man1/{name}.1.gz"));
    for sub in cmd.get_subcommands() {
        if sub.get_name() != "help" && !sub.is_hide_set() {
            man_pages(sub, out);
        }
    }
}

/// Every file of the package (not directories), with its mode and owner as `dpkg-deb -c`
/// shows them.
fn expected_files() -> BTreeMap<String, (&'static str, &'static str)> {
    let mut cmd = lb_userspace::cli::command();
    cmd.build();
    let mut pages = Vec::new();
    man_pages(&cmd, &mut pages);
    let file = "-rw-r--r--";
    let mut files: BTreeMap<String, (&str, &str)> =
        pages.into_iter().map(|p| (p, (file, "0/0"))).collect();
    for (path, mode) in [
        ("/usr/bin/lb-agent", "-rwxr-xr-x"),
        (UNIT, file),
        // It may hold agent.hash_seed (postinst gives it to the group lb-agent).
        (CONFIG, "-rw-r-----"),
        ("/usr/share/bash-completion/completions/lb-agent", file),
        ("/usr/share/zsh/vendor-completions/_lb-agent", file),
        ("/usr/share/fish/vendor_completions.d/lb-agent.fish", file),
        ("/usr/share/doc/lb-agent/copyright", file),
        ("/usr/share/doc/lb-agent/README.md", file),
        ("/usr/share/doc/lb-agent/install.md", file),
        ("/usr/share/doc/lb-agent/config.md", file),
        ("/usr/share/doc/lb-agent/agent.md", file),
        ("/usr/share/doc/lb-agent/grafana/lb-agent.json", file),
    ] {
        files.insert(path.to_string(), (mode, "0/0"));
    }
    files
}

/// `dpkg-deb -c` lists every file the package is meant to hold, with its mode, and nothing
/// else; `dpkg-deb -f`/`-e`: its name, version, dependencies, conffiles and maintainer scripts;
/// unpacked, the binary runs, the example config validates, the man pages are pages of their
/// commands and the completions load.
#[test]
fn the_package_holds_the_agent_its_unit_config_man_pages_and_completions() -> Result<()> {
    let deb = deb()?;

    // Contents.
    let listing = stdout(Command::new("dpkg-deb").arg("-c").arg(&deb))?;
    let mut files = BTreeMap::new();
    for line in listing.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        ensure!(f.len() == 6, "an unexpected line in dpkg-deb -c: {line}");
        if f[0].starts_with('d') {
            continue;
        }
        files.insert(
            f[5].trim_start_matches('.').to_string(),
            (f[0].to_string(), f[1].to_string()),
        );
    }
    let expected: BTreeMap<String, (String, String)> = expected_files()
        .into_iter()
        .map(|(p, (m, o))| (p, (m.to_string(), o.to_string())))
        .collect();
    let missing: Vec<_> = expected
        .iter()
        .filter(|(p, _)| !files.contains_key(*p))
        .collect();
    let unexpected: Vec<_> = files
        .iter()
        .filter(|(p, _)| !expected.contains_key(*p))
        .collect();
    assert!(
        missing.is_empty() && unexpected.is_empty(),
        "missing from the package: {missing:?}\nnot expected in it: {unexpected:?}"
    );
    assert_eq!(
        files, expected,
        "modes or owners differ; dpkg-deb -c:\n{listing}"
    );

    // Fields.
    let field = |name: &str| -> Result<String> {
        Ok(
            stdout(Command::new("dpkg-deb").arg("-f").arg(&deb).arg(name))?
                .trim()
                .to_string(),
        )
    };
    assert_eq!(field("Package")?, "lb-agent");
    assert_eq!(field("Version")?, format!("{VERSION}-1"));
    assert_eq!(
        field("Architecture")?,
        stdout(Command::new("dpkg").arg("--print-architecture"))?.trim()
    );
    assert_eq!(field("Section")?, "net");
    let depends = field("Depends")?;
    let depends: BTreeSet<&str> = depends
        .split(',')
        .map(|d| d.split_whitespace().next().unwrap_or_default())
        .collect();
    assert_eq!(depends, BTreeSet::from(["adduser", "libc6"]));

    // Control files: the config is a conffile; the scripts are valid sh and do their jobs.
    let control = tempfile::tempdir()?;
    run(Command::new("dpkg-deb")
        .arg("-e")
        .arg(&deb)
        .arg(control.path()))?;
    let read = |name: &str| std::fs::read_to_string(control.path().join(name));
    assert_eq!(read("conffiles")?, format!("{CONFIG}\n"));
    for script in ["postinst", "prerm", "postrm"] {
        run(Command::new("sh")
            .arg("-n")
            .arg(control.path().join(script)))?;
    }
    let postinst = read("postinst")?;
    assert!(
        postinst.contains("adduser --system --group") && postinst.contains(" lb-agent\n"),
        "postinst makes no system user lb-agent:\n{postinst}"
    );
    assert!(
        postinst.contains("chown root:lb-agent /etc/lb-agent/lb-agent.toml"),
        "{postinst}"
    );
    // Neither enabled nor started on install (the example config is an example); restarted
    // on upgrade when it runs.
    assert!(
        postinst.contains("deb-systemd-invoke try-restart lb-agent.service")
            && !postinst.contains("new installations run enable")
            && !postinst.contains("_dh_action=start"),
        "{postinst}"
    );
    let prerm = read("prerm")?;
    assert!(
        prerm.contains("deb-systemd-invoke stop lb-agent.service"),
        "{prerm}"
    );

    // The files, unpacked.
    let pkg = Unpacked::new(&deb)?;
    let bin = pkg.path("/usr/bin/lb-agent");
    assert_eq!(
        stdout(Command::new(&bin).arg("--version"))?.trim(),
        format!("lb-agent {VERSION}")
    );
    let example = pkg.path(CONFIG);
    let validated = stdout(
        Command::new(&bin)
            .arg("validate")
            .arg("--config")
            .arg(&example),
    )?;
    assert!(validated.contains(": ok: "), "{validated}");
    // Its pins go where the unit lets the agent write, and where the package's removal
    // cleans up.
    let c = lb_userspace::config::load(&example)?;
    let unit = pkg.unit()?;
    // ("-": it may be missing when the namespace of ExecStartPre, which makes it, is set up.)
    let writable = unit.service("ReadWritePaths")?.trim_start_matches('-');
    assert!(
        Path::new(&c.agent.pin_path).starts_with(writable),
        "pin_path {} is not under ReadWritePaths={writable}",
        c.agent.pin_path
    );
    assert!(
        prerm.contains(&format!("rm -rf {writable}\n")),
        "prerm leaves {writable}:\n{prerm}"
    );
    assert!(
        unit.all("Service", "ExecStartPre")
            .iter()
            .any(|l| l.ends_with(&format!(" {writable}"))),
        "no ExecStartPre makes {writable}"
    );
    let runtime = unit.service("RuntimeDirectory")?;
    let runtime: Vec<&str> = runtime.split_whitespace().collect();
    assert_eq!(c.agent.api, format!("unix:/run/{}/api.sock", runtime[0]));
    assert_eq!(
        c.announce.bird_config,
        format!("/run/{}/vips.conf", runtime[1]),
        "the BIRD file in the unit's second runtime directory"
    );
    for page in expected.keys().filter(|p| p.starts_with("/usr/share/man/")) {
        let name = Path::new(page)
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".1.gz"))
            .context("page name")?;
        let text = stdout(Command::new("gzip").arg("-dc").arg(pkg.path(page)))?;
        assert!(
            text.contains(&format!(".TH {name} 1 ")),
            "{page} is not the page of {name}:\n{text}"
        );
    }
    let run_page = stdout(
        Command::new("gzip")
            .arg("-dc")
            .arg(pkg.path("/usr/share/man/man1/lb-agent-run.1.gz")),
    )?;
    assert!(run_page.contains("keep\\-datapath"), "{run_page}");
    // bash loads its completion; zsh and fish find theirs by the file's name and first line.
    let bash = pkg.path("/usr/share/bash-completion/completions/lb-agent");
    let spec = stdout(
        Command::new("bash")
            .arg("-c")
            .arg(format!("source {} && complete -p lb-agent", bash.display())),
    )?;
    assert!(spec.contains(" lb-agent"), "{spec}");
    let zsh = std::fs::read_to_string(pkg.path("/usr/share/zsh/vendor-completions/_lb-agent"))?;
    assert!(zsh.starts_with("#compdef lb-agent\n"), "{zsh}");
    let fish =
        std::fs::read_to_string(pkg.path("/usr/share/fish/vendor_completions.d/lb-agent.fish"))?;
    for sub in ["run", "validate", "status", "targets", "reload"] {
        assert!(
            fish.contains(&format!("-a \"{sub}\"")),
            "fish completes no {sub}:\n{fish}"
        );
    }
    Ok(())
}

/// `systemd-analyze verify` accepts the unit as installed (the package's /usr laid over the
/// host's in a private mount namespace, so that its binary and man pages are where the unit
/// says), without a single warning (an unknown or misspelt key is only a warning).
#[test]
fn systemd_analyze_verifies_the_installed_unit() -> Result<()> {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("SKIP: no systemd-analyze on this machine");
        return Ok(());
    }
    let pkg = Unpacked::new(&deb()?)?;
    let usr = pkg.path("/usr");
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(format!(
            "mount -t overlay overlay -o lowerdir={}:/usr /usr && exec systemd-analyze verify {UNIT}",
            usr.display()
        ))
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {}\n{stderr}",
        out.status
    );
    Ok(())
}

/// The messages an agent sends to the `NOTIFY_SOCKET` the test listens on.
struct Notifications {
    socket: UnixDatagram,
    path: PathBuf,
    seen: Vec<String>,
}

impl Notifications {
    fn bind(path: PathBuf) -> Result<Self> {
        let socket = UnixDatagram::bind(&path)?;
        // As systemd's: any user may send to it.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666))?;
        socket.set_read_timeout(Some(Duration::from_millis(100)))?;
        Ok(Self {
            socket,
            path,
            seen: Vec::new(),
        })
    }

    /// Waits for a message with the line `line` from the process `pid`; that message.
    fn wait_for(&mut self, pid: u32, limit: Duration, line: &str) -> Result<String> {
        let mut buf = vec![0u8; 4096];
        let Self { socket, seen, .. } = self;
        poll(limit, &format!("a notification {line}"), || {
            match socket.recv(&mut buf) {
                Ok(n) => {
                    let m = String::from_utf8_lossy(&buf[..n]).into_owned();
                    seen.push(m.clone());
                    Ok(m.lines().any(|l| l == line).then_some(m))
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    // Nothing more comes from an agent that exited (a zombie until waited
                    // for, then gone).
                    let stat =
                        std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                    let state = stat.rsplit(") ").next().and_then(|r| r.chars().next());
                    ensure!(matches!(state, Some(c) if c != 'Z'), "process {pid} exited");
                    Ok(None)
                }
                Err(e) => Err(e.into()),
            }
        })
        .with_context(|| format!("notifications so far: {:?}", self.seen))
    }
}

/// A user and group named as the unit's `User=`, in copies of /etc/passwd and /etc/group
/// (what postinst's adduser makes; the copies are mounted over the real ones only in the
/// agent's mount namespace); its uid (= gid).
fn fake_user(dir: &Path, name: &str) -> Result<u32> {
    let passwd = std::fs::read_to_string("/etc/passwd")?;
    let group = std::fs::read_to_string("/etc/group")?;
    let ids = |text: &str| -> BTreeSet<u32> {
        text.lines()
            .filter_map(|l| l.split(':').nth(2)?.parse().ok())
            .collect()
    };
    let (uids, gids) = (ids(&passwd), ids(&group));
    let id = (61000..62000)
        .find(|i| !uids.contains(i) && !gids.contains(i))
        .context("no free uid")?;
    let mut passwd: Vec<&str> = passwd
        .lines()
        .filter(|l| !l.starts_with(&format!("{name}:")))
        .collect();
    let user = format!("{name}:x:{id}:{id}::/nonexistent:/usr/sbin/nologin");
    passwd.push(&user);
    let mut group: Vec<&str> = group
        .lines()
        .filter(|l| !l.starts_with(&format!("{name}:")))
        .collect();
    let grp = format!("{name}:x:{id}:");
    group.push(&grp);
    std::fs::write(dir.join("passwd"), passwd.join("\n") + "\n")?;
    std::fs::write(dir.join("group"), group.join("\n") + "\n")?;
    Ok(id)
}

/// The service as systemd would start it, as a shell script for `ip netns exec` (which gives
/// it a mount namespace of its own): the unit's user, its /run directory, bpffs at
/// /sys/fs/bpf (the topology's, mounted in the root namespace as systemd's is), each
/// `ExecStartPre` and the `ExecStart` line as written, the package's paths taken from the
/// unpacked root, under the unit's umask, memlock limit, user, capabilities and
/// no-new-privileges; `NOTIFY_SOCKET` and the watchdog as systemd sets them.
fn service_script(
    unit: &Unit,
    pkg: &Unpacked,
    dir: &Path,
    bpffs: &Path,
    notify: &Path,
    watchdog: Duration,
) -> Result<String> {
    let user = unit.service("User")?;
    let group = unit.service("Group")?;
    // A path of the package is found in the unpacked root; others are the host's.
    let map = |line: &str| -> Result<String> {
        let mut out = Vec::new();
        for w in words(line)? {
            let packaged = pkg.path(&w);
            out.push(if w.starts_with('/') && packaged.exists() {
                packaged.display().to_string()
            } else {
                w
            });
        }
        Ok(out.join(" "))
    };
    let mut s = String::from("set -e\n");
    s += &format!("mount --bind {}/passwd /etc/passwd\n", dir.display());
    s += &format!("mount --bind {}/group /etc/group\n", dir.display());
    s += &format!("mount --bind {} /sys/fs/bpf\n", bpffs.display());
    s += &format!("mount --bind {}/run /run\n", dir.display());
    for runtime in unit.service("RuntimeDirectory")?.split_whitespace() {
        s += &format!(
            "install -d -o {user} -g {group} -m {} /run/{runtime}\n",
            unit.service("RuntimeDirectoryMode")?,
        );
    }
    for pre in unit.all("Service", "ExecStartPre") {
        // "+": with full privileges, as this script has.
        s += &map(pre.trim_start_matches('+'))?;
        s += "\n";
    }
    s += &format!("umask {}\n", unit.service("UMask")?);
    // LimitMEMLOCK=infinity (for kernels before 5.11, which charge BPF maps to it); where
    // this test runs without CAP_SYS_RESOURCE, the hard limit.
    ensure!(unit.service("LimitMEMLOCK")? == "infinity");
    s += "ulimit -l unlimited 2>/dev/null || ulimit -l \"$(ulimit -H -l)\"\n";
    s += &format!(
        "export NOTIFY_SOCKET={} WATCHDOG_USEC={} WATCHDOG_PID=$$\n",
        notify.display(),
        watchdog.as_micros()
    );
    let ambient = setpriv_caps(unit.service("AmbientCapabilities")?)?;
    let bounding = setpriv_caps(unit.service("CapabilityBoundingSet")?)?;
    ensure!(unit.service("NoNewPrivileges")? == "yes");
    s += &format!(
        "exec setpriv --reuid={user} --regid={group} --clear-groups --no-new-privs --inh-caps={ambient} --ambient-caps={ambient} --bounding-set={bounding} -- {}\n",
        map(unit.service("ExecStart")?)?
    );
    Ok(s)
}

/// CLOCK_MONOTONIC in microseconds, as MONOTONIC_USEC= counts.
fn monotonic_usec() -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: an out-parameter of the right type.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as i128 * 1_000_000 + ts.tv_nsec as i128 / 1000
}

fn xdp_attached(topo: &Topology) -> Result<bool> {
    let l0 = topo.exec("lb", "ip -d link show l0")?;
    let l1 = topo.exec("lb", "ip -d link show l1")?;
    Ok(l0.contains(" xdp") && l1.contains(" xdp"))
}

/// The packaged `lb-agent status --json` against the agent's socket.
fn status(bin: &Path, api: &str) -> Result<Status> {
    let out = run(Command::new(bin).args(["--api", api, "status", "--json"]))?;
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn healthy(s: &Status) -> usize {
    s.target_groups
        .iter()
        .flat_map(|g| &g.targets)
        .filter(|t| t.state == TargetState::Healthy && t.receives_new_flows)
        .count()
}

/// One request through the VIP: the backend that answered.
fn request(topo: &Topology) -> Result<String> {
    let answer = topo.exec("cli", &format!("curl -s -m 5 http://{VIP}/"))?;
    answer
        .split(" saw ")
        .next()
        .map(str::to_string)
        .filter(|b| b.starts_with('b'))
        .with_context(|| format!("not a backend's answer: {answer:?}"))
}

/// The unit's `ExecStart`, run as written: the agent comes up as the unit's user with only
/// the unit's capabilities, attaches, serves and says READY=1 only once XDP is attached and
/// the control API answers; it pings the watchdog at half WATCHDOG_USEC; `ExecReload` makes
/// it say RELOADING=1 (with MONOTONIC_USEC) and READY=1 again, also after a rejected
/// reload; SIGTERM (systemd's stop) makes it say STOPPING=1 and exit 0, leaving the data plane
/// serving (`--keep-datapath`), and the unit started again adopts it.
#[test]
fn the_units_exec_start_runs_as_written() -> Result<()> {
    let pkg = Unpacked::new(&deb()?)?;
    let unit = pkg.unit()?;
    assert_eq!(unit.service("Type")?, "notify");
    let mut topo = Topology::routed(2)?;
    for i in 1..=2 {
        topo.backend(i)?;
    }
    let dir = topo.dir().to_path_buf();
    let uid = fake_user(&dir, unit.service("User")?)?;
    std::fs::create_dir_all(dir.join("run"))?;

    // The test's config in place of the example, with the example's pin path and socket (as
    // postinst leaves it: readable by the agent's group).
    let config_path = pkg.path(CONFIG);
    let example = lb_userspace::config::load(&config_path)?;
    let agent_keys = format!(
        "pin_path = \"{}\"\napi = \"{}\"",
        example.agent.pin_path, example.agent.api
    );
    let good = config(2, "", "", "", "")
        .replace("api = \"unix:DIR/api.sock\"\n", "")
        .replace("pin_path = \"DIR/bpf/lb\"\n", &format!("{agent_keys}\n"));
    std::fs::write(&config_path, &good)?;
    std::os::unix::fs::chown(&config_path, None, Some(uid))?;
    let api_path = dir
        .join("run")
        .join(example.agent.api.trim_start_matches("unix:/run/"));
    let api = format!("unix:{}", api_path.display());
    let bin = pkg.path("/usr/bin/lb-agent");

    let mut notes = Notifications::bind(dir.join("notify.sock"))?;
    let watchdog = Duration::from_secs(2);
    let script = service_script(&unit, &pkg, &dir, topo.bpffs(), &notes.path, watchdog)?;
    let sh = Path::new("/bin/sh");
    let agent = topo.spawn("lb", "agent", sh, &["-c", &script])?;
    let pid = topo.pid(agent);
    let log = |topo: &Topology, name: &str| topo.log(name);

    // Ready: attached, and the API answers at once.
    let ready = notes
        .wait_for(pid, Duration::from_secs(60), "READY=1")
        .with_context(|| log(&topo, "agent"))?;
    assert!(xdp_attached(&topo)?, "READY=1 before XDP is attached");
    let s = status(&bin, &api)?;
    assert!(ready.contains("STATUS=serving: 1 listener(s)"), "{ready}");
    // As the unit's user, with its capabilities and no others.
    let proc_status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| {
        proc_status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
    };
    assert!(
        proc_status.starts_with("Name:\tlb-agent\n"),
        "{proc_status}"
    );
    assert_eq!(
        field("Uid:"),
        Some(format!("{uid} {uid} {uid} {uid}")),
        "{proc_status}"
    );
    let caps = format!("{:016x}", (1u64 << 39) | (1 << 38) | (1 << 12));
    assert_eq!(
        (field("CapEff:"), field("CapPrm:"), field("CapBnd:")),
        (Some(caps.clone()), Some(caps.clone()), Some(caps)),
        "{proc_status}"
    );
    assert_eq!(field("NoNewPrivs:"), Some("1".into()));
    assert_eq!(s.datapath.pin_path, example.agent.pin_path);

    // Serving.
    poll(Duration::from_secs(20), "2 healthy targets", || {
        Ok((healthy(&status(&bin, &api)?) == 2).then_some(()))
    })?;
    let backend = request(&topo)?;
    assert!(["b1", "b2"].contains(&backend.as_str()), "{backend}");

    // The watchdog: a ping within every timeout (systemd's test), three in a row.
    for _ in 0..3 {
        notes.wait_for(pid, watchdog, "WATCHDOG=1")?;
    }

    // ExecReload, as written.
    let reload = |topo: &Topology| -> Result<()> {
        let line = unit
            .service("ExecReload")?
            .replace("$MAINPID", &pid.to_string());
        let w = words(&line)?;
        run(Command::new(&w[0]).args(&w[1..])).with_context(|| log(topo, "agent"))?;
        Ok(())
    };
    let before = monotonic_usec();
    reload(&topo)?;
    let reloading = notes.wait_for(pid, Duration::from_secs(10), "RELOADING=1")?;
    let at: i128 = reloading
        .lines()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .with_context(|| format!("no MONOTONIC_USEC: {reloading}"))?
        .parse()?;
    assert!(
        before <= at && at <= monotonic_usec(),
        "MONOTONIC_USEC={at} not the time of the reload ({before}…)"
    );
    let ready = notes.wait_for(pid, Duration::from_secs(10), "READY=1")?;
    assert!(ready.contains("STATUS=serving: "), "{ready}");
    // A config the agent rejects: it stays ready, on the running config, and says so.
    std::fs::write(&config_path, "[agent]\ninterfaces = []\n")?;
    reload(&topo)?;
    notes.wait_for(pid, Duration::from_secs(10), "RELOADING=1")?;
    let ready = notes.wait_for(pid, Duration::from_secs(10), "READY=1")?;
    assert!(ready.contains("the last reload was rejected"), "{ready}");
    std::fs::write(&config_path, &good)?;
    assert_eq!(healthy(&status(&bin, &api)?), 2);

    // systemctl stop: SIGTERM. The data plane stays, pinned (--keep-datapath).
    let stopped = topo.stop(agent, libc::SIGTERM)?;
    assert!(stopped.success(), "{stopped}\n{}", log(&topo, "agent"));
    notes.wait_for(pid, Duration::from_secs(1), "STOPPING=1")?;
    assert!(xdp_attached(&topo)?, "the stop detached XDP");
    let pins = topo
        .bpffs()
        .join(Path::new(&example.agent.pin_path).strip_prefix("/sys/fs/bpf")?);
    assert!(pins.join("prog").exists(), "no pins at {}", pins.display());
    // Forwarding goes on without the agent.
    request(&topo)?;

    // systemctl start: the unit again adopts what the last run left.
    let again = topo.spawn("lb", "agent2", sh, &["-c", &script])?;
    notes
        .wait_for(topo.pid(again), Duration::from_secs(60), "READY=1")
        .with_context(|| log(&topo, "agent2"))?;
    let log2 = log(&topo, "agent2");
    assert!(
        log2.contains("adopted the pinned data plane"),
        "the restart did not adopt:\n{log2}"
    );
    poll(Duration::from_secs(20), "2 healthy targets", || {
        Ok((healthy(&status(&bin, &api)?) == 2).then_some(()))
    })?;
    request(&topo)?;
    let stopped = topo.stop(again, libc::SIGTERM)?;
    assert!(stopped.success(), "{stopped}\n{}", log(&topo, "agent2"));
    // (The first run's log has the rejected reload's warning.)
    let l = log(&topo, "agent2");
    assert!(!l.contains("WARN") && !l.contains("ERROR"), "{l}");
    Ok(())
}

/// The metric families of docs/config.md ("## Metrics"), with their kind's suffixes for
/// histograms.
fn documented_metrics() -> Result<BTreeSet<String>> {
    let doc =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/config.md"))?;
    let section = doc
        .split("\n## ")
        .find(|s| s.starts_with("Metrics\n"))
        .context("docs/config.md has no Metrics section")?;
    let mut names = BTreeSet::new();
    for line in section.lines() {
        let Some(name) = line.strip_prefix("| `").and_then(|l| l.split('`').next()) else {
            continue;
        };
        if line.contains("(histogram)") {
            for suffix in ["_bucket", "_sum", "_count"] {
                names.insert(format!("{name}{suffix}"));
            }
        } else {
            names.insert(name.to_string());
        }
    }
    Ok(names)
}

/// The metric names in a PromQL expression (the words that start with `lb_`).
fn metric_names(expr: &str) -> BTreeSet<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("lb_"))
        .map(String::from)
        .collect()
}

/// docs/grafana/lb-agent.json (shipped in the package) queries only metrics that
/// docs/config.md documents, and so the agent exports; it covers traffic, flows, drops,
/// target health, health-check latency, map writes and the next-hop cache; its panels have
/// distinct ids and every query a data source.
#[test]
fn the_dashboard_queries_only_documented_metrics() -> Result<()> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/grafana/lb-agent.json");
    let dashboard: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)
        .with_context(|| format!("{} is not JSON", path.display()))?;
    let documented = documented_metrics()?;
    assert!(documented.contains("lb_packets_total"), "{documented:?}");
    let panels = dashboard["panels"].as_array().context("no panels")?;
    let mut ids = BTreeSet::new();
    let mut queried = BTreeSet::new();
    for p in panels {
        let id = p["id"].as_u64().context("a panel without an id")?;
        assert!(ids.insert(id), "panel id {id} twice");
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().context("a query without expr")?;
            assert_eq!(
                t["datasource"]["uid"], "${datasource}",
                "{}: a query on another data source",
                p["title"]
            );
            let names = metric_names(expr);
            assert!(
                !names.is_empty(),
                "{}: queries no metric: {expr}",
                p["title"]
            );
            for n in names {
                assert!(
                    documented.contains(&n),
                    "{}: {n} is not documented in docs/config.md (Metrics): {expr}",
                    p["title"]
                );
                queried.insert(n);
            }
        }
    }
    for needed in [
        "lb_packets_total",
        "lb_bytes_total",
        "lb_new_flows_total",
        "lb_active_flows",
        "lb_dropped_packets_total",
        "lb_target_healthy",
        "lb_healthy_targets",
        "lb_health_check_duration_seconds_bucket",
        "lb_map_write_failures_total",
        "lb_route_cache_enabled",
    ] {
        assert!(queried.contains(needed), "the dashboard shows no {needed}");
    }
    Ok(())
}
