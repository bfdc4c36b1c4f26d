use super::*;
use ferry_crds::PostCopy as SpecPostCopy;

const MIB: u64 = 1 << 20;

fn spec() -> MigrationPolicy {
    MigrationPolicy::default()
}

#[test]
fn balanced_is_the_default_and_presets_say_what_they_set() {
    let p = resolve(&spec()).unwrap();
    assert_eq!(p, Policy::default());
    assert_eq!(p, preset(Preset::Balanced));
    assert_eq!(p.max_bandwidth, None);
    assert!(p.auto_converge);
    assert_eq!(p.post_copy, PostCopy::Allowed);
    assert_eq!(p.parallel_connections, 1);
    assert_eq!(p.max_downtime_ms, 500);

    let safest = resolve(&MigrationPolicy {
        preset: Some(Preset::Safest),
        ..spec()
    })
    .unwrap();
    assert_eq!(safest.post_copy, PostCopy::Never);
    assert!(safest.auto_converge);
    assert_eq!(safest.max_downtime_ms, 300);

    let fastest = resolve(&MigrationPolicy {
        preset: Some(Preset::Fastest),
        ..spec()
    })
    .unwrap();
    assert_eq!(fastest.parallel_connections, 4);
    assert!(fastest.multifd());
    assert_eq!(fastest.post_copy, PostCopy::Never);
    for p in [Preset::Fastest, Preset::Safest, Preset::Balanced] {
        preset(p).check().unwrap();
        assert_eq!(preset(p).max_bandwidth, None, "{p:?} is unlimited");
    }
}

#[test]
fn explicit_fields_override_the_preset() {
    let p = resolve(&MigrationPolicy {
        preset: Some(Preset::Safest),
        bandwidth_mi_bps: Some(16),
        max_downtime_ms: Some(2000),
        auto_converge: Some(false),
        post_copy: Some(SpecPostCopy {
            mode: PostCopyMode::AfterSeconds,
            after_seconds: Some(5),
        }),
        completion_timeout_per_gi_b_seconds: Some(10),
        progress_timeout_seconds: Some(7),
        ..spec()
    })
    .unwrap();
    assert_eq!(p.max_bandwidth, Some(16 * MIB));
    assert_eq!(p.max_downtime_ms, 2000);
    assert!(!p.auto_converge);
    assert_eq!(p.post_copy, PostCopy::After(Duration::from_secs(5)));
    assert_eq!(p.completion_timeout_per_gib, Some(Duration::from_secs(10)));
    assert_eq!(p.progress_timeout, Some(Duration::from_secs(7)));
    assert_eq!(
        p.completion_timeout(512 * MIB),
        Some(Duration::from_secs(5))
    );

    // 0 MiB/s is unlimited, also over a preset.
    let p = resolve(&MigrationPolicy {
        bandwidth_mi_bps: Some(0),
        ..spec()
    })
    .unwrap();
    assert_eq!(p.max_bandwidth, None);
}

