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
//! bpffs holds only pins, so what the agent needs to carry on where it stopped (ids, target
//! states, table layout, the config it applied) goes to a state file beside the API socket's
//! default directory, `/run/lb-agent/<pin path>.state.json`, written after every change. Like the
//! pins, it lasts until reboot.

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
    maps::KernelMaps,
};

const BPF_FS_MAGIC: i64 = 0xcafe4a11;
const STATE_DIR: &str = "/run/lb-agent";
/// Identifies our pins: a pin path whose `state.json` lacks it is someone else's.
const OWNER: &str = "lb-agent";

/// The data plane as the agent holds it.
pub struct Datapath {
    pub maps: KernelMaps,
    pub pin_dir: PathBuf,
    /// Interface name → (ifindex, the mode it is attached in).
    pub attached: BTreeMap<String, (u32, &'static str)>,
    /// Set when this run adopted an earlier run's pins.
    pub adopted: Option<serde_json::Value>,
    /// Interface name → how often XDP was attached afresh because the interface no longer ran
    /// our program through its pinned link (deleted and made again), since this run started.
    pub reattachments: BTreeMap<String, u64>,
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

/// Refuses to go on without the capabilities loading and attaching XDP needs.
pub fn check_privileges() -> Result<()> {
    let status = fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let caps = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let has = |bit: u32| caps & (1 << bit) != 0;
    const CAP_NET_ADMIN: u32 = 12;
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_BPF: u32 = 39;
    if !(has(CAP_NET_ADMIN) && (has(CAP_BPF) || has(CAP_SYS_ADMIN))) {
        bail!(
            "lb-agent run needs root, or the capabilities CAP_BPF and CAP_NET_ADMIN (this process has CapEff={caps:#x}); try sudo"
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

/// Reads the state file of an earlier run; None when there are no pins at all. Errors when the
/// directory holds pins that are not ours.
/// Where the state of the data plane pinned at `pin_dir` is kept.
pub fn state_file(pin_dir: &Path) -> PathBuf {
    let name = pin_dir
        .to_string_lossy()
        .trim_matches('/')
        .replace('/', "_");
    Path::new(STATE_DIR).join(format!("{name}.state.json"))
}

fn earlier_state(pin_dir: &Path) -> Result<Option<serde_json::Value>> {
    if !pin_dir.exists()
        || fs::read_dir(pin_dir)
            .map(|mut d| d.next().is_none())
            .unwrap_or(false)
    {
        return Ok(None);
    }
    let path = state_file(pin_dir);
    let text = fs::read_to_string(&path).with_context(|| {
        format!(
            "agent.pin_path {} is in use by a foreign program, or by an lb-agent whose state file {} is gone; choose another pin_path, or remove the pins (this drops their flows)",
            pin_dir.display(),
            path.display()
        )
    })?;
    let state: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not an lb-agent state file", path.display()))?;
    if state.get("owner").and_then(|o| o.as_str()) != Some(OWNER) {
        bail!(
            "agent.pin_path {} is in use by a foreign program",
            pin_dir.display()
        );
    }
    let object = state
        .get("object")
        .and_then(|o| o.as_str())
        .unwrap_or_default();
    if object != dataplane::object_digest() {
        bail!(
            "the data plane pinned at {} was loaded by a different lb-agent build (object {object}, this build {}); stop it with that build, or remove the pins to start afresh (this drops every flow)",
            pin_dir.display(),
            dataplane::object_digest()
        );
    }
    Ok(Some(state))
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
    let mut reattachments = BTreeMap::new();
    let mut attached = BTreeMap::new();
    let pinned_modes: BTreeMap<String, String> = earlier
        .as_ref()
        .and_then(|s| serde_json::from_value(s["attached"].clone()).ok())
        .unwrap_or_default();
    let wanted: BTreeSet<&String> = config.agent.interfaces.iter().collect();
    for name in &config.agent.interfaces {
        let link_path = pin_dir.join("links").join(name);
        let index = indexes[name];
        if link_path.exists() {
            PinnedLink::from_pin(&link_path)
                .with_context(|| format!("opening the pinned link of {name}"))?;
            match link_fault(&link_path, index, prog_id) {
                None => {
                    let mode = if pinned_modes.get(name).map(String::as_str) == Some("generic") {
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

    /// Writes the state file (atomically).
    pub fn save_state(&self, mut state: serde_json::Value) -> Result<()> {
        state["owner"] = OWNER.into();
        state["object"] = dataplane::object_digest().into();
        state["attached"] = self
            .attached
            .iter()
            .map(|(n, (_, m))| (n.clone(), serde_json::Value::from(*m)))
            .collect::<serde_json::Map<_, _>>()
            .into();
        let path = state_file(&self.pin_dir);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(STATE_DIR)
            .with_context(|| format!("creating {STATE_DIR}"))?;
        let tmp = path.with_extension("tmp");
        fs::write(&tmp, serde_json::to_vec(&state)?).context("writing the state file")?;
        fs::rename(&tmp, &path).context("replacing the state file")?;
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
