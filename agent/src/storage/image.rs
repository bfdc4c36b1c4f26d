//! A disk image's header against its declared format.
//!
//! QEMU opens more than the file it is given when a qcow2 says so: a backing file
//! (header fields `backing_file_offset`, `backing_file_size`) or an external data file
//! (incompatible feature bit 2 of a version 3 header, the path in a header extension).
//! Those paths are written by whoever wrote the image, that is by the tenant or their
//! guest, so such an image is refused. A raw disk that starts with a qcow2 header is
//! refused too: read as qcow2 anywhere (a probing tool, a later format change) it would
//! name files of its guest's choosing.
//!
//! qcow2 header (big-endian; docs/interop/qcow2.txt in QEMU): magic `QFI\xfb` (0..4),
//! version (4..8), backing_file_offset u64 (8..16), backing_file_size u32 (16..20), ...,
//! and for version 3 incompatible_features u64 (72..80); the fixed part is 72 bytes in
//! version 2 and 104 in version 3.

use super::error::{Rule, StorageError};
use super::open::{Opened, io};
use std::fmt;
use std::str::FromStr;

const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";
/// The fixed part of a qcow2 header, by version.
const QCOW2_V2_HEADER: usize = 72;
const QCOW2_V3_HEADER: usize = 104;
/// Incompatible feature bit 2: the guest's data is in an external file the header names.
const EXTERNAL_DATA_FILE: u64 = 1 << 2;
/// How much of a file [`check_image`] reads: the header, and room for a backing file's
/// name (at most 1023 bytes, usually right after the header) for the message.
pub const HEADER_READ: usize = 4096;

/// A disk image format the domain XML may declare (`<driver type=...>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    Raw,
    Qcow2,
}

impl fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
        })
    }
}

/// A format the agent does not know.
#[derive(Debug, thiserror::Error)]
#[error("unknown disk format {0:?} (supported: raw, qcow2)")]
pub struct UnknownFormat(pub String);

impl FromStr for ImageFormat {
    type Err = UnknownFormat;

    fn from_str(s: &str) -> Result<ImageFormat, UnknownFormat> {
        match s {
            "raw" => Ok(ImageFormat::Raw),
            "qcow2" => Ok(ImageFormat::Qcow2),
            _ => Err(UnknownFormat(s.to_string())),
        }
    }
}

/// Reads the start of `image` and checks it with [`check_header`].
pub fn check_image(image: &Opened, declared: ImageFormat) -> Result<(), StorageError> {
    let refuse = |rule| StorageError::new(image.user_path(), rule);
    let mut header = vec![0u8; HEADER_READ];
    let mut len = 0;
    while len < header.len() {
        let n = nix::sys::uio::pread(image.fd(), &mut header[len..], len as i64)
            .map_err(io("reading its header"))
            .map_err(refuse)?;
        if n == 0 {
            break;
        }
        len += n;
    }
    check_header(declared, &header[..len]).map_err(refuse)
}

/// Checks the first bytes of an image (up to [`HEADER_READ`], fewer for a short file)
/// against the declared format: a qcow2 header only when qcow2 is declared, and then one
/// of version 2 or 3 that names no backing file and no external data file.
pub fn check_header(declared: ImageFormat, header: &[u8]) -> Result<(), Rule> {
    let is_qcow2 = header.starts_with(QCOW2_MAGIC);
    match (declared, is_qcow2) {
        (ImageFormat::Raw, false) => Ok(()),
        (ImageFormat::Raw, true) => Err(Rule::Qcow2DeclaredRaw),
        (ImageFormat::Qcow2, false) => Err(Rule::NotQcow2),
        (ImageFormat::Qcow2, true) => check_qcow2(header),
    }
}

fn check_qcow2(h: &[u8]) -> Result<(), Rule> {
    let truncated = || Rule::TruncatedHeader(h.len());
    let version = be_u32(h, 4).ok_or_else(truncated)?;
    let fixed = match version {
        2 => QCOW2_V2_HEADER,
        3 => QCOW2_V3_HEADER,
        v => return Err(Rule::Qcow2Version(v)),
    };
    if h.len() < fixed {
        return Err(truncated());
    }
    let backing_offset = be_u64(h, 8).ok_or_else(truncated)?;
    let backing_size = be_u32(h, 16).ok_or_else(truncated)?;
    if backing_offset != 0 || backing_size != 0 {
        return Err(Rule::BackingFile(backing_name(
            h,
            backing_offset,
            backing_size,
        )));
    }
    if version == 3 && be_u64(h, 72).ok_or_else(truncated)? & EXTERNAL_DATA_FILE != 0 {
        return Err(Rule::ExternalDataFile);
    }
    Ok(())
}

/// The backing file's name, if it lies in the bytes read (for the message only).
fn backing_name(h: &[u8], offset: u64, size: u32) -> Option<String> {
    let start = usize::try_from(offset).ok()?;
    let end = start.checked_add(usize::try_from(size).ok()?)?;
    let name = h
        .get(start..end)
        .filter(|n| !n.is_empty() && n.len() <= 1023)?;
    Some(String::from_utf8_lossy(name).into_owned())
}

fn be_u32(h: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(h.get(at..at + 4)?.try_into().ok()?))
}