#[test]
fn impossible_policies_are_refused_with_the_field() {
    let err = resolve(&MigrationPolicy {
        parallel_connections: Some(4),
        compression: Some(Compression::Zlib),
        post_copy: Some(SpecPostCopy {
            mode: PostCopyMode::AfterSeconds,
            after_seconds: Some(1),
        }),
        ..spec()
    })
    .unwrap_err();
    assert!(
        err.to_string().contains("cannot be combined with multifd"),
        "{err}"
    );
    // Explicit fields win over the preset's side of the conflict.
    let p = resolve(&MigrationPolicy {
        compression: Some(Compression::Zstd),
        ..spec()
    })
    .unwrap();
    assert_eq!(
        (p.compression, p.post_copy),
        (Compression::Zstd, PostCopy::Never)
    );
    let p = resolve(&MigrationPolicy {
        preset: Some(Preset::Fastest),
        post_copy: Some(SpecPostCopy {
            mode: PostCopyMode::Allowed,
            after_seconds: None,
        }),
        ..spec()
    })
    .unwrap();
    assert_eq!(
        (p.parallel_connections, p.post_copy),
        (1, PostCopy::Allowed)
    );
    let err = resolve(&MigrationPolicy {
        parallel_connections: Some(2),
        post_copy: Some(SpecPostCopy {
            mode: PostCopyMode::Allowed,
            after_seconds: None,
        }),
        ..spec()
    })
    .unwrap_err();
    assert!(matches!(err, PolicyError::PostCopyWithMultifd { .. }));
    let err = resolve(&MigrationPolicy {
        parallel_connections: Some(0),
        ..spec()
    })
    .unwrap_err();
    assert!(err.to_string().contains("parallelConnections"), "{err}");
    let err = resolve(&MigrationPolicy {
        max_downtime_ms: Some(0),
        ..spec()
    })
    .unwrap_err();
    assert!(err.to_string().contains("maxDowntimeMs"), "{err}");
}

fn caps(s: &Settings) -> Vec<(&'static str, bool)> {
    s.capabilities.clone()
}

#[test]
fn settings_per_side() {
    // Balanced: one stream, post-copy on both sides, auto-converge on the source.
    let p = Policy::default();
    let src = p.settings(Side::Source);
    assert_eq!(
        caps(&src),
        vec![
            ("events", true),
            ("multifd", false),
            ("postcopy-ram", true),
            ("postcopy-preempt", true),
            ("auto-converge", true)
        ]
    );
    assert_eq!(
        src.parameters_args(),
        json!({"max-bandwidth": UNLIMITED_BANDWIDTH, "max-postcopy-bandwidth": 0, "downtime-limit": INITIAL_DOWNTIME_MS})
    );
    let dst = p.settings(Side::Target);
    assert_eq!(
        caps(&dst),
        vec![
            ("events", true),
            ("multifd", false),
            ("postcopy-ram", true),
            ("postcopy-preempt", true)
        ]
    );
    assert_eq!(dst.parameters_args(), json!({}));

    // Multifd with zstd: channels and compression on both sides.
    let p = Policy {
        parallel_connections: 4,
        compression: Compression::Zstd,
        post_copy: PostCopy::Never,
        max_bandwidth: Some(8 * MIB),
        ..Policy::default()
    };
    p.check().unwrap();
    for side in [Side::Source, Side::Target] {
        let s = p.settings(side);
        assert!(s.capabilities.contains(&("multifd", true)));
        assert!(s.capabilities.contains(&("postcopy-ram", false)));
        assert!(s.capabilities.contains(&("postcopy-preempt", false)));
        assert_eq!(s.parameters["multifd-channels"], json!(4));
        assert_eq!(s.parameters["multifd-compression"], json!("zstd"));
    }
    assert_eq!(
        p.settings(Side::Source).parameters["max-bandwidth"],
        json!(8 * MIB)
    );
    assert_eq!(
        p.settings(Side::Source).parameters["max-postcopy-bandwidth"],
        json!(8 * MIB)
    );
    assert_eq!(
        p.settings(Side::Source).capabilities_args()["capabilities"][0],
        json!({"capability": "events", "state": true})
    );
}

fn sample(pass: u64, dirty: u64, throughput: u64, secs: u64) -> Sample {
    Sample {
        pass,
        total_bytes: 64 * MIB,
        remaining_bytes: 32 * MIB,
        dirty_rate: dirty,
        throughput,
        cpu_throttle_percent: 0,
        post_copy: false,
        elapsed: Duration::from_secs(secs),
    }
}

