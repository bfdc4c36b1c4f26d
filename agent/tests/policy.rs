//! The migration policy against real QEMU: a guest that dirties memory faster than the
//! stream sends it never finishes with plain pre-copy, and finishes under the default
//! policy; post-copy, multifd and compression complete with the guest's memory intact;
//! the timeouts abort with a message naming the limit and the guest stays on the source.

mod support;

use ferry_agent::error::{ErrorKind, PhaseError};
use ferry_agent::phases::perform::{PerformOutput, TransferProgress};
use ferry_agent::phases::prepare::PrepareOutput;
use ferry_agent::policy::{Policy, PostCopy, resolve};
use ferry_crds::{Compression, MigrationPolicy, Preset};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::*;
use tokio_util::sync::CancellationToken;

const MIB: u64 = 1 << 20;
/// The stream's limit in the hot-guest cases: far below what the guest dirties.
const BANDWIDTH_MIBPS: i64 = 32;

/// A 128 MiB guest rewriting 64 MiB over and over with a short pause: it dirties
/// memory much faster than [`BANDWIDTH_MIBPS`].
fn hot_lab(vm: &str) -> Lab {
    Lab::new(vm, 128, 65, 2_000_000)
}

/// A guest that dirties little: any policy converges.
fn calm_lab(vm: &str) -> Lab {
    Lab::new(vm, 128, 17, 50_000_000)
}

/// The effective policy of a spec, with the hot-guest bandwidth limit.
fn limited(spec: MigrationPolicy) -> Policy {
    resolve(&MigrationPolicy {
        bandwidth_mi_bps: Some(BANDWIDTH_MIBPS),
        ..spec
    })
    .unwrap()
}

/// Every progress report of one Perform.
type Reports = Arc<Mutex<Vec<TransferProgress>>>;

async fn run_perform(
    lab: &Lab,
    m: &str,
    prep: &PrepareOutput,
    policy: &Policy,
    cancel: &CancellationToken,
) -> (Result<PerformOutput, PhaseError>, Vec<TransferProgress>) {
    let reports: Reports = Arc::default();
    let sink = reports.clone();
    let res = within(lab.perform(m, prep, policy, cancel, move |p| {
        sink.lock().unwrap().push(p.clone())
    }))
    .await;
    let reports = reports.lock().unwrap().clone();
    (res, reports)
}

/// Finish(cancelled) and Confirm(cancelled) after a failed Perform; the guest runs on the
/// source, alone, and its counter goes on without a BAD page.
async fn roll_back(lab: &Lab, m: &str) {
    lab.finish(&lab.b, m, None, true).await.unwrap();
    lab.confirm(&lab.a, m, None, true).await.unwrap();
    lab.assert_one_guest_on(&lab.a);
    lab.assert_runs_on_a().await;
}

fn summary(reports: &[TransferProgress]) -> String {
    let last = reports.last().cloned().unwrap_or_default();
    let max_throttle = reports
        .iter()
        .map(|p| p.cpu_throttle_percent)
        .max()
        .unwrap_or(0);
    format!(
        "{} reports, last pass {}, max throttle {} %, post-copy {}, converging {:?}, dirty {} MiB/s, throughput {:.0} Mbit/s: {}",
        reports.len(),
        last.pass,
        max_throttle,
        reports.iter().any(|p| p.post_copy),
        last.converging,
        last.dirty_rate_bytes_per_sec / MIB,
        last.throughput_mbps,
        last.convergence
    )
}

