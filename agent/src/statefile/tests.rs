use super::*;

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

fn saved(dir: &Path, c: Compression, uuid: uuid::Uuid) -> (PathBuf, Written) {
    let path = dir.join(format!("g-{c}.fsav"));
    let data = stream_bytes();
    let file = File::create_new(&path).unwrap();
    let written = write(file, &path, c, &meta("g", uuid), &data[..]).unwrap();
    (path, written)
}

/// [`verify`] of the file at `path`, opened here.
fn verify_at(path: &Path, expect: Expect<'_>) -> Result<Verified, StateFileError> {
    verify(&File::open(path).unwrap(), path, expect)
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
        let v = verify(&file, &path, expect(uuid)).unwrap();
        assert_eq!(v.compression, c);
        assert_eq!(v.meta, meta("g", uuid));
        let mut out = Vec::new();
        assert_eq!(stream(&file, &v, &mut out).unwrap(), data.len() as u64);
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
        // trailer's lengths and checksum.
        let header = 16 + u32::from_le_bytes(full[12..16].try_into().unwrap()) as usize;
        for at in [
            20,
            header + 1,
            (header + len) / 2,
            len - TRAILER - 1,
            len - 40,
            len - 1,
        ] {
            let mut bad = full.clone();
            bad[at] ^= 0x10;
            std::fs::write(&path, &bad).unwrap();
            let err = verify_at(&path, expect(uuid)).unwrap_err();
            assert!(
                matches!(
                    err,
                    StateFileError::Corrupted { .. } | StateFileError::WrongVm { .. }
                ),
                "{c}, bit flipped at {at}: {err}"
            );
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
    let e = edit(8, 2);
    assert!(
        matches!(e, StateFileError::UnsupportedVersion { found: 2, .. }),
        "{e}"
    );
    assert!(e.to_string().contains("format version 2"), "{e}");
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
    let e = write(file, &path, Compression::Gzip, &meta("g", uuid), Broken(3)).unwrap_err();
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
    let v = verify(&file, &path, expect(uuid)).unwrap();
    let mut full = std::fs::read(&path).unwrap();
    let mid = full.len() / 2;
    full[mid] ^= 1;
    std::fs::write(&path, &full).unwrap();
    let e = stream(&file, &v, &mut Vec::new()).unwrap_err();
    assert!(e.to_string().contains("checksum mismatch"), "{e}");
}