#[test]
fn convergence_is_judged_over_the_last_passes() {
    let mut c = Convergence::default();
    // The first copy and pass 2 (whose rates describe the first copy) are not judged.
    c.observe(&sample(1, 0, 16 * MIB, 1));
    c.observe(&sample(2, 4 * MIB, 16 * MIB, 4));
    assert_eq!(c.judge(), Judgement::Unknown);
    for (pass, t) in [(3, 6), (4, 8)] {
        c.observe(&sample(pass, 16 * MIB, 16 * MIB, t));
    }
    assert_eq!(c.judge(), Judgement::Unknown);
    c.observe(&sample(5, 15 * MIB, 16 * MIB, 10));
    assert_eq!(c.judge(), Judgement::NotConverging);
    // One cool pass in the window: converging.
    c.observe(&sample(6, 4 * MIB, 16 * MIB, 12));
    assert_eq!(c.judge(), Judgement::Converging);
    assert_eq!(c.judge().converging(), Some(true));
    // Several samples of one pass count once (the last one).
    c.observe(&sample(7, 20 * MIB, 16 * MIB, 13));
    c.observe(&sample(7, 20 * MIB, 16 * MIB, 14));
    c.observe(&sample(8, 20 * MIB, 16 * MIB, 16));
    assert_eq!(
        c.judge(),
        Judgement::Converging,
        "pass 6 is still in the window"
    );
    c.observe(&sample(9, 20 * MIB, 16 * MIB, 18));
    assert_eq!(c.judge(), Judgement::NotConverging);
}

#[test]
fn eta_by_mode() {
    let s = Sample {
        remaining_bytes: 40 * MIB,
        ..sample(4, 6 * MIB, 16 * MIB, 5)
    };
    assert_eq!(eta(&s, Judgement::Converging), Some(Duration::from_secs(4)));
    assert_eq!(eta(&s, Judgement::NotConverging), None);
    let post = Sample {
        post_copy: true,
        ..s
    };
    assert_eq!(
        eta(&post, Judgement::NotConverging),
        Some(Duration::from_secs_f64(2.5))
    );
    let first = Sample { pass: 1, ..s };
    assert_eq!(
        eta(&first, Judgement::Unknown),
        Some(Duration::from_secs_f64(2.5))
    );
    assert_eq!(eta(&Sample::default(), Judgement::Unknown), None);
}

fn hot(c: &mut Convergence, throttle: u64) -> Sample {
    let mut last = Sample::default();
    for pass in 1..=6 {
        last = Sample {
            cpu_throttle_percent: throttle,
            ..sample(pass, 16 * MIB, 16 * MIB, pass * 2)
        };
        c.observe(&last);
    }
    last
}

#[test]
fn post_copy_switch_decisions() {
    let allowed_no_throttle = Policy {
        auto_converge: false,
        progress_timeout: None,
        ..Policy::default()
    };
    let mut c = Convergence::default();
    let s = hot(&mut c, 0);
    assert!(matches!(
        decide(&allowed_no_throttle, &c, &s),
        Action::StartPostCopy(why) if why.contains("does not converge")
    ));
    // With auto-converge, Allowed waits until the throttle is at its maximum.
    let balanced = Policy {
        progress_timeout: None,
        ..Policy::default()
    };
    let mut c = Convergence::default();
    let s = hot(&mut c, 60);
    assert_eq!(decide(&balanced, &c, &s), Action::Continue);
    let s = hot(&mut c, 99);
    assert!(matches!(
        decide(&balanced, &c, &s),
        Action::StartPostCopy(_)
    ));
    // Never never switches; AfterSeconds switches on time whatever the judgement.
    let never = Policy {
        post_copy: PostCopy::Never,
        ..balanced.clone()
    };
    assert_eq!(decide(&never, &c, &s), Action::Continue);
    let after = Policy {
        post_copy: PostCopy::After(Duration::from_secs(3)),
        ..balanced.clone()
    };
    let mut c = Convergence::default();
    let early = sample(1, 0, 16 * MIB, 2);
    c.observe(&early);
    assert_eq!(decide(&after, &c, &early), Action::Continue);
    let late = sample(1, 0, 16 * MIB, 3);
    c.observe(&late);
    assert!(matches!(
        decide(&after, &c, &late),
        Action::StartPostCopy(_)
    ));
    // In post-copy: nothing more to decide.
    let post = Sample {
        post_copy: true,
        elapsed: Duration::from_secs(10_000),
        ..late
    };
    assert_eq!(decide(&after, &c, &post), Action::Continue);
}

