//! A mobile app links the SDK without the relay: with `default-features = false` the crate
//! builds, and pulls in none of the server's dependencies.

use std::process::Command;

fn cargo() -> Command {
    let mut cmd = Command::new(env!("CARGO"));
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"));
    cmd
}

/// The crates the library depends on (imrelay itself left out) with `features` on top of
/// `--no-default-features`, sorted, once each.
fn sdk_deps(features: &[&str]) -> Vec<String> {
    let mut args = vec!["tree", "--no-default-features"];
    if !features.is_empty() {
        args.push("--features");
        args.extend(features);
    }
    args.extend(["-e", "normal", "--prefix", "none"]);
    let tree = cargo().args(&args).output().expect("cargo tree");
    assert!(
        tree.status.success(),
        "{}",
        String::from_utf8_lossy(&tree.stderr)
    );
    let mut deps: Vec<String> = String::from_utf8_lossy(&tree.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .filter(|name| name != "imrelay")
        .collect();
    deps.sort();
    deps.dedup();
    deps
}

#[test]
fn the_sdk_builds_without_the_server_and_its_dependencies() {
    let deps = sdk_deps(&[]);
    assert_eq!(deps, ["byteorder", "bytes", "libc", "log", "socket2"]);

    // Its own target dir: the outer `cargo test` holds the lock on the default one.
    let target = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("sdk-only");
    let check = cargo()
        .args(["check", "--no-default-features", "--lib", "--target-dir"])
        .arg(&target)
        .output()
        .expect("cargo check");
    assert!(
        check.status.success(),
        "the SDK alone does not build:\n{}",
        String::from_utf8_lossy(&check.stderr)
    );
}

#[test]
fn tls_for_the_sdk_pulls_in_no_server_dependency() {
    let deps = sdk_deps(&["tls"]);
    for name in &deps {
        assert!(
            !["mio", "clap", "jsonwebtoken", "tungstenite", "env_logger"].contains(&name.as_str()),
            "{name} in the SDK's tree with TLS"
        );
    }
    assert!(deps.iter().any(|d| d == "rustls"), "{deps:?}");
}
