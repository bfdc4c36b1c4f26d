//! The saved-state file: a guest's QEMU migration stream behind a small header that lets
//! an agent check the file before it starts any QEMU.
//!
//! Layout (integers little-endian):
//!
//! | part | bytes | what |
//! | --- | --- | --- |
//! | magic | 8 | `FERRYSAV` |
//! | version | 2 | [`FORMAT_VERSION`] |
//! | compression | 1 | 0 none, 1 gzip, 2 zstd, 3 xz |
//! | reserved | 1 | 0 |
//! | meta length | 4 | at most [`MAX_META`] |
//! | meta | meta length | JSON [`Meta`]: VM name, uuid, domain XML, QEMU version, node, time |
//! | payload | any | the migration stream, compressed |
//! | trailer magic | 8 | `FERRYEND` |
//! | payload length | 8 | compressed bytes |
//! | stream length | 8 | uncompressed bytes |
//! | SHA-256 | 32 | over the header bytes, then the uncompressed stream |
//!
//! The trailer is written last, so a save that stopped half-way leaves a file without
//! one. This module reads and writes open files only: where a file may be, how it is
//! opened, and how a save's temporary file is put in place are [`crate::storage`]'s
//! (beneath the node's storage roots). [`write()`] fills a new file and fsyncs it.
//! [`verify`] reads the whole file (a pre-pass that decompresses and hashes the stream)
//! and refuses a truncated, corrupted, foreign or unknown file with a
//! [`StateFileError`] that names the problem; [`stream`] then feeds the verified stream
//! from the same open file to QEMU, hashing it again in case the file changed in
//! between.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fmt;
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

pub const MAGIC: &[u8; 8] = b"FERRYSAV";
pub const TRAILER_MAGIC: &[u8; 8] = b"FERRYEND";
pub const FORMAT_VERSION: u16 = 1;
/// Fixed part of the header.
const FIXED: usize = 16;
/// The trailer's size.
pub const TRAILER: usize = 56;
/// Largest meta block accepted (the domain XML is at most 64 KiB).
pub const MAX_META: u32 = 256 * 1024;
const CHUNK: usize = 1 << 20;

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

    fn byte(self) -> u8 {
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
    #[error("saved state {path} names an unknown compression (byte {found})")]
    UnknownCompression { path: PathBuf, found: u8 },
    #[error("saved state {path} is truncated: {what}")]
    Truncated { path: PathBuf, what: String },
    #[error("saved state {path} is corrupted: {what}")]
    Corrupted { path: PathBuf, what: String },
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
            StateFileError::UnknownCompression { .. } => "UnknownCompression",
            StateFileError::Truncated { .. } => "Truncated",
            StateFileError::Corrupted { .. } => "Corrupted",
            StateFileError::WrongVm { .. } => "WrongVM",
        }
    }
}

fn io_err(path: &Path, what: &'static str) -> impl FnOnce(io::Error) -> StateFileError {
    let path = path.to_path_buf();
    move |source| StateFileError::Io { path, what, source }
}

/// What a finished write produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Written {
    /// Uncompressed stream bytes.
    pub stream_bytes: u64,
    /// The whole file's size.
    pub file_bytes: u64,
    /// Hex SHA-256 of the header and stream.
    pub sha256: String,
}

fn header_bytes(compression: Compression, meta: &Meta) -> Vec<u8> {
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

enum Encoder<W: Write> {
    None(W),
    Gzip(flate2::write::GzEncoder<W>),
    Zstd(zstd::stream::write::Encoder<'static, W>),
    Xz(liblzma::write::XzEncoder<W>),
}

impl<W: Write> Encoder<W> {
    /// Each tool's default level: gzip 6, zstd 3, xz 6.
    fn new(c: Compression, w: W) -> io::Result<Self> {
        Ok(match c {
            Compression::None => Encoder::None(w),
            Compression::Gzip => Encoder::Gzip(flate2::write::GzEncoder::new(
                w,
                flate2::Compression::default(),
            )),
            Compression::Zstd => Encoder::Zstd(zstd::stream::write::Encoder::new(w, 3)?),
            Compression::Xz => Encoder::Xz(liblzma::write::XzEncoder::new(w, 6)),
        })
    }

    fn finish(self) -> io::Result<W> {
        match self {
            Encoder::None(w) => Ok(w),
            Encoder::Gzip(e) => e.finish(),
            Encoder::Zstd(e) => e.finish(),
            Encoder::Xz(e) => e.finish(),
        }
    }
}

impl<W: Write> Write for Encoder<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Encoder::None(w) => w.write(buf),
            Encoder::Gzip(e) => e.write(buf),
            Encoder::Zstd(e) => e.write(buf),
            Encoder::Xz(e) => e.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Encoder::None(w) => w.flush(),
            Encoder::Gzip(e) => e.flush(),
            Encoder::Zstd(e) => e.flush(),
            Encoder::Xz(e) => e.flush(),
        }
    }
}