#[tokio::test]
async fn plain_pre_copy_never_finishes_a_hot_guest() {
    let lab = hot_lab("hot-plain");
    lab.start_source().await;
    let plain = limited(MigrationPolicy {
        preset: Some(Preset::Safest),
        auto_converge: Some(false),
        ..Default::default()
    });
    let plain = Policy {
        completion_timeout_per_gib: None,
        progress_timeout: None,
        ..plain
    };
    let prep = lab.begin_and_prepare("m-plain", &plain).await.unwrap();
    let cancel = CancellationToken::new();
    let started = Instant::now();
    let guest_passes_at_start = last_pass(&lab.serial_a()).unwrap();
    // Cancelled at pass 8, long after the judgement said "not converging".
    let reports: Reports = Arc::default();
    let sink = reports.clone();
    let stopper = cancel.clone();
    let res = within(lab.perform("m-plain", &prep, &plain, &cancel, move |p| {
        if p.pass >= 8 {
            stopper.cancel();
        }
        sink.lock().unwrap().push(p.clone());
    }))
    .await;
    let reports = reports.lock().unwrap().clone();
    let guest_passes = last_pass(&lab.serial_a()).unwrap() - guest_passes_at_start;
    eprintln!(
        "plain pre-copy, cancelled after {:?}; the guest made {guest_passes} passes meanwhile; {}",
        started.elapsed(),
        summary(&reports)
    );
    let err = res.expect_err("plain pre-copy must not finish");
    assert!(matches!(err.kind, ErrorKind::Cancelled), "{err}");
    let last = reports.last().unwrap();
    assert!(last.pass >= 8, "cancelled at pass {}", last.pass);
    assert_eq!(last.converging, Some(false), "{}", last.convergence);
    assert!(!reports.iter().any(|p| p.post_copy));
    assert!(reports.iter().all(|p| p.cpu_throttle_percent == 0));
    assert!(last.eta.is_none(), "no ETA when it does not converge");
    assert!(guest_passes > 10, "the guest kept dirtying memory");
    // The downtime limit rose pass by pass from the initial one to the policy's maximum
    // (Safest: 300 ms), and stopped there.
    let guest = lab.a.require(&lab.vm).await.unwrap();
    let params: serde_json::Value = guest
        .qmp
        .execute("query-migrate-parameters", None)
        .await
        .unwrap();
    assert_eq!(params["downtime-limit"], plain.max_downtime_ms, "{params}");
    assert_eq!(
        plain.downtime_limit(1),
        ferry_agent::policy::INITIAL_DOWNTIME_MS
    );
    roll_back(&lab, "m-plain").await;
}

#[tokio::test]
async fn hot_guest_completes_under_the_default_policy() {
    let lab = hot_lab("hot-default");
    lab.start_source().await;
    let balanced = limited(MigrationPolicy::default());
    assert_eq!(balanced.post_copy, PostCopy::Allowed);
    assert!(balanced.auto_converge);
    let prep = lab.begin_and_prepare("m-bal", &balanced).await.unwrap();
    let started = Instant::now();
    let (res, reports) =
        run_perform(&lab, "m-bal", &prep, &balanced, &CancellationToken::new()).await;
    let perf = res.unwrap();
    eprintln!(
        "Balanced: completed in {:?} ({} ms QEMU total, {} ms downtime), post-copy {}, throttle up to {} %; {}",
        started.elapsed(),
        perf.total_time_ms,
        perf.downtime_ms,
        perf.post_copy,
        perf.max_cpu_throttle_percent,
        summary(&reports)
    );
    // Auto-converge throttled the vCPUs until pre-copy converged; Balanced switches to
    // post-copy only when that is not enough, at the maximum throttle.
    assert!(perf.max_cpu_throttle_percent > 0, "auto-converge throttled");
    if perf.post_copy {
        assert!(
            reports
                .iter()
                .any(|p| p.cpu_throttle_percent >= 99 && p.converging == Some(false)),
            "post-copy only after throttling at the maximum did not help"
        );
    }
    lab.complete("m-bal", &perf).await;
}

/// Over TLS: the post-copy switch and its return path work through the encrypted stream.
async fn post_copy_case(vm: &str, post_copy: PostCopy) {
    let lab = hot_lab(vm).with_tls();
    lab.start_source().await;
    let policy = Policy {
        post_copy,
        auto_converge: false,
        ..limited(MigrationPolicy::default())
    };
    let prep = lab.begin_and_prepare("m-pc", &policy).await.unwrap();
    let (res, reports) = run_perform(&lab, "m-pc", &prep, &policy, &CancellationToken::new()).await;
    let perf = res.unwrap();
    eprintln!(
        "{post_copy:?}: {} ms, downtime {} ms; {}",
        perf.total_time_ms,
        perf.downtime_ms,
        summary(&reports)
    );
    assert!(perf.post_copy, "switched to post-copy");
    assert_eq!(perf.max_cpu_throttle_percent, 0);
    if post_copy == PostCopy::Allowed {
        assert!(
            reports.iter().any(|p| p.converging == Some(false)),
            "the switch followed a 'not converging' judgement"
        );
    }
    lab.complete("m-pc", &perf).await;
}

