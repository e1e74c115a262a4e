//! The running data plane: privileges, bpffs, loading, attaching, pinning, adopting what an
//! earlier `run --keep-datapath` left pinned, and taking it all down again.
//!
//! Layout under `agent.pin_path` (mode 0700):
//! - `maps/NAME`: every map of the object;
//! - `prog`: the `lb_xdp` program;
//! - `links/IFNAME`: the XDP link of each interface (a pinned link keeps the program attached
//!   after the agent exits). An adopted link is checked first: it must still be attached to
//!   the interface of that name (its ifindex now) and run our program; a link whose interface
//!   was deleted (and perhaps made again) is replaced by a fresh attach. While the agent runs,
//!   `ensure_attached` does the same when the link watcher (`links`) says so;
//!
//! bpffs holds only pins and the maps are read back, so what else the agent needs to carry on
//! where it stopped (ids, target states, the config it applied) goes to a state file beside the API socket's
//! default directory, `/run/lb-agent/<pin path>.state.json` (see [`crate::statefile`]), written
//! after every change. Like the pins, it lasts until reboot.

use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::CString,
    fs,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::{
            ffi::OsStrExt,
            fs::{DirBuilderExt, PermissionsExt},
        },
    },
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use aya::programs::{links::FdLink, links::PinnedLink, Xdp, XdpMode};
use lb_common::maps::PROGRAM_XDP;
use tracing::{info, warn};

use crate::{
    config::{Config, XdpMode as ConfiguredMode},
    dataplane::{self, MapSizes},
    links,
    maps::KernelMaps,
    model::SavedModel,
    statefile::{self, StateFile, STATE_DIR},
    xdp_log::XdpLog,
};

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// The data plane as the agent holds it.
pub struct Datapath {
    pub maps: KernelMaps,
    pub pin_dir: PathBuf,
    /// Interface name → (ifindex, the mode it is attached in).
    pub attached: BTreeMap<String, (u32, &'static str)>,
    /// Set when this run adopted an earlier run's pins.
    pub adopted: Option<StateFile>,
    /// Interface name → how often XDP was attached afresh because the interface no longer ran
    /// our program through its pinned link (deleted and made again), since this run started.
    pub reattachments: BTreeMap<String, u64>,
    /// The reader of the program's log (aya-log), for the agent to run (`XdpLog::forward`);
    /// None when it could not be opened (said once, at start).
    pub log: Option<XdpLog>,
    /// Our `lb_xdp`, for attaching again, and its kernel id.
    prog: Xdp,
    pub prog_id: u32,
    xdp_mode: ConfiguredMode,
}

/// Where an interface stands after `Datapath::ensure_attached`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkState {
    /// Its pinned link runs our program on it (the ifindex).
    Serving(u32),
    /// It did not; XDP is attached afresh (the ifindex).
    Reattached(u32),
    /// No interface has that name now; its pin stays until one does.
    Missing,
}

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// What `run` needs, and all it needs, once a bpffs holds `pin_path`: CAP_BPF to load the
/// object and to create, pin and open maps, programs and links; CAP_NET_ADMIN to load XDP
/// programs and attach them; CAP_PERFMON because without it the verifier hardens programs
/// against Spectre v1 and refuses pointer arithmetic `lb_xdp` does ("pointer arithmetic with
/// it prohibited for !root"). Mounting bpffs needs CAP_SYS_ADMIN besides (`ensure_bpffs`).
const NEEDED: [(u32, &str); 3] = [
    (CAP_BPF, "CAP_BPF"),
    (CAP_NET_ADMIN, "CAP_NET_ADMIN"),
    (CAP_PERFMON, "CAP_PERFMON"),
];

/// This process's effective capabilities (`CapEff`, a bit per capability).
fn effective_caps() -> Result<u64> {
    let status = fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .context("no CapEff in /proc/self/status")
}

/// Refuses to go on without the capabilities `run` needs, naming the missing ones.
pub fn check_privileges() -> Result<()> {
    let caps = effective_caps()?;
    let missing: Vec<&str> = NEEDED
        .iter()
        .filter(|(bit, _)| caps & (1 << bit) == 0)
        .map(|(_, name)| *name)
        .collect();
    if !missing.is_empty() {
        bail!(
            "lb-agent run needs the capabilities CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON (root has them); this process lacks {} (CapEff={caps:#x})",
            missing.join(", ")
        );
    }
    Ok(())
}

