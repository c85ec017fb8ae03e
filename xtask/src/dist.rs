//! `cargo +stable xtask dist`: what an operator installs, built from this tree into
//! `target/packages/` (paths in [`Artifacts`]; the kernel-matrix guests take the tarball):
//!
//! * `twtrace`: a static x86-64 binary (musl, see [`TARGET`]), the kernel programs embedded,
//!   stripped; its size is printed;
//! * `twtrace-VERSION-x86_64-linux.tar.gz`: that binary, the man pages, the shell completions,
//!   the systemd unit, the licences and a SHA256SUMS of them;
//! * `twtrace_VERSION-1_amd64.deb`: the same files where Debian puts them, the unit installed
//!   but not enabled, no maintainer scripts;
//! * `twtrace-VERSION-oci.tar`: an OCI image (oci-archive, `podman load -i`) holding only the
//!   binary, made by buildah from scratch, with no registry;
//! * `SHA256SUMS` of those three.
//!
//! The man pages and completions are generated from the CLI by `twt-docs` (tests crate).
//! Everything but the binary is reproducible: file times are the commit's time
//! (`SOURCE_DATE_EPOCH`).

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use crate::{cargo, root, setup, status};

/// musl rather than glibc linked statically: glibc's `getpwnam_r` (serve's `--user`) loads NSS
/// modules at run time, which a static binary can only get from the same glibc release as it
/// was linked with: on another distribution, or in an image holding nothing but the binary, the
/// user lookup fails. musl reads /etc/passwd itself. Measured: see DEVELOPERS.md.
pub const TARGET: &str = "x86_64-unknown-linux-musl";
/// The cargo profile of what ships (workspace Cargo.toml): release without debug info, stripped.
const PROFILE: &str = "dist";
/// The size the binary must stay under (printed with the figure).
const SIZE_GOAL: u64 = 10 << 20;
const VERSION: &str = env!("CARGO_PKG_VERSION");
const MAINTAINER: &str = "twtrace developers <twtrace@users.noreply.github.com>";
const HOMEPAGE: &str = "https://github.com/twtrace/twtrace";
/// The unit as committed starts the binary where `install` puts it by hand; the package puts
/// it in /usr/sbin.
const UNIT_EXEC: &str = "ExecStart=/usr/local/bin/twtrace ";
const DEB_EXEC: &str = "ExecStart=/usr/sbin/twtrace ";
/// Where the image holds the binary: where the Debian-based image (deploy/docker) and the
/// DaemonSet's `command:` have it, so either image runs under the same manifests.
const IMAGE_BINARY: &str = "/usr/local/bin/twtrace";

/// What `dist` produced, for the callers that use it (`xtask test`, the kernel-matrix guests).
pub struct Artifacts {
    /// target/packages, which also holds SHA256SUMS of the three archives.
    pub dir: PathBuf,
    pub binary: PathBuf,
    pub tarball: PathBuf,
    pub deb: PathBuf,
    pub image: PathBuf,
}

/// What the archives are made from: the binary, the generated docs, a staging folder, the
/// output folder and the time their files carry.
#[derive(Clone, Copy)]
struct Built<'a> {
    binary: &'a Path,
    docs: &'a Path,
    stage: &'a Path,
    out: &'a Path,
    epoch: u64,
}

/// Not target/dist: cargo keeps the `dist` profile's host build scripts there.
pub fn dist_dir() -> PathBuf {
    root().join("target/packages")
}

pub fn run(args: &[String]) -> Result<(), String> {
    if let Some(a) = args.first() {
        return Err(format!("dist: unknown argument '{a}' (usage: dist)"));
    }
    setup::ensure(setup::Need::Dist)?;
    build().map(|_| ())
}

/// What ships, current for this tree: target/packages as an earlier `dist` left it when its
/// tarball holds the very binary this tree builds now (the static build is brought up to date
/// first, which does nothing when nothing changed), else everything built anew. For the
/// kernel-matrix guests: in CI `xtask test` has just run `dist`, and nothing is built twice.
pub fn current_or_build() -> Result<Artifacts, String> {
    let built = static_build()?;
    match existing(&built) {
        Ok(made) => {
            println!(
                "dist: {} holds this tree's static binary: taken as it is",
                made.tarball.display()
            );
            Ok(made)
        }
        Err(why) => {
            println!("dist: {why}: building what ships");
            setup::ensure(setup::Need::Dist)?;
            build()
        }
    }
}