fn decoder<'a, R: Read + 'a>(c: Compression, r: R) -> io::Result<Box<dyn Read + 'a>> {
    Ok(match c {
        Compression::None => Box::new(r),
        Compression::Gzip => Box::new(flate2::read::GzDecoder::new(r)),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(r)?),
        Compression::Xz => Box::new(liblzma::read::XzDecoder::new(r)),
    })
}

/// Writes `stream` (read to its end) compressed into `file`, a new, empty file (the
/// temporary file of a save, [`crate::storage::create_save`]), with header and trailer,
/// and fsyncs it. `path` is the save's path, for messages. Blocking: run it on a
/// blocking thread.
pub fn write(
    file: File,
    path: &Path,
    compression: Compression,
    meta: &Meta,
    mut stream: impl Read,
) -> Result<Written, StateFileError> {
    let header = header_bytes(compression, meta);
    let mut out = BufWriter::with_capacity(CHUNK, file);
    out.write_all(&header)
        .map_err(io_err(path, "writing the header"))?;
    let mut hash = Sha256::new();
    hash.update(&header);
    let mut enc =
        Encoder::new(compression, out).map_err(io_err(path, "starting the compressor"))?;
    let mut buf = vec![0u8; CHUNK];
    let mut stream_bytes = 0u64;
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err(path, "reading the migration stream")(e)),
        };
        hash.update(&buf[..n]);
        enc.write_all(&buf[..n])
            .map_err(io_err(path, "writing the stream"))?;
        stream_bytes += n as u64;
    }
    let mut out = enc
        .finish()
        .map_err(io_err(path, "finishing the compressor"))?;
    out.flush().map_err(io_err(path, "writing the stream"))?;
    let end = out
        .stream_position()
        .map_err(io_err(path, "writing the stream"))?;
    let payload = end - header.len() as u64;
    let sha: [u8; 32] = hash.finalize().into();
    let mut trailer = Vec::with_capacity(TRAILER);
    trailer.extend_from_slice(TRAILER_MAGIC);
    trailer.extend_from_slice(&payload.to_le_bytes());
    trailer.extend_from_slice(&stream_bytes.to_le_bytes());
    trailer.extend_from_slice(&sha);
    out.write_all(&trailer)
        .map_err(io_err(path, "writing the trailer"))?;
    let file = out
        .into_inner()
        .map_err(|e| io_err(path, "writing the trailer")(e.into_error()))?;
    file.sync_all().map_err(io_err(path, "syncing"))?;
    Ok(Written {
        stream_bytes,
        file_bytes: end + TRAILER as u64,
        sha256: hex(&sha),
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The VM a file must hold.
#[derive(Debug, Clone, Copy)]
pub struct Expect<'a> {
    pub vm: &'a str,
    pub uuid: uuid::Uuid,
}

/// A file [`verify`] accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub path: PathBuf,
    pub compression: Compression,
    pub meta: Meta,
    header_len: u64,
    payload_len: u64,
    pub stream_bytes: u64,
    pub file_bytes: u64,
    sha: [u8; 32],
}

