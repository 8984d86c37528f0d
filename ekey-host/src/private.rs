//! Files only their owner may read: mode 0600 (directories 0700) on Unix.
//! Windows has no modes; there these files get the default ACL of the
//! folder they are made in (a user's profile is private to that user).

use std::fs::{DirBuilder, File, Metadata, OpenOptions};
use std::io;

/// A recursive [`DirBuilder`] making owner-only (0700) directories.
pub fn dir_builder() -> DirBuilder {
    let mut b = DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        b.mode(0o700);
    }
    b
}

/// [`OpenOptions`] for writing that create files owner-only (0600).
pub fn write_options() -> OpenOptions {
    let mut o = OpenOptions::new();
    o.write(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(0o600);
    }
    o
}

/// Makes `file` owner-only (0600) whatever the umask; nothing on Windows.
pub fn set_private(file: &File) -> io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
    }
    #[cfg(not(unix))]
    {
        let _ = file;
        Ok(())
    }
}

/// The permission bits (`mode & 0o7777`); `None` where there are none.
pub fn mode(meta: &Metadata) -> Option<u32> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        Some(meta.permissions().mode() & 0o7777)
    }
    #[cfg(not(unix))]
    {
        let _ = meta;
        None
    }
}