#[test]
fn timeouts_abort_pre_copy() {
    let p = Policy {
        post_copy: PostCopy::Never,
        completion_timeout_per_gib: None,
        progress_timeout: Some(Duration::from_secs(5)),
        ..Policy::default()
    };
    let mut c = Convergence::default();
    // Remaining shrinks: progress.
    for t in 0..4 {
        let s = Sample {
            remaining_bytes: (60 - 10 * t) * MIB,
            ..sample(1, 0, 16 * MIB, t)
        };
        c.observe(&s);
        assert_eq!(decide(&p, &c, &s), Action::Continue);
    }
    // Then the remaining data saws up and down but never reaches a new low.
    let mut s = Sample::default();
    for t in 4..=9 {
        s = Sample {
            remaining_bytes: (40 - t % 2 * 5) * MIB,
            ..sample(2, 16 * MIB, 16 * MIB, t)
        };
        c.observe(&s);
    }
    assert_eq!(c.since_progress(s.elapsed), Duration::from_secs(6));
    let a = decide(&p, &c, &s);
    assert_eq!(
        a,
        Action::Abort(Limit::Progress {
            limit: Duration::from_secs(5)
        })
    );
    if let Action::Abort(l) = a {
        assert!(l.to_string().starts_with("progress timeout"), "{l}");
    }
    // 64 s per GiB of a 64 MiB guest: 4 s.
    let p = Policy {
        completion_timeout_per_gib: Some(Duration::from_secs(64)),
        progress_timeout: None,
        ..p
    };
    let a = decide(&p, &c, &sample(3, 0, MIB, 5));
    assert_eq!(
        a,
        Action::Abort(Limit::Completion {
            limit: Duration::from_secs(4)
        })
    );
    if let Action::Abort(l) = a {
        assert!(l.to_string().starts_with("completion timeout"), "{l}");
    }
}

#[test]
fn the_explanation_says_what_the_policy_will_do() {
    let s = sample(5, 16 * MIB, 16 * MIB, 10);
    let e = explain(&Policy::default(), Judgement::NotConverging, &s);
    assert!(e.starts_with("not converging"), "{e}");
    assert!(e.contains("auto-converge"), "{e}");
    assert!(e.contains("post-copy"), "{e}");
    let safest = preset(Preset::Safest);
    let e = explain(&safest, Judgement::Converging, &s);
    assert!(!e.contains("post-copy"), "{e}");
}

#[test]
fn the_downtime_limit_starts_low_and_rises_pass_by_pass_to_the_maximum_and_no_further() {
    let p = Policy::default();
    assert_eq!(p.max_downtime_ms, 500);
    let ramp: Vec<u64> = (1..=10).map(|pass| p.downtime_limit(pass)).collect();
    assert_eq!(ramp, [50, 50, 140, 230, 320, 410, 500, 500, 500, 500]);
    // A maximum under the initial limit is the limit from the start.
    let tight = Policy {
        max_downtime_ms: 20,
        ..Policy::default()
    };
    assert!((0..100).all(|pass| tight.downtime_limit(pass) == 20));
    // Never above the maximum, however many passes.
    for max in [1, 49, 50, 51, 300, 1000, 60_000] {
        let p = Policy {
            max_downtime_ms: max,
            ..Policy::default()
        };
        let mut last = 0;
        for pass in 0..1000 {
            let limit = p.downtime_limit(pass);
            assert!(
                limit <= max && limit >= last,
                "max {max} pass {pass}: {limit}"
            );
            last = limit;
        }
        assert_eq!(last, max);
    }
}
