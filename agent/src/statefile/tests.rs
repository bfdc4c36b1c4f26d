use super::*;
use std::time::Duration;

fn meta(vm: &str, uuid: uuid::Uuid) -> Meta {
    Meta {
        vm: vm.into(),
        uuid,
        domain_xml: "<domain type='qemu'><name>g</name></domain>".into(),
        qemu_version: "7.2.0".into(),
        node: "node-a".into(),
        created_unix_ms: 1_800_000_000_000,
    }
}

/// A stream that looks a bit like guest memory: runs of one byte and some noise.
fn stream_bytes() -> Vec<u8> {
    let mut out = Vec::new();
    let mut x: u32 = 12345;
    for page in 0..600u32 {
        if page % 3 == 0 {
            for _ in 0..4096 {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                out.push((x >> 16) as u8);
            }
        } else {
            out.extend(std::iter::repeat_n(page as u8, 4096));
        }
    }
    out
}

/// The cluster's key in these tests.
fn key() -> StateKey {
    StateKey::from_bytes(&[0x11; 32]).unwrap()
}

/// Another cluster's.
fn other_key() -> StateKey {
    StateKey::from_bytes(&[0x22; 32]).unwrap()
}

fn saved(dir: &Path, c: Compression, uuid: uuid::Uuid) -> (PathBuf, Written) {
    let path = dir.join(format!("g-{c}.fsav"));
    let data = stream_bytes();
    let file = File::create_new(&path).unwrap();
    let written = write(file, &path, c, &meta("g", uuid), &key(), &data[..]).unwrap();
    (path, written)
}

/// [`verify`] of the file at `path`, opened here, with [`key`].
fn verify_at(path: &Path, expect: Expect<'_>) -> Result<Verified, StateFileError> {
    verify(&File::open(path).unwrap(), path, expect, &key())
}

fn expect(uuid: uuid::Uuid) -> Expect<'static> {
    Expect { vm: "g", uuid }
}

#[test]
fn every_compression_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let uuid = uuid::Uuid::new_v4();
    let data = stream_bytes();
    for c in Compression::ALL {
        let (path, written) = saved(dir.path(), c, uuid);
        assert_eq!(written.stream_bytes, data.len() as u64);
        assert_eq!(
            written.file_bytes,
            std::fs::metadata(&path).unwrap().len(),
            "{c}"
        );
        if c != Compression::None {
            assert!(written.file_bytes < data.len() as u64 / 2, "{c} compresses");
        }
        let file = File::open(&path).unwrap();
        let v = verify(&file, &path, expect(uuid), &key()).unwrap();
        assert_eq!(v.compression, c);
        assert_eq!(v.meta, meta("g", uuid));
        assert_eq!(v.sha256(), written.sha256);
        assert_eq!(recorded_sha256(&file, &path).unwrap(), written.sha256);
        let mut out = Vec::new();
        assert_eq!(
            stream(&file, &v, &key(), &mut out).unwrap(),
            data.len() as u64
        );
        assert!(out == data, "{c}: the stream comes back as written");
    }
}

#[test]
fn a_truncated_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let uuid = uuid::Uuid::new_v4();
    for c in Compression::ALL {
        let (path, written) = saved(dir.path(), c, uuid);
        let full = std::fs::read(&path).unwrap();
        for keep in [
            written.file_bytes - 1,
            written.file_bytes - TRAILER as u64,
            written.file_bytes / 2,
            40,
            10,
            0,
        ] {
            std::fs::write(&path, &full[..keep as usize]).unwrap();
            let err = verify_at(&path, expect(uuid)).unwrap_err();
            assert!(
                matches!(err, StateFileError::Truncated { .. }),
                "{c}, {keep} bytes: {err}"
            );
            assert!(err.to_string().contains("is truncated"), "{err}");
        }
    }
}

