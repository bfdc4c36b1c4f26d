//! The two descriptions of each image agree (issue 16, "Images"): `make images`
//! (images/build.sh, no container engine) and the Containerfile a Docker or Podman user
//! builds both take what goes into the image from `images/<name>/`: the Debian packages
//! (`packages`), and the base variant, binaries, entrypoint and user (`image.env`).
//! This reads both and checks each fact; `make images` itself prints what it built.

use std::collections::BTreeMap;
use std::path::PathBuf;

use ferry_tests::repo_root;

const IMAGES: [&str; 2] = ["operator", "agent"];

fn dir(image: &str) -> PathBuf {
    repo_root().join("images").join(image)
}

/// `images/<image>/image.env`: `KEY=value` lines, `#` comments.
fn env(image: &str) -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(dir(image).join("image.env")).unwrap();
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l
                .split_once('=')
                .unwrap_or_else(|| panic!("{image}: {l:?}"));
            (k.to_string(), v.to_string())
        })
        .collect()
}

fn containerfile(image: &str) -> Vec<String> {
    std::fs::read_to_string(dir(image).join("Containerfile"))
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

/// The instructions of the Containerfile's last stage (after its last `FROM`).
fn final_stage(lines: &[String]) -> &[String] {
    let last = lines.iter().rposition(|l| l.starts_with("FROM ")).unwrap();
    &lines[last..]
}

#[test]
fn every_image_has_both_descriptions() {
    let found: Vec<String> = std::fs::read_dir(repo_root().join("images"))
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    for image in IMAGES {
        assert!(
            found.iter().any(|f| f == image),
            "images/{image} is missing"
        );
        for file in ["Containerfile", "image.env", "packages"] {
            assert!(dir(image).join(file).is_file(), "images/{image}/{file}");
        }
    }
    assert_eq!(
        found.len(),
        IMAGES.len(),
        "an image this test does not know: {found:?}"
    );
}

#[test]
fn the_containerfile_installs_the_package_list() {
    for image in IMAGES {
        let packages = std::fs::read_to_string(dir(image).join("packages")).unwrap();
        let names: Vec<&str> = packages
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .collect();
        assert!(!names.is_empty(), "{image}: no packages");
        let debian_name = |n: &str| {
            !n.is_empty()
                && n.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+-.".contains(&b))
        };
        let lines = containerfile(image);
        for entry in &names {
            // NAME, or NAME/SUITE for a package from another suite (apt's syntax), which
            // the Containerfile must then add to apt's sources (images/build.sh always does).
            let (name, suite) = match entry.split_once('/') {
                Some((n, s)) => (n, Some(s)),
                None => (*entry, None),
            };
            assert!(
                debian_name(name),
                "{image}: not a Debian package name: {entry:?}"
            );
            if let Some(suite) = suite {
                assert_eq!(suite, "bookworm-backports", "{image}: {entry:?}");
                assert!(
                    lines.iter().any(|l| l.contains("bookworm-backports main")),
                    "{image}: {entry:?} but the Containerfile does not add {suite} to apt's sources"
                );
            }
        }
        let copy = format!("COPY images/{image}/packages /tmp/packages");
        assert!(
            lines.contains(&copy),
            "{image}: the Containerfile lacks {copy:?}"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.contains("$(grep -v '^#' /tmp/packages")),
            "{image}: the Containerfile does not install the list it copies"
        );
    }
}

#[test]
fn the_base_variant_binaries_entrypoint_and_user_agree() {
    for image in IMAGES {
        let env = env(image);
        let lines = containerfile(image);
        let last = final_stage(&lines);
        // The base: Debian's minimal base, or only the packages' files (no shell).
        let base = match env["VARIANT"].as_str() {
            "minbase" => "FROM docker.io/library/debian:bookworm-slim",
            "extract" => "FROM scratch",
            other => panic!("{image}: a variant the Containerfile has no base for: {other}"),
        };
        assert_eq!(last[0], base, "{image}: the final stage's base");
        if env["VARIANT"] == "extract" {
            assert!(
                last.contains(&"COPY --from=rootfs /rootfs /".to_string())
                    && lines.iter().any(|l| l.contains("dpkg-deb -x")),
                "{image}: an extract image's root file system is the packages extracted"
            );
        }
        for bin in env["BINARIES"].split_whitespace() {
            let build = format!("RUN cargo build --release --locked --bin {bin}");
            assert!(lines.contains(&build), "{image}: lacks {build:?}");
            let copy = format!("COPY --from=build /src/target/release/{bin} /usr/local/bin/{bin}");
            assert!(last.contains(&copy), "{image}: lacks {copy:?}");
        }
        let entrypoint = format!("ENTRYPOINT [\"{}\"]", env["ENTRYPOINT"]);
        assert!(last.contains(&entrypoint), "{image}: lacks {entrypoint:?}");
        let user = format!("USER {}", env["USER"]);
        assert!(last.contains(&user), "{image}: lacks {user:?}");
    }
}

/// What the chart asks of the images: `<repository>/ferry-<component>` with the
/// component's binary as the entrypoint (the chart passes only `args`), and a numeric
/// non-root user for the operator (its Pod runs with `runAsNonRoot`).
#[test]
fn the_images_are_what_the_chart_runs() {
    let helpers =
        std::fs::read_to_string(repo_root().join("charts/ferry/templates/_helpers.tpl")).unwrap();
    assert!(
        helpers.contains("\"%s/ferry-%s:%s\""),
        "the chart's image name changed"
    );
    for image in IMAGES {
        let env = env(image);
        assert_eq!(env["ENTRYPOINT"], format!("/usr/local/bin/ferry-{image}"));
        let template = repo_root().join(match image {
            "operator" => "charts/ferry/templates/operator-deployment.yaml",
            _ => "charts/ferry/templates/agent-daemonset.yaml",
        });
        let text = std::fs::read_to_string(template).unwrap();
        assert!(
            text.contains("args:") && !text.contains("command:"),
            "{image}: the chart must leave the entrypoint to the image"
        );
    }
    let values = std::fs::read_to_string(repo_root().join("charts/ferry/values.yaml")).unwrap();
    assert!(values.contains("runAsNonRoot: true"));
    let user = env("operator")["USER"].clone();
    let uid: u32 = user.split(':').next().unwrap().parse().unwrap();
    assert_ne!(uid, 0, "the operator runs as non-root: {user}");
}