fn statfs_magic(path: &Path) -> Option<i64> {
    let c = CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a zeroed out-parameter of the right type.
    (unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0).then_some(st.f_type as i64)
}

/// Makes sure `pin_path` lies on a bpffs, mounting one at /sys/fs/bpf when that is where it
/// goes and nothing is mounted there yet.
pub fn ensure_bpffs(pin_path: &Path) -> Result<()> {
    let on_bpffs =
        |p: &Path| p.ancestors().find(|a| a.exists()).and_then(statfs_magic) == Some(BPF_FS_MAGIC);
    if on_bpffs(pin_path) {
        return Ok(());
    }
    let mount_point = Path::new("/sys/fs/bpf");
    if !pin_path.starts_with(mount_point) {
        bail!(
            "agent.pin_path {} is not on a bpffs; use a path under /sys/fs/bpf or mount one (mount -t bpf bpf DIR)",
            pin_path.display()
        );
    }
    if effective_caps().is_ok_and(|caps| caps & (1 << CAP_SYS_ADMIN) == 0) {
        bail!(
            "agent.pin_path {} is not on a bpffs, and mounting one at /sys/fs/bpf needs CAP_SYS_ADMIN, which this process lacks: mount it beforehand (mount -t bpf bpf /sys/fs/bpf), or give lb-agent CAP_SYS_ADMIN",
            pin_path.display()
        );
    }
    fs::create_dir_all(mount_point).context("creating /sys/fs/bpf")?;
    let c = |s: &str| CString::new(s).expect("no NUL");
    let (src, target, fstype) = (c("bpf"), c("/sys/fs/bpf"), c("bpf"));
    // SAFETY: NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("mounting bpffs at /sys/fs/bpf");
    }
    info!("mounted bpffs at /sys/fs/bpf");
    Ok(())
}

/// Checks that the bpffs holding `pin_dir` (mounted by `ensure_bpffs` if need be) outlives this
/// process when `keep` (`--keep-datapath`) needs it to: a bpffs mounted only in this process's
/// mount namespace — `ip netns exec` gives a process one, with a /sys of its own, and the agent
/// mounts its bpffs there — goes away with the process, and the pinned data plane with it.
/// Refuses `keep` then, before anything is attached.
pub fn check_pin_path_outlives(pin_dir: &Path, keep: bool) -> Result<()> {
    ensure_bpffs(pin_dir)?;
    match bpffs_in_pid1_namespace(pin_dir) {
        Ok(true) => Ok(()),
        Ok(false) if keep => bail!(
            "--keep-datapath: agent.pin_path {} is on a bpffs mounted only in this process's mount namespace, not in PID 1's (as under `ip netns exec`, which gives the process a /sys of its own): it goes away when lb-agent exits, and the data plane with it. Mount bpffs in the root mount namespace (on the host: mount -t bpf bpf /sys/fs/bpf; under `ip netns exec`, on a directory outside /sys) and set agent.pin_path into it, or run without --keep-datapath",
            pin_dir.display()
        ),
        Ok(false) => {
            info!(
                pin_path = %pin_dir.display(),
                "the bpffs of agent.pin_path is mounted only in this process's mount namespace: the data plane will not outlive this process"
            );
            Ok(())
        }
        Err(e) => {
            warn!(
                pin_path = %pin_dir.display(),
                error = %format!("{e:#}"),
                "cannot tell whether the bpffs of agent.pin_path outlives this process"
            );
            Ok(())
        }
    }
}

/// Whether the bpffs holding `path` is mounted in PID 1's mount namespace too: the device
/// number of its superblock (`stat` of its nearest existing ancestor) among the bpffs mounts of
/// `/proc/1/mountinfo`.
fn bpffs_in_pid1_namespace(path: &Path) -> Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let existing = path
        .ancestors()
        .find(|a| a.exists())
        .context("no ancestor of agent.pin_path exists")?;
    let dev = fs::metadata(existing)
        .with_context(|| format!("stat {}", existing.display()))?
        .dev();
    let device = format!("{}:{}", libc::major(dev), libc::minor(dev));
    let init = fs::read_to_string("/proc/1/mountinfo").context("reading /proc/1/mountinfo")?;
    Ok(mountinfo(&init)
        .iter()
        .any(|m| m.fstype == "bpf" && m.device == device))
}

