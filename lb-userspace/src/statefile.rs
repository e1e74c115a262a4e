//! The state file and the lock beside it, the only code that reads or writes either.
//!
//! bpffs holds only pins, and what the maps hold is read back from the maps, so what the agent
//! needs to carry on where an earlier `run --keep-datapath` stopped and the maps cannot say
//! (ids, cookies, target states, the config it applied, the links' modes) is kept in
//! `/run/lb-agent/<pin path>.state.json`, written after every change. It holds the whole config, `hash_seed` included: the file is 0600 in a
//! 0700 directory, and replaced atomically (a temporary file in the same directory, renamed
//! over it), so a reader never sees half of one.
//!
//! `/run/lb-agent/<pin path>.lock` is held (`flock`, exclusive) by the one agent that runs on
//! that pin path, for its whole life, with its pid written in it.

use std::{
    collections::BTreeMap,
    fs::{self, File, OpenOptions},
    io::{Read, Seek, Write},
    os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::{config::Config, dataplane, model::SavedModel};

/// Where state files and locks are kept.
pub const STATE_DIR: &str = "/run/lb-agent";
/// Identifies our pins: a pin path whose state file lacks it is someone else's.
pub const OWNER: &str = "lb-agent";

/// What an agent leaves for the next one on the same pin path.
#[derive(Debug, Serialize, Deserialize)]
pub struct StateFile {
    /// Always [`OWNER`].
    pub owner: String,
    /// The digest of the XDP object that made the pins ([`dataplane::object_digest`]).
    pub object: String,
    /// Interface name → the XDP mode its link was attached in ("native", "generic").
    #[serde(default)]
    pub attached: BTreeMap<String, String>,
    /// The config the agent applied last.
    pub config: Config,
    pub model: SavedModel,
}

impl StateFile {
    /// A state file of this build.
    pub fn new(attached: BTreeMap<String, String>, config: Config, model: SavedModel) -> Self {
        Self {
            owner: OWNER.into(),
            object: dataplane::object_digest(),
            attached,
            config,
            model,
        }
    }
}

fn stem(pin_dir: &Path) -> String {
    pin_dir
        .to_string_lossy()
        .trim_matches('/')
        .replace('/', "_")
}

/// The state file of the data plane pinned at `pin_dir`, in `dir`.
pub fn path_in(dir: &Path, pin_dir: &Path) -> PathBuf {
    dir.join(format!("{}.state.json", stem(pin_dir)))
}

/// The lock of `pin_dir`, in `dir`.
pub fn lock_path_in(dir: &Path, pin_dir: &Path) -> PathBuf {
    dir.join(format!("{}.lock", stem(pin_dir)))
}

/// Creates `dir` 0700, or makes an existing one 0700.
fn private_dir(dir: &Path) -> Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .with_context(|| format!("making {} private (0700)", dir.display()))
}

/// Writes the state file of `pin_dir` in `dir` (0700, created if need be): a 0600 temporary
/// file in `dir`, synced, then renamed over the state file. Its path.
pub fn write(dir: &Path, pin_dir: &Path, state: &StateFile) -> Result<PathBuf> {
    private_dir(dir)?;
    let path = path_in(dir, pin_dir);
    let mut tmp = tempfile::Builder::new()
        .prefix(".state-")
        .permissions(fs::Permissions::from_mode(0o600))
        .tempfile_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    serde_json::to_writer(tmp.as_file_mut(), state).context("writing the state file")?;
    tmp.as_file().sync_all().context("syncing the state file")?;
    tmp.persist(&path)
        .with_context(|| format!("replacing {}", path.display()))?;
    Ok(path)
}