#[tokio::test]
async fn post_copy_after_seconds_completes() {
    post_copy_case("pc-after", PostCopy::After(Duration::from_secs(3))).await;
}

#[tokio::test]
async fn post_copy_allowed_switches_when_pre_copy_does_not_converge() {
    post_copy_case("pc-allowed", PostCopy::Allowed).await;
}

/// Over TLS: every multifd channel does its own handshake.
async fn multifd_case(vm: &str, spec: MigrationPolicy, channels: u64, compression: &str) {
    let lab = calm_lab(vm).with_tls();
    lab.start_source().await;
    let policy = resolve(&spec).unwrap();
    let prep = lab.begin_and_prepare("m-mfd", &policy).await.unwrap();
    let target = lab.b.require(&lab.vm).await.unwrap();
    let (res, reports) =
        run_perform(&lab, "m-mfd", &prep, &policy, &CancellationToken::new()).await;
    let perf = res.unwrap();
    eprintln!(
        "multifd {channels} x {compression}: {} ms; {}",
        perf.total_time_ms,
        summary(&reports)
    );
    for sup in [&lab.a, &lab.b] {
        let guest = sup.require(&lab.vm).await.unwrap();
        let params: serde_json::Value = guest
            .qmp
            .execute("query-migrate-parameters", None)
            .await
            .unwrap();
        assert_eq!(params["multifd-channels"], channels);
        assert_eq!(params["multifd-compression"], compression);
        let caps: serde_json::Value = guest
            .qmp
            .execute("query-migrate-capabilities", None)
            .await
            .unwrap();
        let multifd = caps
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["capability"] == "multifd")
            .unwrap();
        assert_eq!(multifd["state"], true);
    }
    drop(target);
    lab.complete("m-mfd", &perf).await;
}

#[tokio::test]
async fn fastest_preset_migrates_over_four_multifd_channels() {
    let spec = MigrationPolicy {
        preset: Some(Preset::Fastest),
        ..Default::default()
    };
    multifd_case("mfd-4", spec, 4, "none").await;
}

#[tokio::test]
async fn zstd_compressed_multifd_migrates() {
    let spec = MigrationPolicy {
        parallel_connections: Some(2),
        compression: Some(Compression::Zstd),
        ..Default::default()
    };
    multifd_case("mfd-zstd", spec, 2, "zstd").await;
}

async fn timeout_case(vm: &str, policy: Policy, limit: &str) {
    let lab = hot_lab(vm);
    lab.start_source().await;
    let prep = lab.begin_and_prepare("m-to", &policy).await.unwrap();
    let (res, reports) = run_perform(&lab, "m-to", &prep, &policy, &CancellationToken::new()).await;
    let err = res.expect_err("the limit aborts the migration");
    eprintln!("{err}; {}", summary(&reports));
    assert!(
        matches!(&err.kind, ErrorKind::LimitExceeded(m) if m.starts_with(limit)),
        "{err}"
    );
    assert!(err.to_string().contains("aborted by the policy"), "{err}");
    roll_back(&lab, "m-to").await;
}

#[tokio::test]
async fn completion_timeout_aborts_and_the_guest_stays_on_the_source() {
    // 24 s per GiB of a 128 MiB guest: 3 s.
    let policy = Policy {
        auto_converge: false,
        post_copy: PostCopy::Never,
        completion_timeout_per_gib: Some(Duration::from_secs(24)),
        progress_timeout: None,
        ..limited(MigrationPolicy::default())
    };
    timeout_case("to-completion", policy, "completion timeout").await;
}

#[tokio::test]
async fn progress_timeout_aborts_and_the_guest_stays_on_the_source() {
    let policy = Policy {
        auto_converge: false,
        post_copy: PostCopy::Never,
        completion_timeout_per_gib: None,
        progress_timeout: Some(Duration::from_secs(4)),
        ..limited(MigrationPolicy::default())
    };
    timeout_case("to-progress", policy, "progress timeout").await;
}
