//! Compressors and bounded decompressors of the stream.
//!
//! Every decoder runs with a memory limit: liblzma's memlimit on the xz stream decoder
//! ([`XZ_MEMLIMIT`]) and zstd's largest window ([`ZSTD_WINDOW_LOG_MAX`]); gzip's
//! window is 32 KiB by design. And decompression stops as soon as the output exceeds
//! the stream length the trailer declares ([`inflate`]): a small file that inflates
//! without end is refused after at most one byte more than it declared, reading into
//! one buffer of [`CHUNK`] bytes.

use super::format::{Compression, StateFileError, io_err};
use std::io::{self, Read, Write};
use std::path::Path;

pub(crate) const CHUNK: usize = 1 << 20;
/// The most memory liblzma's decoder may use: a file this agent writes (xz level 6, an
/// 8 MiB dictionary) needs about 9 MiB.
pub const XZ_MEMLIMIT: u64 = 64 << 20;
/// The largest zstd window accepted (32 MiB): this agent writes level 3, a 2 MiB window.
pub const ZSTD_WINDOW_LOG_MAX: u32 = 25;

pub(crate) enum Encoder<W: Write> {
    None(W),
    Gzip(flate2::write::GzEncoder<W>),
    Zstd(zstd::stream::write::Encoder<'static, W>),
    Xz(liblzma::write::XzEncoder<W>),
}

impl<W: Write> Encoder<W> {
    /// Each tool's default level: gzip 6, zstd 3, xz 6.
    pub fn new(c: Compression, w: W) -> io::Result<Self> {
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

    pub fn finish(self) -> io::Result<W> {
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

/// A decoder of `c` over `r`, within the memory limits.
pub(crate) fn decoder<'a, R: io::BufRead + 'a>(
    c: Compression,
    r: R,
) -> io::Result<Box<dyn Read + 'a>> {
    Ok(match c {
        Compression::None => Box::new(r),
        Compression::Gzip => Box::new(flate2::bufread::GzDecoder::new(r)),
        Compression::Zstd => {
            let mut d = zstd::stream::read::Decoder::with_buffer(r)?;
            d.window_log_max(ZSTD_WINDOW_LOG_MAX)?;
            Box::new(d)
        }
        Compression::Xz => {
            let stream = liblzma::stream::Stream::new_stream_decoder(XZ_MEMLIMIT, 0)
                .map_err(io::Error::other)?;
            Box::new(liblzma::bufread::XzDecoder::new_stream(r, stream))
        }
    })
}

/// Whether a decoder's error is its memory limit.
fn is_limit(c: Compression, e: &io::Error) -> bool {
    match c {
        Compression::Xz => {
            e.get_ref()
                .and_then(|inner| inner.downcast_ref::<liblzma::stream::Error>())
                .is_some_and(|e| matches!(e, liblzma::stream::Error::MemLimit))
                || e.to_string().contains("memory usage limit")
        }
        // ZSTD_error_frameParameter_windowTooLarge.
        Compression::Zstd => e.to_string().contains("too much memory"),
        Compression::None | Compression::Gzip => false,
    }
}

/// Reads `dec` (a decoder of `c`) to its end into `each` chunk by chunk, and stops with
/// [`StateFileError::Oversized`] once more than `declared` bytes came out. Returns the
/// bytes read.
pub(crate) fn inflate(
    dec: &mut dyn Read,
    c: Compression,
    declared: u64,
    path: &Path,
    mut each: impl FnMut(&[u8]) -> Result<(), StateFileError>,
) -> Result<u64, StateFileError> {
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        // One byte more than is left tells a longer stream from one of the right length.
        let want = (declared - total).saturating_add(1).min(CHUNK as u64) as usize;
        let n = match dec.read(&mut buf[..want]) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if is_limit(c, &e) => {
                return Err(StateFileError::DecoderLimit {
                    path: path.to_path_buf(),
                    compression: c,
                    what: e.to_string(),
                });
            }
            Err(e) => {
                return Err(StateFileError::Corrupted {
                    path: path.to_path_buf(),
                    what: format!("{c} stream: {e}"),
                });
            }
        };
        total += n as u64;
        if total > declared {
            return Err(StateFileError::Oversized {
                path: path.to_path_buf(),
                compression: c,
                declared,
            });
        }
        each(&buf[..n])?;
    }
}

/// Writes `data` to `out`, naming `what` in the error.
pub(crate) fn write_to(
    out: &mut dyn Write,
    data: &[u8],
    path: &Path,
    what: &'static str,
) -> Result<(), StateFileError> {
    out.write_all(data).map_err(io_err(path, what))
}