/// target/packages, if its sums hold and its tarball's binary is `built`.
fn existing(built: &Path) -> Result<Artifacts, String> {
    let dir = dist_dir();
    let sums = read(&dir.join("SHA256SUMS"))?;
    let check = Command::new("sha256sum")
        .args(["--check", "--strict", "--quiet", "SHA256SUMS"])
        .current_dir(&dir)
        .output()
        .map_err(|e| format!("cannot run sha256sum: {e}"))?;
    if !check.status.success() {
        return Err(format!("{} does not match its SHA256SUMS", dir.display()));
    }
    let named = |suffix: &str| {
        sums.lines()
            .filter_map(|l| l.split_once("  ").map(|(_, name)| name))
            .find(|name| name.ends_with(suffix))
            .map(|name| dir.join(name))
            .ok_or_else(|| format!("{}/SHA256SUMS lists no *{suffix}", dir.display()))
    };
    let made = Artifacts {
        binary: dir.join("twtrace"),
        tarball: named(".tar.gz")?,
        deb: named(".deb")?,
        image: named("-oci.tar")?,
        dir: dir.clone(),
    };
    let now = fs::read(built).map_err(|e| format!("{}: {e}", built.display()))?;
    if tarball_binary(&made.tarball)? != now {
        return Err(format!(
            "{} holds another build than this tree's",
            made.tarball.display()
        ));
    }
    Ok(made)
}

