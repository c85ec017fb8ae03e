//! The .deb that `cargo +stable xtask dist` builds: lintian (Debian's package checker) finds
//! no error and no warning; installed with dpkg into a clean Debian root (made by mmdebstrap,
//! see `xtask setup`) it puts exactly its files in place, runs no maintainer script and enables
//! nothing; there, in a chroot, `twtrace --version` names the packaged binary and `twtrace
//! watch` traces real connections made on loopback; purging it leaves no file behind.
//!
//! The install test needs root (chroot, mounts in a mount namespace of its own, and twtrace
//! loads its programs).

use std::{collections::BTreeSet, path::Path, process::Command, time::Duration};

use twtrace_tests::{
    Run, Server, TempDir, client,
    deploy::{combined, deploy, output, read, tool},
    dist, docs, require_root, run, shared, unique_port,
};

#[test]
fn deb_is_lintian_clean() {
    let deb = dist::archive(".deb");
    let out = output(
        Command::new(tool("lintian", "lintian"))
            .args(["--fail-on", "error,warning", "--display-level", ">=warning"])
            .arg(&deb),
    );
    let all = combined(&out);
    // Lintian's own complaint about running as root is about lintian, not the package.
    let findings: Vec<&str> = all
        .lines()
        .filter(|l| !l.contains("running with root privileges is not recommended"))
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert!(
        out.status.success() && findings.is_empty(),
        "lintian {} ({}):\n{}",
        deb.display(),
        out.status,
        findings.join("\n")
    );
}

/// A Debian root unpacked from the cached mmdebstrap tarball, removed on drop.
struct DebianRoot(TempDir);

impl DebianRoot {
    fn unpack() -> Self {
        let dir = TempDir::new("debian-root");
        run(Command::new("tar")
            .arg("-xf")
            .arg(dist::debian_root())
            .arg("-C")
            .arg(&dir.0));
        DebianRoot(dir)
    }

    fn path(&self) -> &Path {
        &self.0.0
    }

    /// `chroot ROOT ARGS...`
    fn chroot(&self, args: &[&str]) -> Command {
        let mut c = Command::new("chroot");
        c.arg(self.path()).args(args);
        c
    }

    /// `ARGS...` run in the chroot with /proc and a read-only /sys mounted, in a mount
    /// namespace of its own: the mounts end with the command and never show on the host.
    fn chroot_with_kernel(&self, args: &[&str]) -> Command {
        let mut c = Command::new("unshare");
        c.args(["--mount", "--propagation", "private", "--", "sh", "-c"])
            .arg(
                "mount -t proc proc \"$0/proc\" && mount -t sysfs -o ro sysfs \"$0/sys\" \
                 && exec chroot \"$0\" \"$@\"",
            )
            .arg(self.path())
            .args(args);
        c
    }

    fn installed_files(&self) -> BTreeSet<String> {
        run(&mut self.chroot(&["dpkg-query", "-L", "twtrace"]))
            .lines()
            .filter(|l| self.path().join(l.trim_start_matches('/')).is_file())
            .map(str::to_owned)
            .collect()
    }
}

#[test]
fn deb_installs_runs_and_purges_in_a_clean_debian_root() {
    require_root();
    let deb = dist::archive(".deb");
    let root = DebianRoot::unpack();
    std::fs::copy(&deb, root.path().join("tmp/twtrace.deb")).expect("copy the .deb in");
    run(&mut root.chroot(&["dpkg", "--install", "/tmp/twtrace.deb"]));

    // Exactly these files: the man pages are those the CLI generates, gzipped.
    let mut want: BTreeSet<String> = [
        "/usr/sbin/twtrace",
        "/usr/share/bash-completion/completions/twtrace",
        "/usr/share/zsh/vendor-completions/_twtrace",
        "/usr/share/fish/vendor_completions.d/twtrace.fish",
        "/usr/lib/systemd/system/twtrace.service",
        "/usr/share/doc/twtrace/copyright",
        "/usr/share/doc/twtrace/changelog.gz",
        "/usr/share/lintian/overrides/twtrace",
    ]
    .map(str::to_owned)
    .into();
    for (name, _) in docs::render() {
        if let Some(page) = name.strip_prefix("man/") {
            want.insert(format!("/usr/share/man/man{}/{page}.gz", docs::SECTION));
        }
    }
    assert_eq!(root.installed_files(), want);

    // The packaged binary is the one dist built; the unit is the committed one, starting it
    // from /usr/sbin; nothing enabled it, no maintainer script came with the package.
    let packaged = std::fs::read(root.path().join("usr/sbin/twtrace")).unwrap();
    assert!(
        packaged == std::fs::read(dist::binary()).unwrap(),
        "/usr/sbin/twtrace is not dist's binary"
    );
    let unit = read(&root.path().join("usr/lib/systemd/system/twtrace.service"));
    let committed = read(&deploy().join("systemd/twtrace.service"));
    assert_eq!(
        unit,
        committed.replace(
            "ExecStart=/usr/local/bin/twtrace ",
            "ExecStart=/usr/sbin/twtrace "
        )
    );
    assert!(unit.contains("\nExecStart=/usr/sbin/twtrace serve --listen 127.0.0.1:9979\n"));
    let wants = root
        .path()
        .join("etc/systemd/system/multi-user.target.wants");
    assert!(
        !wants.join("twtrace.service").exists(),
        "the package enabled the unit"
    );
    for script in ["preinst", "postinst", "prerm", "postrm"] {
        let path = root
            .path()
            .join(format!("var/lib/dpkg/info/twtrace.{script}"));
        assert!(!path.exists(), "the package has a {script} script");
    }

    let version = run(&mut root.chroot(&["twtrace", "--version"]));
    assert_eq!(
        version,
        run(Command::new(dist::binary()).arg("--version")),
        "twtrace --version in the chroot"
    );
    assert!(version.starts_with(&format!("twtrace {} (git ", env!("CARGO_PKG_VERSION"))));

    // `twtrace watch --duration 2s` in the chroot sees connections made on loopback.
    let _g = shared();
    let port = unique_port();
    let peer = format!("127.0.0.1:{port}");
    let _server = Server::start(None, &peer, &[]);
    let watch = Run::spawn(
        root.chroot_with_kernel(&[
            "twtrace",
            "watch",
            "--duration",
            "2s",
            "--json",
            "--port",
            &port.to_string(),
        ]),
        "tracing TIME_WAIT",
    );
    let c = client(None, &["--to", &peer, "--count", "5"]);
    let r = watch.finish(Duration::from_secs(20));
    assert!(r.status.success(), "{}: {}", r.status, r.stderr);
    let births: Vec<serde_json::Value> = r
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .filter(|e: &serde_json::Value| e["event"] == "tw_enter")
        .collect();
    assert_eq!(births.len(), 5, "{}", r.stdout);
    for b in &births {
        assert_eq!(b["pid"], c.pid, "{b}");
        assert_eq!(b["remote_port"], port, "{b}");
    }
    assert_eq!(twtrace_tests::lost_from(&r.stderr), 0, "{}", r.stderr);

    run(&mut root.chroot(&["dpkg", "--purge", "twtrace"]));
    for file in &want {
        assert!(
            !root.path().join(file.trim_start_matches('/')).exists(),
            "{file} left after purge"
        );
    }
}