/// One line of a `mountinfo` file: what `bpffs_in_pid1_namespace` needs of it.
#[derive(Debug, PartialEq)]
struct Mount {
    /// `major:minor`: the superblock's device number.
    device: String,
    fstype: String,
}

/// The mounts of a `/proc/PID/mountinfo` (see proc(5)); malformed lines are skipped. Fields
/// are separated by single spaces (a space in a mount point is escaped as `\040`); optional
/// fields end at ` - `, before the filesystem type.
fn mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let (head, tail) = line.split_once(" - ")?;
            Some(Mount {
                device: head.split(' ').nth(2)?.to_string(),
                fstype: tail.split(' ').next()?.to_string(),
            })
        })
        .collect()
}

/// The ifindex of `name`.
pub fn ifindex(name: &str) -> Result<u32> {
    let c = CString::new(name).with_context(|| format!("interface name {name:?}"))?;
    // SAFETY: a NUL-terminated name.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if i == 0 {
        bail!("interface {name} not found (agent.interfaces)");
    }
    Ok(i)
}

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_TYPE_XDP: u32 = 6;

#[repr(C)]
#[derive(Default)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

#[repr(C)]
#[derive(Default)]
struct InfoByFdAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// The head of `struct bpf_link_info` and, for an XDP link, its interface (the union starts at
/// offset 16). The kernel fills as much as it is given.
#[repr(C)]
#[derive(Default)]
struct XdpLinkInfo {
    link_type: u32,
    id: u32,
    prog_id: u32,
    _pad: u32,
    /// 0 once the interface is gone (the link is detached for good).
    ifindex: u32,
    _rest: u32,
}

/// What the kernel says about the link pinned at `path` (`BPF_OBJ_GET`, then
/// `BPF_OBJ_GET_INFO_BY_FD`; aya 0.14's `LinkInfo` lacks the XDP interface).
fn pinned_link_info(path: &Path) -> Result<XdpLinkInfo> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .with_context(|| format!("pin path {}", path.display()))?;
    let get = ObjGetAttr {
        pathname: c_path.as_ptr() as u64,
        ..ObjGetAttr::default()
    };
    // SAFETY: a BPF_OBJ_GET attribute of the size passed; `c_path` outlives the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &get as *const ObjGetAttr,
            size_of::<ObjGetAttr>(),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("opening the pinned link {}", path.display()));
    }
    // SAFETY: the kernel just gave us this descriptor; nobody else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut info = XdpLinkInfo::default();
    let attr = InfoByFdAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: size_of::<XdpLinkInfo>() as u32,
        info: &mut info as *mut XdpLinkInfo as u64,
    };
    // SAFETY: a BPF_OBJ_GET_INFO_BY_FD attribute of the size passed, pointing at `info` of
    // `info_len` bytes; both outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            &attr as *const InfoByFdAttr,
            size_of::<InfoByFdAttr>(),
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("reading the link pinned at {}", path.display()));
    }
    Ok(info)
}

/// Why the link pinned at `path` does not attach program `prog_id` to interface `ifindex`;
/// None when it does.
fn link_fault(path: &Path, ifindex: u32, prog_id: u32) -> Option<String> {
    let info = match pinned_link_info(path) {
        Ok(info) => info,
        Err(e) if !path.exists() => return Some(format!("no pinned link ({e:#})")),
        Err(e) => return Some(format!("{e:#}")),
    };
    if info.link_type != BPF_LINK_TYPE_XDP {
        Some(format!("link {} is not an XDP link", info.id))
    } else if info.prog_id != prog_id {
        Some(format!(
            "link {} runs program {}, not ours ({prog_id})",
            info.id, info.prog_id
        ))
    } else if info.ifindex == 0 {
        Some(format!(
            "link {} is detached (its interface was deleted)",
            info.id
        ))
    } else if info.ifindex != ifindex {
        Some(format!(
            "link {} is attached to ifindex {}, the interface is ifindex {ifindex} now",
            info.id, info.ifindex
        ))
    } else {
        None
    }
}