fn be_u64(h: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(h.get(at..at + 8)?.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ImageFormat::{Qcow2, Raw};

    /// A minimal qcow2 header (the fixed part; cluster size 64 KiB, 1 GiB), optionally
    /// followed by a backing file name.
    fn qcow2_header(version: u32, backing: Option<&str>, incompatible: u64) -> Vec<u8> {
        let fixed = if version == 2 {
            QCOW2_V2_HEADER
        } else {
            QCOW2_V3_HEADER
        };
        let mut h = vec![0u8; fixed];
        h[0..4].copy_from_slice(QCOW2_MAGIC);
        h[4..8].copy_from_slice(&version.to_be_bytes());
        h[20..24].copy_from_slice(&16u32.to_be_bytes()); // cluster_bits
        h[24..32].copy_from_slice(&(1u64 << 30).to_be_bytes()); // size: 1 GiB
        if version >= 3 {
            h[72..80].copy_from_slice(&incompatible.to_be_bytes());
            h[96..100].copy_from_slice(&4u32.to_be_bytes()); // refcount_order
            h[100..104].copy_from_slice(&(QCOW2_V3_HEADER as u32).to_be_bytes());
        }
        if let Some(name) = backing {
            let offset = h.len() as u64;
            h[8..16].copy_from_slice(&offset.to_be_bytes());
            h[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
            h.extend_from_slice(name.as_bytes());
        }
        h
    }

    #[test]
    fn raw_is_anything_but_a_qcow2_header() {
        assert!(check_header(Raw, b"").is_ok());
        assert!(check_header(Raw, b"QFI").is_ok());
        assert!(check_header(Raw, &[0u8; 512]).is_ok());
        let err = check_header(Raw, &qcow2_header(3, None, 0)).unwrap_err();
        assert!(matches!(err, Rule::Qcow2DeclaredRaw));
        assert_eq!(
            err.to_string(),
            "declared raw but starts with a qcow2 header (refused: format confusion)"
        );
        // Even a header cut short after the magic.
        assert!(matches!(
            check_header(Raw, QCOW2_MAGIC),
            Err(Rule::Qcow2DeclaredRaw)
        ));
    }

    #[test]
    fn a_plain_qcow2_passes() {
        assert!(check_header(Qcow2, &qcow2_header(2, None, 0)).is_ok());
        assert!(check_header(Qcow2, &qcow2_header(3, None, 0)).is_ok());
        // Other incompatible features (dirty bit, corrupt bit) are QEMU's business.
        assert!(check_header(Qcow2, &qcow2_header(3, None, 0b11)).is_ok());
    }

    #[test]
    fn declared_qcow2_needs_a_qcow2_header() {
        let err = check_header(Qcow2, &[0u8; 512]).unwrap_err();
        assert_eq!(err.to_string(), "declared qcow2 but has no qcow2 header");
        assert!(matches!(check_header(Qcow2, b""), Err(Rule::NotQcow2)));
    }

    #[test]
    fn a_backing_file_is_refused() {
        for version in [2, 3] {
            let h = qcow2_header(version, Some("/etc/shadow"), 0);
            let err = check_header(Qcow2, &h).unwrap_err();
            assert_eq!(
                err.to_string(),
                "a qcow2 with a backing file (\"/etc/shadow\")"
            );
        }
        // A name beyond the bytes read is refused all the same, without the name.
        let mut h = qcow2_header(3, None, 0);
        h[8..16].copy_from_slice(&65536u64.to_be_bytes());
        h[16..20].copy_from_slice(&10u32.to_be_bytes());
        let err = check_header(Qcow2, &h).unwrap_err();
        assert!(matches!(err, Rule::BackingFile(None)));
        assert_eq!(err.to_string(), "a qcow2 with a backing file");
        // A size without an offset: QEMU would ignore it; refused as a backing file too.
        let mut h = qcow2_header(3, None, 0);
        h[16..20].copy_from_slice(&4u32.to_be_bytes());
        assert!(matches!(check_header(Qcow2, &h), Err(Rule::BackingFile(_))));
    }

    #[test]
    fn an_external_data_file_is_refused() {
        let h = qcow2_header(3, None, EXTERNAL_DATA_FILE);
        let err = check_header(Qcow2, &h).unwrap_err();
        assert_eq!(err.to_string(), "a qcow2 with an external data file");
    }

    #[test]
    fn odd_headers_are_refused() {
        let mut h = qcow2_header(3, None, 0);
        h[4..8].copy_from_slice(&4u32.to_be_bytes());
        assert_eq!(
            check_header(Qcow2, &h).unwrap_err().to_string(),
            "a qcow2 of version 4 (versions 2 and 3 are supported)"
        );
        let h = qcow2_header(3, None, 0);
        for len in [4, 6, 20, 80, 103] {
            let err = check_header(Qcow2, &h[..len]).unwrap_err();
            assert!(
                matches!(err, Rule::TruncatedHeader(n) if n == len),
                "{len}: {err}"
            );
        }
        assert!(check_header(Qcow2, &qcow2_header(2, None, 0)[..72]).is_ok());
    }

    #[test]
    fn formats_parse_as_the_domain_writes_them() {
        assert_eq!("raw".parse::<ImageFormat>().unwrap(), Raw);
        assert_eq!("qcow2".parse::<ImageFormat>().unwrap(), Qcow2);
        assert_eq!(Qcow2.to_string(), "qcow2");
        assert!("vmdk".parse::<ImageFormat>().is_err());
    }
}
