//! The saved-state file: a guest's QEMU migration stream behind a small header that lets
//! an agent check the file before it starts any QEMU, and a MAC under the cluster's
//! state key that shows an agent of this cluster wrote it.
//!
//! Layout, format version 2 (integers little-endian):
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
//! | key id | 8 | [`StateKey::id`] of the key that signed it |
//! | MAC | 32 | HMAC-SHA256 under the state key over every byte before it ([`mac`]) |
//!
//! The trailer is written last, so a save that stopped half-way leaves a file without
//! one. Version 1 (the same without key id and MAC) is refused as
//! [`StateFileError::Unsigned`]: nothing shows who wrote such a file.
//!
//! This module reads and writes open files only: where a file may be, how it is opened,
//! and how a save's temporary file is put in place are [`crate::storage`]'s (beneath
//! the node's storage roots). [`write()`] fills a new file, signs and fsyncs it.
//! [`verify`] reads the whole file twice before any QEMU: first the raw bytes, to check
//! the MAC (a file this cluster's agents did not sign never reaches a decoder, nor
//! QEMU's loader), then decompressing and hashing the stream within the decoders'
//! limits ([`decode`]); it refuses a truncated, corrupted, unsigned, foreign or
//! unknown file with a [`StateFileError`] that names the problem. [`stream`] then feeds
//! the verified stream from the same open file to QEMU, checking MAC and SHA-256 again
//! in case the file changed in between.

pub mod craft;
mod decode;
mod format;
mod mac;

pub use decode::{XZ_MEMLIMIT, ZSTD_WINDOW_LOG_MAX};
pub use format::{
    Compression, FORMAT_VERSION, MAGIC, MAX_META, Meta, StateFileError, TRAILER, TRAILER_MAGIC,
    UNSIGNED_VERSION,
};
pub use mac::{KEY_LEN, KeyId, KeyLengthError, StateKey};

use decode::{CHUNK, Encoder, decoder, inflate, write_to};
use format::{Frame, Trailer, header_bytes, hex, io_err, read_frame};
use hmac::Mac as _;
use mac::{FileMac, MacReader};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// What a finished write produced.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Written {
    /// Uncompressed stream bytes.
    pub stream_bytes: u64,
    /// The whole file's size.
    pub file_bytes: u64,
    /// Hex SHA-256 of the header and stream: the file's identity.
    pub sha256: String,
}

/// A writer that adds what passes through it to a MAC.
struct MacWriter<'a, W> {
    inner: W,
    mac: &'a mut FileMac,
}