/// Reads the state file at `path` that an earlier run left for the pins at `pin_dir`: errors
/// name what is wrong (missing: the pins are someone else's; another owner; another build;
/// unreadable).
pub fn read(path: &Path, pin_dir: &Path) -> Result<StateFile> {
    let text = fs::read_to_string(path).with_context(|| {
        format!(
            "agent.pin_path {} is in use by a foreign program, or by an lb-agent whose state file {} is gone; choose another pin_path, or remove the pins (this drops their flows)",
            pin_dir.display(),
            path.display()
        )
    })?;
    // Who wrote it first: a file of another owner or build need not parse as ours.
    #[derive(Deserialize)]
    struct Header {
        owner: Option<String>,
        object: Option<String>,
    }
    let header: Header = serde_json::from_str(&text)
        .with_context(|| format!("{} is not an lb-agent state file", path.display()))?;
    if header.owner.as_deref() != Some(OWNER) {
        bail!(
            "agent.pin_path {} is in use by a foreign program",
            pin_dir.display()
        );
    }
    let object = header.object.unwrap_or_default();
    if object != dataplane::object_digest() {
        bail!(
            "the data plane pinned at {} was loaded by a different lb-agent build (object {object}, this build {}); stop it with that build, or remove the pins to start afresh (this drops every flow)",
            pin_dir.display(),
            dataplane::object_digest()
        );
    }
    serde_json::from_str(&text)
        .with_context(|| format!("reading the state file {}", path.display()))
}

/// The exclusive lock one agent holds on a pin path for its whole life. Dropping it removes
/// the lock file and releases the lock.
#[derive(Debug)]
pub struct PinLock {
    path: PathBuf,
    _file: File,
}

/// Takes the lock of `pin_dir` in `dir` (0700, created if need be) and writes this process's
/// pid in it; errors, naming the holder's pid, when another agent holds it.
pub fn lock(dir: &Path, pin_dir: &Path) -> Result<PinLock> {
    private_dir(dir)?;
    let path = lock_path_in(dir, pin_dir);
    loop {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = match holder.trim() {
                    "" => "pid unknown".to_string(),
                    pid => format!("pid {pid}"),
                };
                bail!(
                    "another lb-agent ({holder}) runs on agent.pin_path {} (it holds {}); stop it first, or give this one another pin_path",
                    pin_dir.display(),
                    path.display()
                );
            }
            Err(e) => {
                return Err(e).with_context(|| format!("locking {}", path.display()));
            }
        }
        // An agent that was exiting may have removed the file between our open and our lock:
        // the lock counts only on the file that is at the path now.
        let locked = file.metadata()?;
        match fs::metadata(&path) {
            Ok(m) if (m.dev(), m.ino()) == (locked.dev(), locked.ino()) => {}
            _ => continue,
        }
        file.set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| writeln!(file, "{}", std::process::id()))
            .with_context(|| format!("writing {}", path.display()))?;
        return Ok(PinLock { path, _file: file });
    }
}

impl Drop for PinLock {
    fn drop(&mut self) {
        // Removed while still locked; an agent that opened it meanwhile sees it gone and
        // tries again on a new file.
        let _ = fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use serde_json::json;

    use super::*;
    use crate::model::Model;

    fn sample() -> StateFile {
        let mut config = Config::default();
        config.agent.hash_seed = "secret".into();
        StateFile::new(
            [("l0".to_string(), "native".to_string())].into(),
            config,
            Model::default().save(Instant::now()),
        )
    }

    fn value(s: &StateFile) -> serde_json::Value {
        serde_json::to_value(s).expect("serializable")
    }

    fn scratch(name: &str) -> tempfile::TempDir {
        tempfile::Builder::new()
            .prefix(&format!("lb-statefile-{name}-"))
            .tempdir()
            .expect("a temporary directory")
    }

    #[test]
    fn a_written_state_file_reads_back_the_same() {
        let tmp = scratch("roundtrip");
        let dir = tmp.path().join("run");
        let pin_dir = Path::new("/sys/fs/bpf/lb");
        let state = sample();
        let path = write(&dir, pin_dir, &state).unwrap();
        assert_eq!(path, dir.join("sys_fs_bpf_lb.state.json"));
        let back = read(&path, pin_dir).unwrap();
        assert_eq!(value(&back), value(&state));
        assert_eq!(back.config.agent.hash_seed, "secret");
        // Written again: replaced, and nothing else left in the directory.
        write(&dir, pin_dir, &state).unwrap();
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["sys_fs_bpf_lb.state.json"]);
    }

