//! State files built from their parts and signed with a key: what the tests of hostile
//! files need (a valid file re-signed with another cluster's key, a decompression bomb
//! that declares a short stream). Only a holder of the cluster's key can make a file a
//! restore accepts; anyone else's file is refused before any decoder reads it.

use super::StateKey;
use super::decode::Encoder;
use super::format::{Compression, FIXED, MAC_LEN, Meta, TRAILER, Trailer, header_bytes};
use super::mac;
use hmac::Mac;
use std::io::{self, Read};

/// A file of `compression` holding `meta` and `payload` (already compressed), whose
/// trailer declares `stream_bytes` and `sha256`, signed with `key`.
pub fn assemble(
    compression: Compression,
    meta: &Meta,
    payload: &[u8],
    stream_bytes: u64,
    sha256: [u8; 32],
    key: &StateKey,
) -> Vec<u8> {
    let mut file = header_bytes(compression, meta);
    file.extend_from_slice(payload);
    let mut trailer = Trailer {
        payload_len: payload.len() as u64,
        stream_bytes,
        sha: sha256,
        key_id: key.id().0,
        mac: [0; MAC_LEN],
    };
    file.extend_from_slice(&trailer.signed_bytes());
    let mut m = key.mac();
    m.update(&file);
    trailer.mac = mac::finish(m);
    file.extend_from_slice(&trailer.mac);
    file
}

/// `file` (a whole version-2 file) with its key id and MAC made with `key`; `None` for
/// bytes too short to be one.
pub fn resign(file: &[u8], key: &StateKey) -> Option<Vec<u8>> {
    if file.len() < FIXED + TRAILER {
        return None;
    }
    let mut out = file.to_vec();
    let len = out.len();
    out[len - MAC_LEN - 8..len - MAC_LEN].copy_from_slice(&key.id().0);
    let mut m = key.mac();
    m.update(&out[..len - MAC_LEN]);
    out[len - MAC_LEN..].copy_from_slice(&mac::finish(m));
    Some(out)
}

/// `data` (read to its end) compressed with `c` as a save compresses it: a payload for
/// [`assemble`].
pub fn compress(c: Compression, mut data: impl Read) -> io::Result<Vec<u8>> {
    let mut enc = Encoder::new(c, Vec::new())?;
    io::copy(&mut data, &mut enc)?;
    enc.finish()
}