#[test]
fn a_flipped_bit_anywhere_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let uuid = uuid::Uuid::new_v4();
    for c in Compression::ALL {
        let (path, written) = saved(dir.path(), c, uuid);
        let full = std::fs::read(&path).unwrap();
        let len = written.file_bytes as usize;
        // In the meta block, at the start, middle and end of the payload, in the
        // trailer's lengths, checksum, key id and MAC: the MAC refuses all but a length
        // that no longer adds up (the frame's structure, checked first).
        let header = 16 + u32::from_le_bytes(full[12..16].try_into().unwrap()) as usize;
        for (at, mac) in [
            (20, true),
            (header + 1, true),
            ((header + len) / 2, true),
            (len - TRAILER - 1, true),
            (len - TRAILER + 8, false),
            // Uncompressed, a stream length unlike the payload's is caught first.
            (len - TRAILER + 16, c != Compression::None),
            (len - 60, true),
            (len - 36, true),
            (len - 1, true),
        ] {
            let mut bad = full.clone();
            bad[at] ^= 0x10;
            std::fs::write(&path, &bad).unwrap();
            let err = verify_at(&path, expect(uuid)).unwrap_err();
            if mac {
                assert!(
                    matches!(err, StateFileError::BadMac { .. }),
                    "{c}, bit flipped at {at}: {err}"
                );
                assert!(err.to_string().contains("has no valid MAC"), "{err}");
            } else {
                assert!(
                    matches!(err, StateFileError::Corrupted { .. }),
                    "{c}, bit flipped at {at}: {err}"
                );
            }
        }
    }
}

#[test]
fn wrong_magic_version_compression_and_vm_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let uuid = uuid::Uuid::new_v4();
    let (path, _) = saved(dir.path(), Compression::Zstd, uuid);
    let full = std::fs::read(&path).unwrap();
    let edit = |at: usize, value: u8| {
        let mut b = full.clone();
        b[at] = value;
        std::fs::write(&path, &b).unwrap();
        verify_at(&path, expect(uuid)).unwrap_err()
    };
    assert!(matches!(edit(0, b'X'), StateFileError::WrongMagic { .. }));
    let e = edit(8, 3);
    assert!(
        matches!(e, StateFileError::UnsupportedVersion { found: 3, .. }),
        "{e}"
    );
    assert!(e.to_string().contains("format version 3"), "{e}");
    assert!(matches!(
        edit(10, 9),
        StateFileError::UnknownCompression { found: 9, .. }
    ));
    std::fs::write(&path, b"#!/bin/sh\nrm -rf /\n").unwrap();
    assert!(matches!(
        verify_at(&path, expect(uuid)).unwrap_err(),
        StateFileError::WrongMagic { .. }
    ));
    // A valid file of another guest.
    std::fs::write(&path, &full).unwrap();
    let other = uuid::Uuid::new_v4();
    let e = verify_at(&path, expect(other)).unwrap_err();
    assert!(matches!(e, StateFileError::WrongVm { .. }), "{e}");
    assert!(e.to_string().contains("holds VM 'g'"), "{e}");
    let e = verify_at(&path, Expect { vm: "h", uuid }).unwrap_err();
    assert!(matches!(e, StateFileError::WrongVm { .. }), "{e}");
}

#[test]
fn a_broken_stream_fails_the_write() {
    let dir = tempfile::tempdir().unwrap();
    let uuid = uuid::Uuid::new_v4();
    struct Broken(usize);
    impl Read for Broken {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.0 == 0 {
                return Err(io::Error::other("QEMU went away"));
            }
            self.0 -= 1;
            buf[..10].fill(7);
            Ok(10)
        }
    }
    let path = dir.path().join("broken.fsav");
    let file = File::create_new(&path).unwrap();
    let e = write(
        file,
        &path,
        Compression::Gzip,
        &meta("g", uuid),
        &key(),
        Broken(3),
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("reading the migration stream"),
        "{e}"
    );
    assert!(e.to_string().contains("broken.fsav"), "{e}");
    // What was written has no trailer: it is refused.
    let e = verify_at(&path, expect(uuid)).unwrap_err();
    assert!(matches!(e, StateFileError::Truncated { .. }), "{e}");
}

