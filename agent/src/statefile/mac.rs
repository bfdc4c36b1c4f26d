//! The cluster's state key and the MAC a state file carries.
//!
//! HMAC-SHA256 (RustCrypto's `hmac` over the `sha2` the checksum already uses) keyed by
//! the cluster's state key (Secret `ferry-state-key`, 32 random bytes, which every agent
//! holds) over every byte of the file before the MAC: header, compressed payload, and
//! the trailer's lengths, SHA-256 and key id. It covers what the SHA-256 covers (the
//! payload decompresses to the stream, and the trailer carries the stream's SHA-256)
//! and is checked over the compressed bytes, so a file is authenticated before any
//! decoder reads it. The comparison is constant-time ([`Mac::verify_slice`]).

use super::format::{Frame, MAC_LEN, StateFileError, hex, io_err};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::fmt;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::Path;

pub(crate) type FileMac = Hmac<Sha256>;

/// The cluster's state key: 32 bytes every agent holds, from Secret `ferry-state-key`.
#[derive(Clone, PartialEq, Eq)]
pub struct StateKey([u8; 32]);

/// The key's length in bytes.
pub const KEY_LEN: usize = 32;

#[derive(Debug, thiserror::Error)]
#[error("a state key is {KEY_LEN} bytes, not {0}")]
pub struct KeyLengthError(pub usize);

impl StateKey {
    pub fn from_bytes(bytes: &[u8]) -> Result<StateKey, KeyLengthError> {
        let key: [u8; KEY_LEN] = bytes.try_into().map_err(|_| KeyLengthError(bytes.len()))?;
        Ok(StateKey(key))
    }

    /// A short public name of the key (the first 8 bytes of an HMAC of a constant under
    /// it): a file records the id of the key that signed it, so a file of another
    /// cluster (or of a replaced key) is named as such. It reveals nothing of the key.
    pub fn id(&self) -> KeyId {
        let mut mac = self.mac();
        mac.update(b"ferry.dev state key id");
        let out = mac.finalize().into_bytes();
        KeyId(out[..8].try_into().expect("8 bytes"))
    }

    pub(crate) fn mac(&self) -> FileMac {
        <FileMac as Mac>::new_from_slice(&self.0).expect("HMAC takes any key length")
    }
}

impl fmt::Debug for StateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StateKey(id {})", self.id())
    }
}

/// [`StateKey::id`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyId(pub [u8; 8]);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex(&self.0))
    }
}

/// A reader that adds what passes through it to a MAC.
pub(crate) struct MacReader<'a, R> {
    pub inner: R,
    /// `None`: a plain reader.
    pub mac: Option<&'a mut FileMac>,
}

impl<R: Read> Read for MacReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(mac) = self.mac.as_deref_mut() {
            mac.update(&buf[..n]);
        }
        Ok(n)
    }
}

/// Checks the finished `mac` against the one `frame` records, in constant time.
pub(crate) fn check(
    mac: FileMac,
    frame: &Frame,
    key: &StateKey,
    path: &Path,
) -> Result<(), StateFileError> {
    if mac.verify_slice(&frame.trailer.mac).is_ok() {
        return Ok(());
    }
    let signed_by = KeyId(frame.trailer.key_id);
    let why = if signed_by != key.id() {
        format!(
            "it names key {signed_by}, not this cluster's key {} (a file of another cluster, \
             of a replaced key, or forged)",
            key.id()
        )
    } else {
        "its bytes are not those the key signed (changed since it was written, or forged)".into()
    };
    Err(StateFileError::BadMac {
        path: path.to_path_buf(),
        why,
    })
}

/// Reads the payload of `frame` from `file` and checks the MAC over header, payload and
/// trailer, before anything decompresses it.
pub(crate) fn authenticate(
    mut file: &File,
    frame: &Frame,
    key: &StateKey,
    path: &Path,
) -> Result<(), StateFileError> {
    let mut mac = key.mac();
    mac.update(&frame.header);
    file.seek(SeekFrom::Start(frame.header_len()))
        .map_err(io_err(path, "seeking to the stream"))?;
    let mut payload = MacReader {
        inner: file.take(frame.trailer.payload_len),
        mac: Some(&mut mac),
    };
    let read =
        io::copy(&mut payload, &mut io::sink()).map_err(io_err(path, "reading the stream"))?;
    if read != frame.trailer.payload_len {
        return Err(StateFileError::Truncated {
            path: path.to_path_buf(),
            what: format!(
                "{read} payload bytes read, its trailer gives {}",
                frame.trailer.payload_len
            ),
        });
    }
    mac.update(&frame.trailer.signed_bytes());
    check(mac, frame, key, path)
}

/// The MAC of a whole file whose header, payload and signed trailer bytes `mac` has seen.
pub(crate) fn finish(mac: FileMac) -> [u8; MAC_LEN] {
    mac.finalize().into_bytes().into()
}
