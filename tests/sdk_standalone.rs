//! A mobile app links the SDK without the relay: with `default-features = false` the crate
//! builds, and pulls in none of the server's dependencies.

use std::process::Command;

fn cargo() -> Command {
    let mut cmd = Command::new(env!("CARGO"));
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"));
    cmd
}

#[test]
fn the_sdk_builds_without_the_server_and_its_dependencies() {
    let tree = cargo()
        .args([
            "tree",
            "--no-default-features",
            "-e",
            "normal",
            "--prefix",
            "none",
        ])
        .output()
        .expect("cargo tree");
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
