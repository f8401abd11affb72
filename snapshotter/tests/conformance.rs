//! containerd's own snapshotter conformance suite against cora-snapshotter: the Go test in
//! `snapshotter/conformance` (containerd's `snapshots/testsuite` through its proxy client, as
//! Debian's golang-github-containerd-containerd-dev ships them) built with Debian's Go in
//! GOPATH mode and run here. Every subtest must pass; one the suite skips itself is reported.
use anyhow::{Context, Result, bail, ensure};
use std::path::Path;
use std::process::Command;

const GOCODE: &str = "/usr/share/gocode";
/// The suite's subtests (containerd 1.6's `SnapshotterSuite`).
const SUBTESTS: &[&str] = &[
    "Basic",
    "StatActive",
    "StatComitted",
    "TransitivityTest",
    "PreareViewFailingtest",
    "Update",
    "Remove",
    "Walk",
    "LayerFileupdate",
    "RemoveDirectoryInLowerLayer",
    "Chown",
    "DirectoryPermissionOnCommit",
    "RemoveIntermediateSnapshot",
    "DeletedFilesInChildSnapshot",
    "MoveFileFromLowerLayer",
    "Rename",
    "ViewReadonly",
    "StatInWalk",
    "CloseTwice",
    "RootPermission",
    "128LayersMount",
];

#[test]
fn containerd_snapshotter_test_suite_passes() -> Result<()> {
    let suite = Path::new(GOCODE).join("src/github.com/containerd/containerd/snapshots/testsuite");
    if !suite.is_dir() {
        bail!(
            "{} missing: apt-get install golang-go golang-github-containerd-containerd-dev",
            suite.display()
        );
    }
    // GOPATH mode: our package under a private GOPATH, everything else from Debian's.
    let gopath = tempfile::tempdir()?;
    let pkg = gopath.path().join("src/cora-conformance");
    std::fs::create_dir_all(&pkg)?;
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("conformance/conformance_test.go");
    std::fs::copy(&src, pkg.join("conformance_test.go"))
        .with_context(|| format!("copying {}", src.display()))?;
    let out = Command::new("go")
        .args(["test", "-count=1", "-v", "-timeout", "20m", "."])
        .current_dir(&pkg)
        .env("GO111MODULE", "off")
        .env("GOPATH", format!("{}:{GOCODE}", gopath.path().display()))
        .env("GOFLAGS", "")
        .env("CORA_SNAPSHOTTER", env!("CARGO_BIN_EXE_cora-snapshotter"))
        .output()
        .context("running go test (apt-get install golang-go)")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        out.status.success(),
        "the conformance suite failed:\n{text}"
    );
    let mut skipped = Vec::new();
    for t in SUBTESTS {
        let name = format!("TestCoraSnapshotter/{t} ");
        if text.contains(&format!("--- SKIP: {name}")) {
            skipped.push(*t);
            continue;
        }
        ensure!(
            text.contains(&format!("--- PASS: {name}")),
            "subtest {t} did not pass:\n{text}"
        );
    }
    println!(
        "conformance: {} of {} subtests passed; skipped by the suite: {skipped:?}",
        SUBTESTS.len() - skipped.len(),
        SUBTESTS.len()
    );
    ensure!(
        skipped.len() <= 1,
        "more subtests skipped than the suite's one: {skipped:?}"
    );
    Ok(())
}