/// Removes a pin that no longer serves (dropping the last reference detaches the link, if it
/// is attached at all).
fn discard_link(path: &Path) -> Result<()> {
    if detach_link(path).is_err() && path.exists() {
        fs::remove_file(path).with_context(|| format!("removing {}", path.display()))?;
    }
    Ok(())
}

fn attach(prog: &mut Xdp, iface: &str, mode: ConfiguredMode) -> Result<(FdLink, &'static str)> {
    let try_mode = |prog: &mut Xdp, mode: XdpMode| -> Result<FdLink> {
        let id = prog.attach(iface, mode)?;
        let link = prog.take_link(id)?;
        FdLink::try_from(link).context("XDP link is not an fd link (kernel < 5.9?)")
    };
    match mode {
        ConfiguredMode::Native => try_mode(prog, XdpMode::Driver)
            .map(|l| (l, "native"))
            .with_context(|| format!("attaching XDP to {iface} in native mode (xdp_mode = \"auto\" or \"generic\" if the driver lacks it)")),
        ConfiguredMode::Generic => try_mode(prog, XdpMode::Skb)
            .map(|l| (l, "generic"))
            .with_context(|| format!("attaching XDP to {iface} in generic mode")),
        // A veth gets generic XDP: native XDP on a veth copies every frame a local socket
        // sent into a page of its own, and drops frames redirected to a veth whose peer has
        // neither NAPI (GRO) nor an XDP program; generic mode needs neither and was as fast
        // or faster for connections and small packets (BENCHMARKS.md, "End to end").
        ConfiguredMode::Auto if ifindex(iface).and_then(links::is_veth).unwrap_or(false) => {
            info!(interface = iface, "xdp_mode = \"auto\": a veth, so generic XDP");
            try_mode(prog, XdpMode::Skb)
                .map(|l| (l, "generic"))
                .with_context(|| format!("attaching XDP to {iface} in generic mode"))
        }
        ConfiguredMode::Auto => match try_mode(prog, XdpMode::Driver) {
            Ok(l) => Ok((l, "native")),
            Err(native) => {
                warn!(interface = iface, error = %format!("{native:#}"), "native XDP failed; trying generic");
                try_mode(prog, XdpMode::Skb)
                    .map(|l| (l, "generic"))
                    .with_context(|| format!("attaching XDP to {iface}: native failed ({native:#}), generic failed"))
            }
        },
    }
}

/// Where the state of the data plane pinned at `pin_dir` is kept.
pub fn state_file(pin_dir: &Path) -> PathBuf {
    statefile::path_in(Path::new(STATE_DIR), pin_dir)
}

/// Reads the state file of an earlier run; None when there are no pins at all. Errors when the
/// directory holds pins that are not ours.
fn earlier_state(pin_dir: &Path) -> Result<Option<StateFile>> {
    if !pin_dir.exists()
        || fs::read_dir(pin_dir)
            .map(|mut d| d.next().is_none())
            .unwrap_or(false)
    {
        return Ok(None);
    }
    statefile::read(&state_file(pin_dir), pin_dir).map(Some)
}

