//! The bytes of a state file: header, trailer, and the errors that refuse a file.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

pub const MAGIC: &[u8; 8] = b"FERRYSAV";
pub const TRAILER_MAGIC: &[u8; 8] = b"FERRYEND";
/// The version this agent writes and reads: its trailer carries a MAC.
pub const FORMAT_VERSION: u16 = 2;
/// The first version, without a MAC: refused ([`StateFileError::Unsigned`]).
pub const UNSIGNED_VERSION: u16 = 1;
/// Fixed part of the header.
pub(crate) const FIXED: usize = 16;
/// The trailer's size.
pub const TRAILER: usize = 96;
pub(crate) const MAC_LEN: usize = 32;
/// Largest meta block accepted (the domain XML is at most 64 KiB).
pub const MAX_META: u32 = 256 * 1024;

/// How the stream is compressed in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
    Xz,
}

impl Compression {
    pub const ALL: [Compression; 4] = [
        Compression::None,
        Compression::Gzip,
        Compression::Zstd,
        Compression::Xz,
    ];

    pub(crate) fn byte(self) -> u8 {
        match self {
            Compression::None => 0,
            Compression::Gzip => 1,
            Compression::Zstd => 2,
            Compression::Xz => 3,
        }
    }

    fn from_byte(b: u8) -> Option<Compression> {
        Compression::ALL.into_iter().find(|c| c.byte() == b)
    }
}

impl From<ferry_crds::SaveCompression> for Compression {
    fn from(c: ferry_crds::SaveCompression) -> Self {
        match c {
            ferry_crds::SaveCompression::None => Compression::None,
            ferry_crds::SaveCompression::Gzip => Compression::Gzip,
            ferry_crds::SaveCompression::Zstd => Compression::Zstd,
            ferry_crds::SaveCompression::Xz => Compression::Xz,
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Who and what the file holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Meta {
    /// The domain name.
    pub vm: String,
    pub uuid: uuid::Uuid,
    /// The definition the guest ran with: a restore must be ABI-compatible with it.
    #[serde(rename = "domainXML")]
    pub domain_xml: String,
    pub qemu_version: String,
    /// The node that saved it.
    pub node: String,
    /// When the save started, in milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
}

/// Why a state file is refused.
#[derive(Debug, thiserror::Error)]
pub enum StateFileError {
    #[error("saved state {path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        source: io::Error,
    },
    #[error("saved state {path} is not a Ferry saved-state file (bad magic)")]
    WrongMagic { path: PathBuf },
    #[error(
        "saved state {path} has format version {found}; this agent reads version {FORMAT_VERSION}"
    )]
    UnsupportedVersion { path: PathBuf, found: u16 },
    #[error(
        "saved state {path} has format version {UNSIGNED_VERSION}, which carries no MAC: only a \
         file an agent of this cluster signed (version {FORMAT_VERSION}) is restored, so a file \
         anyone could have written never reaches QEMU (restore it with the Ferry release that \
         saved it, and save the guest again)"
    )]
    Unsigned { path: PathBuf },
    #[error(
        "saved state {path} has no valid MAC: {why}; only a file an agent of this cluster \
         wrote and signed with the cluster's state key is restored"
    )]
    BadMac { path: PathBuf, why: String },
    #[error("saved state {path} names an unknown compression (byte {found})")]
    UnknownCompression { path: PathBuf, found: u8 },
    #[error("saved state {path} is truncated: {what}")]
    Truncated { path: PathBuf, what: String },
    #[error("saved state {path} is corrupted: {what}")]
    Corrupted { path: PathBuf, what: String },
    #[error(
        "saved state {path}: its {compression} stream inflates beyond the {declared} bytes its \
         trailer declares; decompression was stopped there"
    )]
    Oversized {
        path: PathBuf,
        compression: Compression,
        declared: u64,
    },
    #[error(
        "saved state {path}: its {compression} stream needs more than the decoder's limit: {what}"
    )]
    DecoderLimit {
        path: PathBuf,
        compression: Compression,
        what: String,
    },
    #[error("saved state {path} holds VM '{found_vm}' ({found_uuid}), not '{vm}' ({uuid})")]
    WrongVm {
        path: PathBuf,
        vm: String,
        uuid: uuid::Uuid,
        found_vm: String,
        found_uuid: uuid::Uuid,
    },
}

impl StateFileError {
    /// A short, stable label per kind (condition reasons, metrics).
    pub fn label(&self) -> &'static str {
        match self {
            StateFileError::Io { .. } => "Unreadable",
            StateFileError::WrongMagic { .. } => "NotAStateFile",
            StateFileError::UnsupportedVersion { .. } => "UnsupportedVersion",
            StateFileError::Unsigned { .. } => "Unsigned",
            StateFileError::BadMac { .. } => "BadMac",
            StateFileError::UnknownCompression { .. } => "UnknownCompression",
            StateFileError::Truncated { .. } => "Truncated",
            StateFileError::Corrupted { .. } => "Corrupted",
            StateFileError::Oversized { .. } => "Oversized",
            StateFileError::DecoderLimit { .. } => "DecoderLimit",
            StateFileError::WrongVm { .. } => "WrongVM",
        }
    }
}

pub(crate) fn io_err(path: &Path, what: &'static str) -> impl FnOnce(io::Error) -> StateFileError {
    let path = path.to_path_buf();
    move |source| StateFileError::Io { path, what, source }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn header_bytes(compression: Compression, meta: &Meta) -> Vec<u8> {
    let meta = serde_json::to_vec(meta).expect("meta always serializes");
    let mut h = Vec::with_capacity(FIXED + meta.len());
    h.extend_from_slice(MAGIC);
    h.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    h.push(compression.byte());
    h.push(0);
    h.extend_from_slice(&(meta.len() as u32).to_le_bytes());
    h.extend_from_slice(&meta);
    h
}

/// The trailer: `FERRYEND`, payload length, stream length, SHA-256, key id, MAC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Trailer {
    pub payload_len: u64,
    pub stream_bytes: u64,
    pub sha: [u8; 32],
    pub key_id: [u8; 8],
    pub mac: [u8; MAC_LEN],
}

