//! Ferry's test guest: a 512-byte boot sector (`guest/guest.asm`) that enters 32-bit
//! protected mode and, forever, makes passes over a memory region. On pass P it checks
//! that every page still holds what pass P-1 wrote, writes the value of pass P, and
//! prints `pass P ok` (or `pass P BAD page 0x...`) to COM1. Tests and the demo read the
//! serial log to see that a guest lives and that its memory arrived whole.
//!
//! Assembling it needs `nasm` (Debian package `nasm`).

use std::io;

const SOURCE: &str = include_str!("../guest/guest.asm");

/// What the guest does: the region it dirties and a delay loop between passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    /// First MiB of the region.
    pub region_start_mib: u32,
    /// End of the region (exclusive), in MiB; at most the guest's memory.
    pub region_end_mib: u32,
    /// Iterations of an empty loop between passes (0: as fast as it can).
    pub delay: u32,
}

impl Default for Params {
    /// Dirties MiB 1 to 33 with a short pause between passes: under TCG a pass takes
    /// about a quarter of a second, so the counter moves quickly and the guest dirties
    /// about 100 MiB/s.
    fn default() -> Self {
        Params {
            region_start_mib: 1,
            region_end_mib: 33,
            delay: 100_000_000,
        }
    }
}

/// Size of the disk image [`image`] returns: SeaBIOS boots a virtio disk only when it
/// has more than one sector.
pub const DISK_BYTES: usize = 1 << 20;

/// A raw disk image of [`DISK_BYTES`] whose first sector is the boot sector with
/// `params` patched in (offsets 0x1F0, 0x1F4, 0x1F8).
pub fn image(params: Params) -> io::Result<Vec<u8>> {
    let dir = tempfile::Builder::new().prefix("ferry-guest-").tempdir()?;
    let src = dir.path().join("guest.asm");
    let out = dir.path().join("guest.img");
    std::fs::write(&src, SOURCE)?;
    let status = std::process::Command::new("nasm")
        .args(["-f", "bin", "-o"])
        .arg(&out)
        .arg(&src)
        .status()
        .map_err(|e| io::Error::new(e.kind(), format!("running nasm (apt install nasm): {e}")))?;
    if !status.success() {
        return Err(io::Error::other(format!("nasm failed: {status}")));
    }
    let mut img = std::fs::read(&out)?;
    if img.len() != 512 {
        return Err(io::Error::other(format!(
            "the boot sector is {} bytes, not 512",
            img.len()
        )));
    }
    img[0x1f0..0x1f4].copy_from_slice(&(params.region_start_mib << 20).to_le_bytes());
    img[0x1f4..0x1f8].copy_from_slice(&(params.region_end_mib << 20).to_le_bytes());
    img[0x1f8..0x1fc].copy_from_slice(&params.delay.to_le_bytes());
    img.resize(DISK_BYTES, 0);
    Ok(img)
}

/// The start of a qcow2 image, written by hand for tests of image checks
/// (docs/interop/qcow2.txt in QEMU): version 3, 1 GiB, 64 KiB clusters, and, when
/// `backing` is given, that backing file's name right after the 104-byte header. 64 KiB
/// long; no guest boots from it.
pub fn qcow2_header(backing: Option<&str>) -> Vec<u8> {
    let mut h = vec![0u8; 104];
    h[0..4].copy_from_slice(b"QFI\xfb");
    h[4..8].copy_from_slice(&3u32.to_be_bytes());
    h[20..24].copy_from_slice(&16u32.to_be_bytes());
    h[24..32].copy_from_slice(&(1u64 << 30).to_be_bytes());
    h[96..100].copy_from_slice(&4u32.to_be_bytes());
    h[100..104].copy_from_slice(&104u32.to_be_bytes());
    if let Some(name) = backing {
        h[8..16].copy_from_slice(&104u64.to_be_bytes());
        h[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
        h.extend_from_slice(name.as_bytes());
    }
    h.resize(65536, 0);
    h
}