#[test]
fn a_file_changed_after_verify_is_caught_while_streaming() {
    let dir = tempfile::tempdir().unwrap();
    let uuid = uuid::Uuid::new_v4();
    let (path, _) = saved(dir.path(), Compression::None, uuid);
    let file = File::open(&path).unwrap();
    let v = verify(&file, &path, expect(uuid), &key()).unwrap();
    let good = std::fs::read(&path).unwrap();
    let mut full = good.clone();
    let mid = full.len() / 2;
    full[mid] ^= 1;
    std::fs::write(&path, &full).unwrap();
    let e = stream(&file, &v, &key(), &mut Vec::new()).unwrap_err();
    assert!(e.to_string().contains("checksum mismatch"), "{e}");
    // A payload changed and re-signed by someone without the key (checksum made to
    // match is not enough): the MAC, checked again while streaming.
    let mut forged = good.clone();
    let at = forged.len() - 5;
    forged[at] ^= 1;
    std::fs::write(&path, &forged).unwrap();
    let e = stream(&file, &v, &key(), &mut Vec::new()).unwrap_err();
    assert!(matches!(e, StateFileError::Corrupted { .. }), "{e}");
    std::fs::write(&path, &good).unwrap();
    let e = stream(&file, &v, &other_key(), &mut Vec::new()).unwrap_err();
    assert!(matches!(e, StateFileError::BadMac { .. }), "{e}");
}

#[test]
fn a_file_of_another_key_or_without_a_mac_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let uuid = uuid::Uuid::new_v4();
    let (path, _) = saved(dir.path(), Compression::Zstd, uuid);
    let good = std::fs::read(&path).unwrap();
    // Re-signed with another cluster's key: valid in every other respect.
    std::fs::write(&path, craft::resign(&good, &other_key()).unwrap()).unwrap();
    let e = verify_at(&path, expect(uuid)).unwrap_err();
    assert!(matches!(e, StateFileError::BadMac { .. }), "{e}");
    assert_eq!(e.label(), "BadMac");
    let text = e.to_string();
    assert!(text.contains(&*path.to_string_lossy()), "{text}");
    assert!(
        text.contains(&format!(
            "names key {}, not this cluster's key {}",
            other_key().id(),
            key().id()
        )),
        "{text}"
    );
    // Signed again with the right key: accepted (resigning is all it takes).
    std::fs::write(&path, craft::resign(&good, &key()).unwrap()).unwrap();
    verify_at(&path, expect(uuid)).unwrap();
    // Its MAC replaced by another (the key id kept): the bytes are not those signed.
    let mut bad = good.clone();
    let n = bad.len();
    bad[n - 32..].copy_from_slice(&[0; 32]);
    std::fs::write(&path, &bad).unwrap();
    let e = verify_at(&path, expect(uuid)).unwrap_err();
    assert!(e.to_string().contains("not those the key signed"), "{e}");
    // The previous format (version 1, no MAC): refused, saying why.
    let mut v1 = good.clone();
    v1[8..10].copy_from_slice(&UNSIGNED_VERSION.to_le_bytes());
    std::fs::write(&path, &v1).unwrap();
    let e = verify_at(&path, expect(uuid)).unwrap_err();
    assert!(matches!(e, StateFileError::Unsigned { .. }), "{e}");
    assert!(e.to_string().contains("carries no MAC"), "{e}");
    assert!(e.to_string().contains("save the guest again"), "{e}");
    // The key never shows.
    assert!(!format!("{:?}", key()).contains("17"), "{:?}", key());
}

/// `n` zero bytes compressed with `c`.
fn zeros(c: Compression, n: u64) -> Vec<u8> {
    craft::compress(c, io::repeat(0).take(n)).unwrap()
}

/// A file of `c` holding `payload`, declaring a stream of `declared` bytes, signed.
fn crafted(dir: &Path, c: Compression, payload: &[u8], declared: u64) -> PathBuf {
    let path = dir.join(format!("crafted-{c}.fsav"));
    let file = craft::assemble(
        c,
        &meta("g", uuid::Uuid::nil()),
        payload,
        declared,
        [0; 32],
        &key(),
    );
    std::fs::write(&path, file).unwrap();
    path
}