impl<W: Write> Write for MacWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.mac.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Writes `stream` (read to its end) compressed into `file`, a new, empty file (the
/// temporary file of a save, [`crate::storage::create_save`]), with header and trailer
/// signed with `key`, and fsyncs it. `path` is the save's path, for messages. Blocking:
/// run it on a blocking thread.
pub fn write(
    file: File,
    path: &Path,
    compression: Compression,
    meta: &Meta,
    key: &StateKey,
    mut stream: impl Read,
) -> Result<Written, StateFileError> {
    let header = header_bytes(compression, meta);
    let mut out = BufWriter::with_capacity(CHUNK, file);
    out.write_all(&header)
        .map_err(io_err(path, "writing the header"))?;
    let mut hash = Sha256::new();
    hash.update(&header);
    let mut mac = key.mac();
    mac.update(&header);
    let signed = MacWriter {
        inner: &mut out,
        mac: &mut mac,
    };
    let mut enc =
        Encoder::new(compression, signed).map_err(io_err(path, "starting the compressor"))?;
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
    enc.finish()
        .map_err(io_err(path, "finishing the compressor"))?;
    out.flush().map_err(io_err(path, "writing the stream"))?;
    let end = out
        .stream_position()
        .map_err(io_err(path, "writing the stream"))?;
    let mut trailer = Trailer {
        payload_len: end - header.len() as u64,
        stream_bytes,
        sha: hash.finalize().into(),
        key_id: key.id().0,
        mac: [0; 32],
    };
    mac.update(&trailer.signed_bytes());
    trailer.mac = mac::finish(mac);
    out.write_all(&trailer.to_bytes())
        .map_err(io_err(path, "writing the trailer"))?;
    let file = out
        .into_inner()
        .map_err(|e| io_err(path, "writing the trailer")(e.into_error()))?;
    file.sync_all().map_err(io_err(path, "syncing"))?;
    Ok(Written {
        stream_bytes,
        file_bytes: end + TRAILER as u64,
        sha256: hex(&trailer.sha),
    })
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
    pub stream_bytes: u64,
    pub file_bytes: u64,
    frame: Frame,
}

impl Verified {
    /// Hex SHA-256 of header and stream, as the trailer records it: the file's identity.
    pub fn sha256(&self) -> String {
        hex(&self.frame.trailer.sha)
    }
}

/// The SHA-256 (hex) that the trailer of `file` records, read without the payload and
/// not authenticated: enough to tell a file from another, not to trust it.
pub fn recorded_sha256(file: &File, path: &Path) -> Result<String, StateFileError> {
    Ok(hex(&read_frame(file, path)?.trailer.sha))
}

/// Decompresses the payload of `frame` from `file` into `out` (within the decoders'
/// limits), hashing it after the header; checks length and checksum at the end. With
/// `mac`, every payload byte is added to it (those the decoder did not need too).
fn pump(
    mut file: &File,
    frame: &Frame,
    path: &Path,
    out: &mut dyn Write,
    out_what: &'static str,
    mut mac: Option<&mut FileMac>,
) -> Result<u64, StateFileError> {
    let t = &frame.trailer;
    file.seek(SeekFrom::Start(frame.header_len()))
        .map_err(io_err(path, "seeking to the stream"))?;
    let mut raw = file.take(t.payload_len);
    let mut hash = Sha256::new();
    hash.update(&frame.header);
    let total = {
        let payload = BufReader::with_capacity(
            CHUNK,
            MacReader {
                inner: &mut raw,
                mac: mac.as_deref_mut(),
            },
        );
        let mut dec =
            decoder(frame.compression, payload).map_err(|e| StateFileError::Corrupted {
                path: path.to_path_buf(),
                what: format!("{} stream: {e}", frame.compression),
            })?;
        inflate(
            &mut *dec,
            frame.compression,
            t.stream_bytes,
            path,
            |chunk| {
                hash.update(chunk);
                write_to(out, chunk, path, out_what)
            },
        )?
    };
    if let Some(mac) = mac {
        let mut rest = MacReader {
            inner: &mut raw,
            mac: Some(mac),
        };
        io::copy(&mut rest, &mut io::sink()).map_err(io_err(path, "reading the stream"))?;
    }
    if total != t.stream_bytes {
        return Err(StateFileError::Corrupted {
            path: path.to_path_buf(),
            what: format!(
                "the stream has {total} bytes, its trailer says {}",
                t.stream_bytes
            ),
        });
    }
    let sha: [u8; 32] = hash.finalize().into();
    if sha != t.sha {
        return Err(StateFileError::Corrupted {
            path: path.to_path_buf(),
            what: format!(
                "checksum mismatch (SHA-256 {} computed, {} recorded)",
                hex(&sha),
                hex(&t.sha)
            ),
        });
    }
    Ok(total)
}

/// Checks the whole of `file`, opened from `path` (named in messages), before any of it
/// reaches QEMU: magic, version, compression, the trailer, the MAC under `key` (over the
/// raw bytes, before any decoder reads them), the VM it holds, and the stream's length
/// and SHA-256 (decompressing it once, within the decoders' limits). Blocking.
pub fn verify(
    file: &File,
    path: &Path,
    expect: Expect<'_>,
    key: &StateKey,
) -> Result<Verified, StateFileError> {
    let frame = read_frame(file, path)?;
    mac::authenticate(file, &frame, key, path)?;
    let meta = frame.meta(path)?;
    if meta.vm != expect.vm || meta.uuid != expect.uuid {
        return Err(StateFileError::WrongVm {
            path: path.to_path_buf(),
            vm: expect.vm.to_string(),
            uuid: expect.uuid,
            found_vm: meta.vm,
            found_uuid: meta.uuid,
        });
    }
    pump(file, &frame, path, &mut io::sink(), "hashing", None)?;
    Ok(Verified {
        path: path.to_path_buf(),
        compression: frame.compression,
        meta,
        stream_bytes: frame.trailer.stream_bytes,
        file_bytes: frame.file_bytes,
        frame,
    })
}

/// Writes the stream of `file`, which [`verify`] accepted as `v`, into `out` (QEMU's
/// pipe), checking it again on the way (MAC under `key` and SHA-256): an error at the
/// end means the file changed since. Blocking.
pub fn stream(
    file: &File,
    v: &Verified,
    key: &StateKey,
    out: &mut dyn Write,
) -> Result<u64, StateFileError> {
    let again = read_frame(file, &v.path)?;
    if again != v.frame {
        return Err(StateFileError::Corrupted {
            path: v.path.clone(),
            what: "the file changed since it was verified".into(),
        });
    }
    let mut mac = key.mac();
    mac.update(&again.header);
    let n = pump(
        file,
        &again,
        &v.path,
        out,
        "writing to QEMU",
        Some(&mut mac),
    )?;
    mac.update(&again.trailer.signed_bytes());
    mac::check(mac, &again, key, &v.path)?;
    Ok(n)
}

#[cfg(test)]
mod tests;