/// The binary inside the tarball, as it would be installed from it.
pub fn tarball_binary(tarball: &Path) -> Result<Vec<u8>, String> {
    let member = format!("twtrace-{VERSION}-x86_64-linux/twtrace");
    let out = Command::new("tar")
        .arg("-xzOf")
        .arg(tarball)
        .arg(&member)
        .output()
        .map_err(|e| format!("cannot run tar: {e}"))?;
    if !out.status.success() || out.stdout.is_empty() {
        return Err(format!(
            "{} has no {member}: {}",
            tarball.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(out.stdout)
}

/// Builds everything into target/packages (replacing what an earlier run left there).
pub fn build() -> Result<Artifacts, String> {
    let out = dist_dir();
    let stage = root().join("target/packages-stage");
    for dir in [&out, &stage] {
        if dir.exists() {
            fs::remove_dir_all(dir).map_err(|e| format!("cannot clear {}: {e}", dir.display()))?;
        }
        mkdir(dir)?;
    }
    let epoch = source_date_epoch();

    let binary = out.join("twtrace");
    static_binary(&binary)?;
    let docs = stage.join("docs");
    generate_docs(&docs, false)?;

    let built = Built {
        binary: &binary,
        docs: &docs,
        stage: &stage,
        out: &out,
        epoch,
    };
    let tarball = tarball(&built)?;
    let deb = deb(&built)?;
    let image = image(&binary, &out, epoch)?;
    let made = Artifacts {
        dir: out,
        binary,
        tarball,
        deb,
        image,
    };
    sha256sums(&made.dir, &[&made.tarball, &made.deb, &made.image])?;
    for p in [&made.binary, &made.tarball, &made.deb, &made.image] {
        println!("dist: {} ({})", p.display(), human(size(p)?));
    }
    Ok(made)
}

/// Man pages and completions from the CLI (`twt-docs`, tests crate) under `dir`; `verbose`
/// lists the files written.
pub fn generate_docs(dir: &Path, verbose: bool) -> Result<(), String> {
    let mut cmd = cargo(&[
        "run",
        "--quiet",
        "--package",
        "twtrace-tests",
        "--bin",
        "twt-docs",
        "--",
    ]);
    cmd.arg(dir);
    if !verbose {
        cmd.stdout(Stdio::null());
    }
    status(&mut cmd)
}

/// `cargo build --profile dist --target TARGET`: where cargo put the binary.
fn static_build() -> Result<PathBuf, String> {
    status(&mut cargo(&[
        "build",
        "--locked",
        "--package",
        "twtrace",
        "--profile",
        PROFILE,
        "--target",
        TARGET,
    ]))?;
    Ok(crate::target_dir()
        .join(TARGET)
        .join(PROFILE)
        .join("twtrace"))
}

/// The static build, copied to `dest`; prints its size.
fn static_binary(dest: &Path) -> Result<(), String> {
    copy(&static_build()?, dest, 0o755)?;
    // What `file` would say, without needing it: a static binary has no program interpreter.
    let bytes = fs::read(dest).map_err(|e| format!("{}: {e}", dest.display()))?;
    if bytes.windows(b"ld-linux".len()).any(|w| w == b"ld-linux") {
        return Err(format!(
            "{} names a dynamic loader: it is not static",
            dest.display()
        ));
    }
    let n = bytes.len() as u64;
    println!(
        "dist: the static binary is {} stripped (goal: under {}: {})",
        human(n),
        human(SIZE_GOAL),
        if n < SIZE_GOAL { "met" } else { "MISSED" }
    );
    Ok(())
}

/// The tarball: one directory, `twtrace-VERSION-x86_64-linux/`.
fn tarball(built: &Built) -> Result<PathBuf, String> {
    let name = format!("twtrace-{VERSION}-x86_64-linux");
    let top = built.stage.join(&name);
    copy(built.binary, &top.join("twtrace"), 0o755)?;
    copy_tree(&built.docs.join("man"), &top.join("man"))?;
    copy_tree(&built.docs.join("completions"), &top.join("completions"))?;
    copy(
        &root().join("deploy/systemd/twtrace.service"),
        &top.join("systemd/twtrace.service"),
        0o644,
    )?;
    for licence in ["LICENSE-MIT", "LICENSE-APACHE"] {
        copy(&root().join(licence), &top.join(licence), 0o644)?;
    }
    let files: Vec<PathBuf> = relative_files(&top)?;
    sha256sums(
        &top,
        &files.iter().map(PathBuf::as_path).collect::<Vec<_>>(),
    )?;
    let tar = built.out.join(format!("{name}.tar"));
    status(
        Command::new("tar")
            .args(REPRODUCIBLE_TAR)
            .arg(format!("--mtime=@{}", built.epoch))
            .arg("-cf")
            .arg(&tar)
            .arg("-C")
            .arg(built.stage)
            .arg(&name),
    )?;
    gzip(&tar)
}

/// GNU tar options for an archive that depends on the files' contents and modes only.
const REPRODUCIBLE_TAR: [&str; 4] = ["--sort=name", "--owner=0", "--group=0", "--numeric-owner"];

/// `gzip -9n` (no name or time in the header); returns the .gz path.
fn gzip(path: &Path) -> Result<PathBuf, String> {
    status(Command::new("gzip").args(["-9nf"]).arg(path))?;
    let mut gz = path.as_os_str().to_owned();
    gz.push(".gz");
    Ok(PathBuf::from(gz))
}

/// The .deb: built with dpkg-deb from a tree laid out as Debian does.
fn deb(built: &Built) -> Result<PathBuf, String> {
    let tree = built.stage.join("deb");
    copy(built.binary, &tree.join("usr/sbin/twtrace"), 0o755)?;
    for page in relative_files(&built.docs.join("man"))? {
        let dest = tree.join("usr/share/man/man8").join(&page);
        copy(&built.docs.join("man").join(&page), &dest, 0o644)?;
        gzip(&dest)?;
    }
    let completions = [
        (
            "twtrace.bash",
            "usr/share/bash-completion/completions/twtrace",
        ),
        ("_twtrace", "usr/share/zsh/vendor-completions/_twtrace"),
        (
            "twtrace.fish",
            "usr/share/fish/vendor_completions.d/twtrace.fish",
        ),
    ];
    for (file, dest) in completions {
        copy(
            &built.docs.join("completions").join(file),
            &tree.join(dest),
            0o644,
        )?;
    }
    let unit = read(&root().join("deploy/systemd/twtrace.service"))?;
    if unit.matches(UNIT_EXEC).count() != 1 {
        return Err(format!(
            "deploy/systemd/twtrace.service: expected one `{UNIT_EXEC}...` line"
        ));
    }
    write(
        &tree.join("usr/lib/systemd/system/twtrace.service"),
        &unit.replace(UNIT_EXEC, DEB_EXEC),
        0o644,
    )?;
    let doc = tree.join("usr/share/doc/twtrace");
    write(&doc.join("copyright"), &deb_copyright()?, 0o644)?;
    // A native package (the project packages itself, no Debian revision): changelog.gz.
    write(&doc.join("changelog"), &deb_changelog(built.epoch)?, 0o644)?;
    gzip(&doc.join("changelog"))?;
    write(
        &tree.join("usr/share/lintian/overrides/twtrace"),
        "# One static build ships everywhere (this package, the tarball, the image): it needs no\n\
         # library at run time, and what was tested is what is installed. It is a static PIE\n\
         # (ELF type DYN, for address space randomisation) with no DT_NEEDED, which lintian takes\n\
         # for a shared library that forgot to link libc.\n\
         twtrace: shared-library-lacks-prerequisites [usr/sbin/twtrace]\n",
        0o644,
    )?;

    let files = relative_files(&tree)?;
    let installed_kib: u64 = files
        .iter()
        .map(|f| size(&tree.join(f)).map(|n| n.div_ceil(1024)))
        .sum::<Result<u64, String>>()?;
    let control = tree.join("DEBIAN");
    let paths: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
    checksums("md5sum", &tree, &paths, &control.join("md5sums"))?;
    write(&control.join("control"), &deb_control(installed_kib), 0o644)?;
    // Every directory 0755 whatever the umask was (the tree is packed as it is).
    set_dir_modes(&tree)?;
    let deb = built.out.join(format!("twtrace_{VERSION}_amd64.deb"));
    status(
        Command::new("dpkg-deb")
            .args(["--root-owner-group", "-Zxz", "--build"])
            .arg(&tree)
            .arg(&deb)
            .env("SOURCE_DATE_EPOCH", built.epoch.to_string())
            .stdout(Stdio::null()),
    )?;
    Ok(deb)
}

fn deb_control(installed_kib: u64) -> String {
    format!(
        "Package: twtrace\n\
         Version: {VERSION}\n\
         Architecture: amd64\n\
         Maintainer: {MAINTAINER}\n\
         Installed-Size: {installed_kib}\n\
         Section: admin\n\
         Priority: optional\n\
         Homepage: {HOMEPAGE}\n\
         Description: where a Linux host's TCP TIME_WAIT sockets come from\n \
         twtrace watches the kernel with eBPF (tracepoints only) and says which\n \
         process closed each connection that left a socket in TIME_WAIT, to which\n \
         peer and port, how fast they come, how long they live and why they end.\n \
         .\n \
         Commands: watch (live events), report, top, doctor (findings with\n \
         remedies), exec (a TIME_WAIT budget for a command) and serve, a\n \
         Prometheus exporter. The systemd unit for serve is installed, not enabled.\n \
         .\n \
         Needs Linux 5.8 or newer with BTF. The binary is static.\n"
    )
}

/// DEP-5 copyright: the MIT text from LICENSE-MIT, Apache-2.0 from common-licenses.
fn deb_copyright() -> Result<String, String> {
    let mit = read(&root().join("LICENSE-MIT"))?;
    let holder = mit
        .lines()
        .find_map(|l| l.strip_prefix("Copyright (c) "))
        .ok_or("LICENSE-MIT has no `Copyright (c) ...` line")?;
    // The licence text from its permission paragraph on, as a DEP-5 body.
    let body: Vec<String> = mit
        .lines()
        .skip_while(|l| !l.starts_with("Permission"))
        .map(|l| {
            if l.is_empty() {
                " .".into()
            } else {
                format!(" {l}")
            }
        })
        .collect();
    Ok(format!(
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\
         Upstream-Name: twtrace\n\
         Source: {HOMEPAGE}\n\
         \n\
         Files: *\n\
         Copyright: {holder}\n\
         License: MIT or Apache-2.0\n\
         \n\
         License: MIT\n\
         {}\n\
         \n\
         License: Apache-2.0\n \
         On Debian systems, the full text of the Apache License, Version 2.0, is in\n \
         /usr/share/common-licenses/Apache-2.0.\n",
        body.join("\n")
    ))
}

fn deb_changelog(epoch: u64) -> Result<String, String> {
    let date = setup::output(
        Command::new("date")
            .args(["-u", "-R", "-d"])
            .arg(format!("@{epoch}")),
    )
    .ok_or("date -R failed")?;
    Ok(format!(
        "twtrace ({VERSION}) unstable; urgency=medium\n\n  \
         * Built by `cargo xtask dist` from commit {}.\n\n \
         -- {MAINTAINER}  {}\n",
        commit(),
        date.trim()
    ))
}

/// The OCI image: buildah from scratch, the binary alone, written as an oci-archive.
fn image(binary: &Path, out: &Path, epoch: u64) -> Result<PathBuf, String> {
    let archive = out.join(format!("twtrace-{VERSION}-oci.tar"));
    let container = format!("twtrace-dist-{}", std::process::id());
    status(
        Command::new("buildah")
            .args(["from", "--quiet", "--name", &container, "scratch"])
            .stdout(Stdio::null()),
    )?;
    let result = (|| {
        status(
            Command::new("buildah")
                .args(["copy", "--quiet", "--chmod", "0755", &container])
                .arg(binary)
                .arg(IMAGE_BINARY)
                .stdout(Stdio::null()),
        )?;
        status(Command::new("buildah").args([
            "config",
            "--entrypoint",
            &format!("[\"{IMAGE_BINARY}\"]"),
            // No /etc/passwd in the image: `nobody` by its number.
            "--cmd",
            "[\"serve\", \"--listen\", \"0.0.0.0:9979\", \"--user\", \"65534\"]",
            "--port",
            "9979/tcp",
            "--stop-signal",
            "SIGTERM",
            "--label",
            "org.opencontainers.image.title=twtrace",
            "--label",
            &format!("org.opencontainers.image.version={VERSION}"),
            "--label",
            &format!("org.opencontainers.image.revision={}", commit()),
            "--label",
            &format!("org.opencontainers.image.source={HOMEPAGE}"),
            "--label",
            "org.opencontainers.image.licenses=MIT OR Apache-2.0",
            &container,
        ]))?;
        status(
            Command::new("buildah")
                .args([
                    "commit",
                    "--quiet",
                    "--rm",
                    "--identity-label=false",
                    "--disable-compression=false",
                ])
                .arg(format!("--timestamp={epoch}"))
                .arg(&container)
                .arg(format!(
                    "oci-archive:{}:twtrace:{VERSION}",
                    archive.display()
                ))
                .stdout(Stdio::null()),
        )
    })();
    if result.is_err() {
        let _ = Command::new("buildah").args(["rm", &container]).output();
    }
    result.map(|()| archive)
}

/// `sha256sum` of `files`, by their paths relative to `dir`, into `dir/SHA256SUMS`.
fn sha256sums(dir: &Path, files: &[&Path]) -> Result<(), String> {
    checksums("sha256sum", dir, files, &dir.join("SHA256SUMS"))
}

/// `tool` (sha256sum, md5sum) of `files`, by their paths relative to `dir`, into `into`.
fn checksums(tool: &str, dir: &Path, files: &[&Path], into: &Path) -> Result<(), String> {
    let names: Vec<&Path> = files
        .iter()
        .map(|f| f.strip_prefix(dir).unwrap_or(f))
        .collect();
    let out = Command::new(tool)
        .args(&names)
        .current_dir(dir)
        .output()
        .map_err(|e| format!("cannot run {tool}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{tool} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    write(into, &String::from_utf8_lossy(&out.stdout), 0o644)
}

/// The commit's time, for file times in the archives (`SOURCE_DATE_EPOCH` when set).
fn source_date_epoch() -> u64 {
    std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .or_else(|| git(&["log", "-1", "--format=%ct"]))
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

fn commit() -> String {
    git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into())
}

fn git(args: &[&str]) -> Option<String> {
    setup::output(Command::new("git").args(args).current_dir(root())).map(|s| s.trim().to_owned())
}

// ---------------------------------------------------------------------------------------------
// Files

fn mkdir(dir: &Path) -> Result<(), String> {
    fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))
}

fn read(path: &Path) -> Result<String, String> {
    fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

fn size(path: &Path) -> Result<u64, String> {
    fs::metadata(path)
        .map(|m| m.len())
        .map_err(|e| format!("{}: {e}", path.display()))
}

fn set_mode(path: &Path, mode: u32) -> Result<(), String> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(|e| format!("chmod {}: {e}", path.display()))
}

fn write(path: &Path, text: &str, mode: u32) -> Result<(), String> {
    mkdir(path.parent().expect("a file in a directory"))?;
    fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    set_mode(path, mode)
}

fn copy(from: &Path, to: &Path, mode: u32) -> Result<(), String> {
    mkdir(to.parent().expect("a file in a directory"))?;
    fs::copy(from, to)
        .map_err(|e| format!("cannot copy {} to {}: {e}", from.display(), to.display()))?;
    set_mode(to, mode)
}

fn copy_tree(from: &Path, to: &Path) -> Result<(), String> {
    for f in relative_files(from)? {
        copy(&from.join(&f), &to.join(&f), 0o644)?;
    }
    Ok(())
}

/// Every file under `dir`, as paths relative to it, sorted.
fn relative_files(dir: &Path) -> Result<Vec<PathBuf>, String> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), String> {
        let entries = fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        for entry in entries {
            let path = entry.map_err(|e| e.to_string())?.path();
            if path.is_dir() {
                walk(base, &path, out)?;
            } else {
                out.push(path.strip_prefix(base).expect("under base").to_path_buf());
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out)?;
    out.sort();
    Ok(out)
}

fn set_dir_modes(dir: &Path) -> Result<(), String> {
    set_mode(dir, 0o755)?;
    for entry in fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))? {
        let path = entry.map_err(|e| e.to_string())?.path();
        if path.is_dir() {
            set_dir_modes(&path)?;
        }
    }
    Ok(())
}

fn human(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}