/// Reads header and trailer of `file` (whose path is `path`), without the payload.
fn read_frame(mut file: &File, path: &Path) -> Result<(Verified, Vec<u8>), StateFileError> {
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
    let version = u16::from_le_bytes([fixed[8], fixed[9]]);
    if version != FORMAT_VERSION {
        return Err(StateFileError::UnsupportedVersion {
            path: path.to_path_buf(),
            found: version,
        });
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
    let meta: Meta = serde_json::from_slice(&header[FIXED..])
        .map_err(|e| corrupted(format!("header block: {e}")))?;
    let mut trailer = [0u8; TRAILER];
    file.seek(SeekFrom::Start(len - TRAILER as u64))
        .and_then(|_| file.read_exact(&mut trailer))
        .map_err(io_err(path, "reading the trailer"))?;
    if &trailer[..8] != TRAILER_MAGIC {
        return Err(truncated(
            "no trailer at its end (the save did not finish, or the file was cut)",
        ));
    }
    let payload_len = u64::from_le_bytes(trailer[8..16].try_into().expect("8 bytes"));
    let stream_bytes = u64::from_le_bytes(trailer[16..24].try_into().expect("8 bytes"));
    let sha: [u8; 32] = trailer[24..56].try_into().expect("32 bytes");
    if header_len
        .checked_add(payload_len)
        .and_then(|l| l.checked_add(TRAILER as u64))
        != Some(len)
    {
        return Err(corrupted(format!(
            "its trailer gives {payload_len} payload bytes, but the file has {}",
            len.saturating_sub(header_len + TRAILER as u64)
        )));
    }
    let v = Verified {
        path: path.to_path_buf(),
        compression,
        meta,
        header_len,
        payload_len,
        stream_bytes,
        file_bytes: len,
        sha,
    };
    Ok((v, header))
}

/// Decompresses the payload of `v` from `file` into `out`, hashing it after `header`;
/// checks length and checksum at the end.
fn pump(
    mut file: &File,
    v: &Verified,
    header: &[u8],
    out: &mut dyn Write,
    out_what: &'static str,
) -> Result<u64, StateFileError> {
    let path = v.path.as_path();
    file.seek(SeekFrom::Start(v.header_len))
        .map_err(io_err(path, "seeking to the stream"))?;
    let payload = BufReader::with_capacity(CHUNK, file.take(v.payload_len));
    let mut dec = decoder(v.compression, payload).map_err(|e| StateFileError::Corrupted {
        path: path.to_path_buf(),
        what: format!("{} stream: {e}", v.compression),
    })?;
    let mut hash = Sha256::new();
    hash.update(header);
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        let n = match dec.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(StateFileError::Corrupted {
                    path: path.to_path_buf(),
                    what: format!("{} stream: {e}", v.compression),
                });
            }
        };
        total += n as u64;
        if total > v.stream_bytes {
            return Err(StateFileError::Corrupted {
                path: path.to_path_buf(),
                what: format!(
                    "the stream is longer than the {} bytes its trailer gives",
                    v.stream_bytes
                ),
            });
        }
        hash.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(io_err(path, out_what))?;
    }
    if total != v.stream_bytes {
        return Err(StateFileError::Corrupted {
            path: path.to_path_buf(),
            what: format!(
                "the stream has {total} bytes, its trailer says {}",
                v.stream_bytes
            ),
        });
    }
    let sha: [u8; 32] = hash.finalize().into();
    if sha != v.sha {
        return Err(StateFileError::Corrupted {
            path: path.to_path_buf(),
            what: format!(
                "checksum mismatch (SHA-256 {} computed, {} recorded)",
                hex(&sha),
                hex(&v.sha)
            ),
        });
    }
    Ok(total)
}

/// Checks the whole of `file`, opened from `path` (named in messages): magic, version,
/// compression, the VM it holds, the trailer, and the stream's length and SHA-256 (it
/// decompresses the stream once). Blocking.
pub fn verify(file: &File, path: &Path, expect: Expect<'_>) -> Result<Verified, StateFileError> {
    let (v, header) = read_frame(file, path)?;
    if v.meta.vm != expect.vm || v.meta.uuid != expect.uuid {
        return Err(StateFileError::WrongVm {
            path: path.to_path_buf(),
            vm: expect.vm.to_string(),
            uuid: expect.uuid,
            found_vm: v.meta.vm.clone(),
            found_uuid: v.meta.uuid,
        });
    }
    pump(file, &v, &header, &mut io::sink(), "hashing")?;
    Ok(v)
}

/// Writes the stream of `file`, which [`verify`] accepted as `v`, into `out` (QEMU's
/// pipe), checking it again on the way: an error at the end means the file changed
/// since. Blocking.
pub fn stream(file: &File, v: &Verified, out: &mut dyn Write) -> Result<u64, StateFileError> {
    let (again, header) = read_frame(file, &v.path)?;
    if again != *v {
        return Err(StateFileError::Corrupted {
            path: v.path.clone(),
            what: "the file changed since it was verified".into(),
        });
    }
    pump(file, v, &header, out, "writing to QEMU")
}

#[cfg(test)]
mod tests;