#[test]
fn a_decompression_bomb_stops_at_the_declared_length() {
    let dir = tempfile::tempdir().unwrap();
    let uuid = uuid::Uuid::nil();
    for c in [Compression::Gzip, Compression::Zstd, Compression::Xz] {
        // 32 MiB of zeros in a few KiB, declaring 1 MiB. Signed with the cluster's key
        // (so it gets past the MAC, which refuses anyone else's bomb unread).
        let bomb = zeros(c, 32 << 20);
        assert!(bomb.len() < 64 << 10, "{c}: {} bytes", bomb.len());
        let path = crafted(dir.path(), c, &bomb, 1 << 20);
        let t0 = std::time::Instant::now();
        let e = verify_at(&path, expect(uuid)).unwrap_err();
        assert!(
            matches!(e, StateFileError::Oversized { declared, .. } if declared == 1 << 20),
            "{c}: {e}"
        );
        assert!(
            e.to_string().contains("inflates beyond the 1048576 bytes"),
            "{e}"
        );
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "{c}: {:?}",
            t0.elapsed()
        );
        // Unsigned, the same bomb is not even decompressed.
        std::fs::write(
            &path,
            craft::resign(&std::fs::read(&path).unwrap(), &other_key()).unwrap(),
        )
        .unwrap();
        let e = verify_at(&path, expect(uuid)).unwrap_err();
        assert!(matches!(e, StateFileError::BadMac { .. }), "{c}: {e}");
    }
    // Uncompressed, the lengths must agree.
    let path = crafted(dir.path(), Compression::None, &[0; 100], 10);
    let e = verify_at(&path, expect(uuid)).unwrap_err();
    assert!(matches!(e, StateFileError::Corrupted { .. }), "{e}");
}

#[test]
fn a_stream_that_needs_a_bigger_decoder_than_the_limit_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let uuid = uuid::Uuid::nil();
    let data = stream_bytes();
    let sha = |c: Compression| -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(format::header_bytes(c, &meta("g", uuid)));
        h.update(&data);
        h.finalize().into()
    };
    let mut enc = decode::Encoder::new(Compression::Zstd, Vec::new()).unwrap();
    enc.write_all(&data).unwrap();
    let mut zstd = enc.finish().unwrap();
    // It decodes as written (window log 21) ...
    let ok = crafted(dir.path(), Compression::Zstd, &zstd, data.len() as u64);
    std::fs::write(
        &ok,
        craft::assemble(
            Compression::Zstd,
            &meta("g", uuid),
            &zstd,
            data.len() as u64,
            sha(Compression::Zstd),
            &key(),
        ),
    )
    .unwrap();
    verify_at(&ok, expect(uuid)).unwrap();
    // ... and not with a frame header asking for a 64 MiB window (zstd's own default
    // limit, 128 MiB, would take it): no single-segment flag, so byte 5 is the window
    // descriptor, exponent 16 = window log 26.
    assert_eq!(&zstd[..4], &[0x28, 0xb5, 0x2f, 0xfd]);
    assert_eq!(
        zstd[4] & 0x20,
        0,
        "a streamed frame has a window descriptor"
    );
    zstd[5] = 16 << 3;
    let path = crafted(dir.path(), Compression::Zstd, &zstd, data.len() as u64);
    let e = verify_at(&path, expect(uuid)).unwrap_err();
    assert!(matches!(e, StateFileError::DecoderLimit { .. }), "{e}");
    assert_eq!(e.label(), "DecoderLimit");

    // xz at level 0 (a 256 KiB dictionary), then its block header made to ask for a
    // 128 MiB dictionary (LZMA2 props 30), its CRC32 fixed: over liblzma's memlimit.
    let mut enc = liblzma::write::XzEncoder::new(Vec::new(), 0);
    enc.write_all(&data).unwrap();
    let mut xz = enc.finish().unwrap();
    let block = 12;
    let size = (xz[block] as usize + 1) * 4;
    assert_eq!(
        xz[block + 1] & 0xc3,
        0,
        "one filter, no sizes in the block header"
    );
    assert_eq!(
        &xz[block + 2..block + 4],
        &[0x21, 0x01],
        "LZMA2, one props byte"
    );
    xz[block + 4] = 30;
    let mut crc = flate2::Crc::new();
    crc.update(&xz[block..block + size - 4]);
    xz[block + size - 4..block + size].copy_from_slice(&crc.sum().to_le_bytes());
    let path = crafted(dir.path(), Compression::Xz, &xz, data.len() as u64);
    let e = verify_at(&path, expect(uuid)).unwrap_err();
    assert!(matches!(e, StateFileError::DecoderLimit { .. }), "{e}");
    assert!(e.to_string().contains("decoder's limit"), "{e}");
}
