//! A device id that stays the same for every run of an app on one install (protocol.md,
//! section 15.1), kept in a file of the app's choosing.

use std::io;
use std::path::Path;

use crate::proto::device::valid_device;

/// The device id kept in `path`: read back when the file holds one, otherwise a new
/// random one (32 hex digits) written there first (through a temporary file and a rename,
/// so a crash never leaves half an id). Put the file where the app keeps its own data:
/// a reinstall that clears it makes a new device, which starts from what its user's inbox
/// still holds.
pub fn device_id_in(path: &Path) -> io::Result<String> {
    match std::fs::read_to_string(path) {
        Ok(text) if valid_device(text.trim()) => return Ok(text.trim().to_owned()),
        Ok(_) => {} // damaged: make a new one
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut rng = crate::rand::Rng::from_entropy();
    let id = format!("{:016x}{:016x}", rng.next_u64(), rng.next_u64());
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{id}\n"))?;
    std::fs::rename(&tmp, path)?;
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_is_made_once_and_read_back_after() {
        let dir = std::env::temp_dir().join(format!("imrelay-device-id-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("device");
        let _ = std::fs::remove_file(&path);
        let first = device_id_in(&path).unwrap();
        assert_eq!(first.len(), 32);
        assert!(valid_device(&first));
        assert_eq!(device_id_in(&path).unwrap(), first, "the same id every run");
        std::fs::write(&path, "\n").unwrap();
        let fresh = device_id_in(&path).unwrap();
        assert_ne!(fresh, first, "a damaged file gets a new id");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