impl Trailer {
    /// The bytes the MAC covers (after the header and payload).
    pub fn signed_bytes(&self) -> Vec<u8> {
        let mut t = Vec::with_capacity(TRAILER);
        t.extend_from_slice(TRAILER_MAGIC);
        t.extend_from_slice(&self.payload_len.to_le_bytes());
        t.extend_from_slice(&self.stream_bytes.to_le_bytes());
        t.extend_from_slice(&self.sha);
        t.extend_from_slice(&self.key_id);
        t
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut t = self.signed_bytes();
        t.extend_from_slice(&self.mac);
        t
    }
}

/// Header and trailer of a file, read without its payload, unauthenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Frame {
    pub compression: Compression,
    /// The header's bytes (fixed part and meta block).
    pub header: Vec<u8>,
    pub trailer: Trailer,
    pub file_bytes: u64,
}

impl Frame {
    pub fn header_len(&self) -> u64 {
        self.header.len() as u64
    }

    /// The meta block, parsed (after the MAC was checked).
    pub fn meta(&self, path: &Path) -> Result<Meta, StateFileError> {
        serde_json::from_slice(&self.header[FIXED..]).map_err(|e| StateFileError::Corrupted {
            path: path.to_path_buf(),
            what: format!("header block: {e}"),
        })
    }
}

/// Reads header and trailer of `file` (whose path is `path`), checking their structure.
pub(crate) fn read_frame(mut file: &File, path: &Path) -> Result<Frame, StateFileError> {
    let truncated = |what: &str| StateFileError::Truncated {
        path: path.to_path_buf(),
        what: what.to_string(),
    };
    let corrupted = |what: String| StateFileError::Corrupted {
        path: path.to_path_buf(),
        what,
    };
    let len = file
        .metadata()
        .map_err(io_err(path, "reading its size"))?
        .len();
    file.rewind()
        .map_err(io_err(path, "seeking to the header"))?;
    let mut fixed = [0u8; FIXED];
    if len < FIXED as u64 {
        file.read_exact(&mut fixed[..len as usize])
            .map_err(io_err(path, "reading the header"))?;
        if !MAGIC.starts_with(&fixed[..(len as usize).min(8)]) {
            return Err(StateFileError::WrongMagic {
                path: path.to_path_buf(),
            });
        }
        return Err(truncated("shorter than its header"));
    }
    file.read_exact(&mut fixed)
        .map_err(io_err(path, "reading the header"))?;
    if &fixed[..8] != MAGIC {
        return Err(StateFileError::WrongMagic {
            path: path.to_path_buf(),
        });
    }
    match u16::from_le_bytes([fixed[8], fixed[9]]) {
        FORMAT_VERSION => {}
        UNSIGNED_VERSION => {
            return Err(StateFileError::Unsigned {
                path: path.to_path_buf(),
            });
        }
        found => {
            return Err(StateFileError::UnsupportedVersion {
                path: path.to_path_buf(),
                found,
            });
        }
    }
    let compression =
        Compression::from_byte(fixed[10]).ok_or(StateFileError::UnknownCompression {
            path: path.to_path_buf(),
            found: fixed[10],
        })?;
    let meta_len = u32::from_le_bytes(fixed[12..16].try_into().expect("4 bytes"));
    if meta_len > MAX_META {
        return Err(corrupted(format!(
            "header block of {meta_len} bytes is over the limit of {MAX_META}"
        )));
    }
    let header_len = FIXED as u64 + meta_len as u64;
    if len < header_len + TRAILER as u64 {
        return Err(truncated(&format!(
            "{len} bytes, shorter than its header and trailer"
        )));
    }
    let mut header = fixed.to_vec();
    header.resize(header_len as usize, 0);
    file.read_exact(&mut header[FIXED..])
        .map_err(io_err(path, "reading the header"))?;
    let mut t = [0u8; TRAILER];
    file.seek(SeekFrom::Start(len - TRAILER as u64))
        .and_then(|_| file.read_exact(&mut t))
        .map_err(io_err(path, "reading the trailer"))?;
    if &t[..8] != TRAILER_MAGIC {
        return Err(truncated(
            "no trailer at its end (the save did not finish, or the file was cut)",
        ));
    }
    let trailer = Trailer {
        payload_len: u64::from_le_bytes(t[8..16].try_into().expect("8 bytes")),
        stream_bytes: u64::from_le_bytes(t[16..24].try_into().expect("8 bytes")),
        sha: t[24..56].try_into().expect("32 bytes"),
        key_id: t[56..64].try_into().expect("8 bytes"),
        mac: t[64..96].try_into().expect("32 bytes"),
    };
    if header_len
        .checked_add(trailer.payload_len)
        .and_then(|l| l.checked_add(TRAILER as u64))
        != Some(len)
    {
        return Err(corrupted(format!(
            "its trailer gives {} payload bytes, but the file has {}",
            trailer.payload_len,
            len.saturating_sub(header_len + TRAILER as u64)
        )));
    }
    if compression == Compression::None && trailer.stream_bytes != trailer.payload_len {
        return Err(corrupted(format!(
            "an uncompressed stream of {} bytes in {} payload bytes",
            trailer.stream_bytes, trailer.payload_len
        )));
    }
    Ok(Frame {
        compression,
        header,
        trailer,
        file_bytes: len,
    })
}