    #[test]
    fn state_files_of_the_previous_build_read() {
        let tmp = scratch("old");
        let pin_dir = Path::new("/pins/lb");
        let s = sample();
        // As the previous build wrote it: an untyped object, in any key order.
        let old = |interfaces: serde_json::Value, tables: bool| {
            let mut v = json!({
                "config": s.config,
                "model": s.model,
                "interfaces": interfaces,
                "owner": "lb-agent",
                "object": dataplane::object_digest(),
                "attached": {"l0": "generic"},
            });
            if tables {
                v["tables"] = json!({"regions": [[0, 0, 4099]], "next_free_slot": 8198});
            }
            let path = tmp.path().join("old.state.json");
            fs::write(&path, v.to_string()).unwrap();
            read(&path, pin_dir).unwrap()
        };
        // Its table layout and interface flags are read back from the maps now: ignored.
        for (interfaces, tables) in [
            (json!({"3": 0, "4": 1}), true),
            (json!([3, 4]), false),
            (serde_json::Value::Null, true),
        ] {
            let back = old(interfaces, tables);
            assert_eq!(back.attached["l0"], "generic");
            assert_eq!(value(&back)["config"], value(&s)["config"]);
            assert_eq!(value(&back)["model"], value(&s)["model"]);
        }
    }

    #[test]
    fn foreign_other_build_and_broken_state_files_are_named() {
        let tmp = scratch("bad");
        let pin_dir = Path::new("/pins/lb");
        let path = tmp.path().join("x.state.json");
        let err = |text: &str| {
            fs::write(&path, text).unwrap();
            format!("{:#}", read(&path, pin_dir).unwrap_err())
        };
        assert!(err(r#"{"owner":"other"}"#).contains("in use by a foreign program"));
        assert!(err("[1]").contains("is not an lb-agent state file"));
        assert!(err(r#"{"owner":"lb-agent","object":"0"}"#)
            .contains("loaded by a different lb-agent build (object 0"));
        let e = err(&format!(
            r#"{{"owner":"lb-agent","object":"{}"}}"#,
            dataplane::object_digest()
        ));
        assert!(
            e.contains("reading the state file") && e.contains("missing field"),
            "{e}"
        );
        fs::remove_file(&path).unwrap();
        assert!(format!("{:#}", read(&path, pin_dir).unwrap_err()).contains("whose state file"));
    }

    #[test]
    fn the_state_file_is_0600_in_a_0700_directory() {
        let tmp = scratch("mode");
        let dir = tmp.path().join("run");
        // An existing directory that is too open is made private.
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        let path = write(&dir, Path::new("/pins/lb"), &sample()).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&path), 0o600);
        // Also when a file of another mode was there before.
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        write(&dir, Path::new("/pins/lb"), &sample()).unwrap();
        assert_eq!(mode(&path), 0o600);
    }

    #[test]
    fn one_lock_per_pin_path_naming_its_holder() {
        let tmp = scratch("lock");
        let dir = tmp.path().join("run");
        let pin_dir = Path::new("/pins/lb");
        let held = lock(&dir, pin_dir).unwrap();
        let path = lock_path_in(&dir, pin_dir);
        assert_eq!(
            fs::read_to_string(&path).unwrap(),
            format!("{}\n", std::process::id())
        );
        // flock locks belong to the open file: a second open, even in this process, is refused.
        let e = format!("{:#}", lock(&dir, pin_dir).unwrap_err());
        assert!(
            e.contains(&format!(
                "another lb-agent (pid {}) runs on agent.pin_path /pins/lb",
                std::process::id()
            )),
            "{e}"
        );
        // Another pin path has its own lock.
        let other = lock(&dir, Path::new("/pins/other")).unwrap();
        drop(held);
        assert!(!path.exists(), "the lock file goes with the lock");
        let again = lock(&dir, pin_dir).unwrap();
        drop((again, other));
    }
}