/// Loads and attaches the data plane, or adopts the one an earlier run left pinned.
pub fn open(config: &Config, table_slots: u32) -> Result<Datapath> {
    let pin_dir = PathBuf::from(&config.agent.pin_path);
    ensure_bpffs(&pin_dir)?;
    // Every interface must exist before anything is touched.
    let indexes: BTreeMap<&String, u32> = config
        .agent
        .interfaces
        .iter()
        .map(|name| Ok((name, ifindex(name)?)))
        .collect::<Result<_>>()?;
    let earlier = earlier_state(&pin_dir)?;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(pin_dir.join("maps"))
        .with_context(|| format!("creating {}", pin_dir.display()))?;
    fs::create_dir_all(pin_dir.join("links"))?;
    fs::set_permissions(&pin_dir, fs::Permissions::from_mode(0o700))?;

    let mut log = None;
    let (maps, mut prog) = match &earlier {
        Some(_) => {
            let maps = KernelMaps::from_pins(&pin_dir.join("maps"))?;
            let prog = Xdp::from_pin(
                pin_dir.join("prog"),
                aya_obj::programs::XdpAttachType::Interface,
            )
            .context("opening the pinned program")?;
            (maps, prog)
        }
        None => {
            let mut ebpf = dataplane::load(MapSizes {
                flow_table: config.agent.flow_table_size,
                table_slots,
            })?;
            let maps = KernelMaps::new_pinned(&mut ebpf, &pin_dir.join("maps"))?;
            log = XdpLog::attach(&mut ebpf)
                .map_err(
                    |e| warn!(error = %format!("{e:#}"), "the XDP program's log is not forwarded"),
                )
                .ok();
            let prog = dataplane::program_mut(&mut ebpf, PROGRAM_XDP)?;
            prog.pin(pin_dir.join("prog"))
                .context("pinning the program")?;
            let prog = Xdp::from_pin(
                pin_dir.join("prog"),
                aya_obj::programs::XdpAttachType::Interface,
            )
            .context("reopening the pinned program")?;
            (maps, prog)
        }
    };

    let prog_id = prog.info().context("reading our program's id")?.id();
    if earlier.is_some() {
        // Its ring buffer is not pinned: the program, which an earlier run loaded, holds it,
        // and aya-log finds it by walking the loaded programs' ids, which needs CAP_SYS_ADMIN.
        // Without it (the documented capabilities, the systemd unit) this is expected, not a
        // fault: the events are still counted (lb_dataplane_events_total), so say it plainly.
        log = XdpLog::adopt(prog_id)
            .map_err(|e| {
                info!(
                    error = %format!("{e:#}"),
                    "the adopted XDP program's log is not forwarded (reading it after a restart \
                     needs CAP_SYS_ADMIN); its events are still counted in lb_dataplane_events_total"
                )
            })
            .ok();
    }
    let mut reattachments = BTreeMap::new();
    let mut attached = BTreeMap::new();
    let pinned_modes = earlier.as_ref().map(|s| &s.attached);
    let wanted: BTreeSet<&String> = config.agent.interfaces.iter().collect();
    for name in &config.agent.interfaces {
        let link_path = pin_dir.join("links").join(name);
        let index = indexes[name];
        if link_path.exists() {
            PinnedLink::from_pin(&link_path)
                .with_context(|| format!("opening the pinned link of {name}"))?;
            match link_fault(&link_path, index, prog_id) {
                None => {
                    let mode = if pinned_modes.and_then(|m| m.get(name)).map(String::as_str)
                        == Some("generic")
                    {
                        "generic"
                    } else {
                        "native"
                    };
                    info!(interface = %name, mode, "adopted the pinned XDP link");
                    attached.insert(name.clone(), (index, mode));
                    continue;
                }
                Some(why) => {
                    warn!(interface = %name, ifindex = index, why, "the pinned XDP link no longer serves the interface (deleted and made again?): attaching afresh");
                    discard_link(&link_path)?;
                    reattachments.insert(name.clone(), 1);
                }
            }
        }
        let attached_now =
            attach(&mut prog, name, config.agent.xdp_mode).and_then(|(link, mode)| {
                link.pin(&link_path)
                    .with_context(|| format!("pinning the link of {name}"))?;
                Ok(mode)
            });
        let mode = match attached_now {
            Ok(mode) => mode,
            Err(e) => {
                if earlier.is_none() {
                    // A fresh start that cannot attach everywhere leaves nothing behind.
                    remove_pins(&pin_dir);
                }
                return Err(e);
            }
        };
        if reattachments.contains_key(name) {
            info!(interface = %name, ifindex = index, mode, "XDP re-attached");
        } else {
            info!(interface = %name, mode, "XDP attached");
        }
        attached.insert(name.clone(), (index, mode));
    }
    // Links of interfaces the config no longer lists.
    for entry in fs::read_dir(pin_dir.join("links"))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !wanted.contains(&name) {
            detach_link(&entry.path())?;
            info!(interface = %name, "XDP detached (no longer in agent.interfaces)");
        }
    }
    Ok(Datapath {
        maps,
        pin_dir,
        attached,
        adopted: earlier,
        reattachments,
        log,
        prog,
        prog_id,
        xdp_mode: config.agent.xdp_mode,
    })
}

