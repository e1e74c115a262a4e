//! Minimal pcap writer: a failing fixture leaves its input and output for Wireshark.

use std::{fs, io::Write, path::PathBuf};

/// Writes `frames` to `target/fixture-failures/<name>.pcap` and returns the path.
pub fn write(name: &str, frames: &[&[u8]]) -> std::io::Result<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/fixture-failures");
    fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{name}.pcap"));
    let mut f = fs::File::create(&path)?;
    // Global header: magic, v2.4, tz 0, sigfigs 0, snaplen 65535, linktype 1 (Ethernet).
    f.write_all(&0xa1b2c3d4u32.to_le_bytes())?;
    f.write_all(&2u16.to_le_bytes())?;
    f.write_all(&4u16.to_le_bytes())?;
    f.write_all(&[0; 8])?;
    f.write_all(&65535u32.to_le_bytes())?;
    f.write_all(&1u32.to_le_bytes())?;
    for (i, frame) in frames.iter().enumerate() {
        f.write_all(&(i as u32).to_le_bytes())?;
        f.write_all(&0u32.to_le_bytes())?;
        f.write_all(&(frame.len() as u32).to_le_bytes())?;
        f.write_all(&(frame.len() as u32).to_le_bytes())?;
        f.write_all(frame)?;
    }
    Ok(path)
}