/// Detaches every pinned link under `pin_dir` and removes the pins (best effort).
fn remove_pins(pin_dir: &Path) {
    if let Ok(entries) = fs::read_dir(pin_dir.join("links")) {
        for entry in entries.flatten() {
            let _ = detach_link(&entry.path());
        }
    }
    let _ = fs::remove_dir_all(pin_dir);
}

fn detach_link(path: &Path) -> Result<()> {
    let link = PinnedLink::from_pin(path).with_context(|| format!("opening {}", path.display()))?;
    let fd_link = link
        .unpin()
        .with_context(|| format!("unpinning {}", path.display()))?;
    drop(fd_link); // the last reference: the kernel detaches the program
    Ok(())
}

impl Datapath {
    /// Makes sure interface `name` runs our program through the link pinned for it: when it
    /// does not (it was deleted and made again: a new ifindex, no program, the old link
    /// detached), the pin is replaced by a fresh attach, counted in `reattachments`. A missing
    /// interface keeps its pin until it is back.
    pub fn ensure_attached(&mut self, name: &str) -> Result<LinkState> {
        let Ok(index) = ifindex(name) else {
            return Ok(LinkState::Missing);
        };
        let path = self.pin_dir.join("links").join(name);
        let Some(why) = link_fault(&path, index, self.prog_id) else {
            if let Some(a) = self.attached.get_mut(name) {
                a.0 = index;
            }
            return Ok(LinkState::Serving(index));
        };
        warn!(
            interface = name,
            ifindex = index,
            why,
            "XDP is not attached through our pin: attaching afresh"
        );
        discard_link(&path)?;
        let (link, mode) = attach(&mut self.prog, name, self.xdp_mode)?;
        link.pin(&path)
            .with_context(|| format!("pinning the link of {name}"))?;
        // The interface the kernel attached to (the name may have moved on meanwhile).
        let index = pinned_link_info(&path)?.ifindex;
        if index == 0 {
            return Ok(LinkState::Missing); // gone again already
        }
        *self.reattachments.entry(name.to_string()).or_default() += 1;
        self.attached.insert(name.to_string(), (index, mode));
        info!(interface = name, ifindex = index, mode, "XDP re-attached");
        Ok(LinkState::Reattached(index))
    }

    /// Writes the state file (atomically, 0600): what the next run needs to adopt the data
    /// plane and the maps cannot say, with the modes of the links attached.
    pub fn save_state(&self, config: Config, model: SavedModel) -> Result<()> {
        let attached = self
            .attached
            .iter()
            .map(|(n, (_, m))| (n.clone(), m.to_string()))
            .collect();
        let state = StateFile::new(attached, config, model);
        statefile::write(Path::new(STATE_DIR), &self.pin_dir, &state)?;
        Ok(())
    }

    /// Detaches from every interface and removes every pin: the maps and program go away with
    /// the last reference.
    pub fn tear_down(self) -> Result<()> {
        let links = self.pin_dir.join("links");
        for entry in fs::read_dir(&links)? {
            detach_link(&entry?.path())?;
        }
        drop(self.maps);
        let _ = fs::remove_file(state_file(&self.pin_dir));
        fs::remove_dir_all(&self.pin_dir)
            .with_context(|| format!("removing {}", self.pin_dir.display()))?;
        info!("XDP detached from every interface; pins removed");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_give_device_and_type() {
        let text = "\
22 1 0:21 / /sys rw,nosuid - sysfs sysfs rw
30 22 0:27 / /sys/fs/bpf rw,relatime shared:9 master:2 - bpf bpf rw
41 1 0:40 / /tmp/lb\\040x/bpf rw - bpf none rw,mode=700
garbage
";
        let m = |device: &str, fstype: &str| Mount {
            device: device.into(),
            fstype: fstype.into(),
        };
        assert_eq!(
            mountinfo(text),
            [m("0:21", "sysfs"), m("0:27", "bpf"), m("0:40", "bpf")]
        );
    }
}
