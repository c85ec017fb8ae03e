//! Debian's kernels: fetched through apt with a configuration of our own (the machine's apt is
//! neither read nor changed), cached under target/vm-test/, unpacked with dpkg-deb, and the
//! modules the guest needs decompressed.
//!
//! Layout under target/vm-test/:
//! * `apt/<suite>/`: apt.conf, sources.list, lists and cache of one suite (and its security
//!   suite), refreshed when older than `LISTS_MAX_AGE`;
//! * `debs/`: the downloaded `.deb`s, kept (a cached one is never downloaded again);
//! * `kernels/<package>_<version>/`: the unpacked package, and `vmtest-modules/` with the
//!   decompressed modules the guest loads.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, SystemTime},
};

use super::lanes::{Series, IMAGE_PREFIX, META_PACKAGE};
use crate::procs::{output_for, run_for};

/// Older lists are refreshed: a stable suite's kernel changes with each point or security
/// release, a few times a month.
const LISTS_MAX_AGE: Duration = Duration::from_secs(12 * 3600);
/// Every apt and dpkg-deb call is bounded (the indexes of a suite are 10-30 MB).
const APT_LIMIT: Duration = Duration::from_secs(600);
const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";
const MIRROR: &str = "http://deb.debian.org";

/// Modules the guest loads, with those they depend on. In Debian's cloud kernels these are
/// modules, not built in: sock_diag for TCP (`ss`, the report's seeding of existing
/// TIME_WAIT, the sockdiag tests) and veth (the tests join network namespaces with veth pairs).
pub const GUEST_MODULES: [&str; 3] = ["inet_diag", "tcp_diag", "veth"];

/// One kernel, ready to boot.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// The image package and its version, e.g. linux-image-6.1.0-57-cloud-amd64 6.1.192-3.
    pub package: String,
    pub version: String,
    /// What `uname -r` says in the guest (the package name without its prefix).
    pub release: String,
    pub vmlinuz: PathBuf,
    /// Its build configuration, as the package installs it in /boot: twtrace reads CONFIG_HZ
    /// from /boot/config-$(uname -r) (Debian's kernels have no /proc/config.gz) to turn a
    /// timer's jiffies into a timeout.
    pub config: PathBuf,
    /// Decompressed modules, each after those it depends on, with the name `insmod` loads.
    pub modules: Vec<(String, PathBuf)>,
}

/// The newest signed cloud kernel of `series`, fetched (or taken from the cache) and unpacked.
pub fn fetch(series: &Series, dir: &Path) -> Result<Kernel, String> {
    let apt = Apt::new(series, &dir.join("apt").join(series.suite))?;
    apt.update()?;
    let meta =
        apt.run(Command::new("apt-cache").args(["show", "--no-all-versions", META_PACKAGE]))?;
    let (package, version) = image_dependency(&meta).ok_or_else(|| {
        format!(
            "{META_PACKAGE} of {} depends on no {IMAGE_PREFIX}* package",
            series.suite
        )
    })?;
    let release = package
        .strip_prefix(IMAGE_PREFIX)
        .unwrap_or(&package)
        .to_owned();
    let debs = dir.join("debs");
    let deb = debs.join(deb_file_name(&package, &version));
    if !deb.exists() {
        println!(
            "vm-test: downloading {package} {version} ({})",
            series.suite
        );
        create_dir(&debs)?;
        apt.run(
            Command::new("apt-get")
                .args(["download", "-q", &format!("{package}={version}")])
                .current_dir(&debs),
        )?;
        if !deb.exists() {
            return Err(format!(
                "apt-get download {package}={version} left no {}",
                deb.display()
            ));
        }
    }
    let tree = dir.join("kernels").join(format!("{package}_{version}"));
    unpack(&deb, &tree)?;
    let vmlinuz = tree.join("boot").join(format!("vmlinuz-{release}"));
    if !vmlinuz.is_file() {
        return Err(format!("{} holds no boot/vmlinuz-{release}", deb.display()));
    }
    let modules = guest_modules(&tree, &release)?;
    Ok(Kernel {
        package,
        version,
        config: tree.join("boot").join(format!("config-{release}")),
        release,
        vmlinuz,
        modules,
    })
}

/// apt with everything under `dir`: sources, lists, cache, an empty dpkg status, no host
/// configuration parts, preferences or pinning that could pick another candidate.
struct Apt {
    dir: PathBuf,
}

impl Apt {
    fn new(series: &Series, dir: &Path) -> Result<Self, String> {
        if !Path::new(KEYRING).is_file() {
            return Err(format!(
                "{KEYRING} is missing: install debian-archive-keyring (cargo +stable xtask setup does)"
            ));
        }
        let empty = dir.join("empty.d");
        for d in [
            empty.clone(),
            dir.join("lists/partial"),
            dir.join("cache/archives/partial"),
        ] {
            create_dir(&d)?;
        }
        write(&dir.join("status"), "")?;
        write(&dir.join("sources.list"), &sources_list(series))?;
        let d = dir.display();
        let e = empty.display();
        // APT_CONFIG is read before anything else; pointing Main and Parts elsewhere keeps the
        // machine's /etc/apt out (its proxy settings too: apt still honours http_proxy).
        let mut conf = format!(
            "Dir::Etc::Main \"/dev/null\";\n\
             Dir::Etc::Parts \"{e}\";\n\
             Dir::Etc::SourceList \"{d}/sources.list\";\n\
             Dir::Etc::SourceParts \"{e}\";\n\
             Dir::Etc::Preferences \"/dev/null\";\n\
             Dir::Etc::PreferencesParts \"{e}\";\n\
             Dir::State \"{d}\";\n\
             Dir::State::Lists \"{d}/lists\";\n\
             Dir::State::status \"{d}/status\";\n\
             Dir::Cache \"{d}/cache\";\n\
             Dir::Cache::pkgcache \"\";\n\
             Dir::Cache::srcpkgcache \"\";\n\
             APT::Architecture \"amd64\";\n\
             APT::Architectures {{ \"amd64\"; }};\n\
             Acquire::Languages \"none\";\n\
             Acquire::GzipIndexes \"true\";\n"
        );
        if crate::is_root() {
            // As root apt downloads as _apt, which may not reach a checkout under /root.
            conf += "APT::Sandbox::User \"root\";\n";
        }
        write(&dir.join("apt.conf"), &conf)?;
        Ok(Apt {
            dir: dir.to_path_buf(),
        })
    }

    /// An apt command with this configuration; its error is apt's own `E:` line(s).
    fn run(&self, cmd: &mut Command) -> Result<String, String> {
        cmd.env("APT_CONFIG", self.dir.join("apt.conf"))
            .env("DEBIAN_FRONTEND", "noninteractive");
        let what: Vec<String> = std::iter::once(cmd.get_program())
            .chain(cmd.get_args())
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        run_for(cmd, APT_LIMIT).map_err(|e| format!("{}: {}", what.join(" "), apt_error(&e)))
    }

    /// `apt-get update` unless the lists are fresh. When it fails and older lists exist, they
    /// are used (with a line saying so): the debs they name are likely cached already.
    fn update(&self) -> Result<(), String> {
        let age = newest_mtime(&self.dir.join("lists")).and_then(|t| t.elapsed().ok());
        if age.is_some_and(|a| a < LISTS_MAX_AGE) {
            return Ok(());
        }
        match self.run(Command::new("apt-get").args(["update", "-qq"])) {
            Ok(_) => Ok(()),
            Err(e) if age.is_some() => {
                println!("vm-test: apt-get update failed, using the lists from before: {e}");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

/// apt's `E:` messages, which say what went wrong (`E: Release file for ... is expired`); the
/// last line when there are none.
fn apt_error(output: &str) -> String {
    let errors: Vec<&str> = output
        .lines()
        .filter_map(|l| l.split_once("E: ").map(|(_, e)| e.trim()))
        .collect();
    if errors.is_empty() {
        output.lines().last().unwrap_or("failed").trim().to_owned()
    } else {
        errors.join("; ")
    }
}

fn sources_list(series: &Series) -> String {
    let mut s = format!(
        "deb [signed-by={KEYRING}] {MIRROR}/debian {} main\n",
        series.suite
    );
    if let Some(sec) = series.security {
        s += &format!("deb [signed-by={KEYRING}] {MIRROR}/debian-security {sec} main\n");
    }
    s
}

/// The image package and exact version a metapackage's stanza depends on
/// (`Depends: linux-image-6.1.0-57-cloud-amd64 (= 6.1.192-3)`).
fn image_dependency(stanza: &str) -> Option<(String, String)> {
    let depends = stanza.lines().find_map(|l| l.strip_prefix("Depends:"))?;
    depends.split(',').find_map(|dep| {
        // An alternative ("a | b") takes its first choice.
        let dep = dep.split('|').next()?.trim();
        let (name, rest) = dep.split_once(' ').unwrap_or((dep, ""));
        let version = rest.trim().strip_prefix("(=")?.strip_suffix(')')?.trim();
        (name.starts_with(IMAGE_PREFIX) && name != META_PACKAGE)
            .then(|| (name.to_owned(), version.to_owned()))
    })
}

/// The file name `apt-get download` gives a package (an epoch's colon is escaped).
fn deb_file_name(package: &str, version: &str) -> String {
    format!("{package}_{}_amd64.deb", version.replace(':', "%3a"))
}

/// `dpkg-deb -x` into a temporary directory renamed into place once complete, so that an
/// interrupted run never leaves a half-unpacked kernel that looks whole.
fn unpack(deb: &Path, tree: &Path) -> Result<(), String> {
    if tree.is_dir() {
        return Ok(());
    }
    let tmp = tree.with_extension("partial");
    let _ = fs::remove_dir_all(&tmp);
    create_dir(&tmp)?;
    run_for(
        Command::new("dpkg-deb").arg("-x").arg(deb).arg(&tmp),
        APT_LIMIT,
    )?;
    fs::rename(&tmp, tree).map_err(|e| format!("cannot rename {}: {e}", tmp.display()))
}

/// The kernel's module directory: /lib/modules up to bookworm, /usr/lib/modules from trixie.
fn module_dir(tree: &Path, release: &str) -> Result<PathBuf, String> {
    ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|d| tree.join(d).join(release))
        .find(|p| p.is_dir())
        .ok_or_else(|| format!("{} has no lib/modules/{release}", tree.display()))
}

/// `GUEST_MODULES` that are not built in, with their dependencies first, decompressed: busybox's
/// `insmod` reads neither .ko.xz nor .ko.zst. Debian signs a module before compressing it, so
/// the decompressed file keeps its signature and loads under lockdown.
fn guest_modules(tree: &Path, release: &str) -> Result<Vec<(String, PathBuf)>, String> {
    let mdir = module_dir(tree, release)?;
    let builtin = fs::read_to_string(mdir.join("modules.builtin")).unwrap_or_default();
    let out_dir = tree.join("vmtest-modules");
    create_dir(&out_dir)?;
    let mut files = Vec::new();
    find_files(&mdir.join("kernel"), &mut files);
    let path = |name: &str| out_dir.join(format!("{name}.ko"));
    let depends = |name: &str| -> Result<Vec<String>, String> {
        let out = path(name);
        if !out.is_file() {
            let src = files
                .iter()
                .find(|f| module_name(f).as_deref() == Some(name))
                .ok_or_else(|| {
                    format!("{release} has module {name} neither built in nor in its package")
                })?;
            decompress(src, &out)?;
        }
        let elf = fs::read(&out).map_err(|e| format!("cannot read {}: {e}", out.display()))?;
        let deps = modinfo(&elf, "depends").map_err(|e| format!("{}: {e}", out.display()))?;
        Ok(deps
            .unwrap_or_default()
            .split(',')
            .filter(|d| !d.is_empty())
            .map(|d| d.replace('-', "_"))
            .collect())
    };
    let order = load_order(&GUEST_MODULES, depends, |m| is_builtin(&builtin, m))?;
    Ok(order
        .into_iter()
        .map(|m| {
            let p = path(&m);
            (m, p)
        })
        .collect())
}

/// `wanted` and the modules they depend on, each after its dependencies, the built-in ones left
/// out.
fn load_order(
    wanted: &[&str],
    mut depends: impl FnMut(&str) -> Result<Vec<String>, String>,
    builtin: impl Fn(&str) -> bool,
) -> Result<Vec<String>, String> {
    let mut order: Vec<String> = Vec::new();
    // Depth first, (name, its dependencies are in `order` already).
    let mut todo: Vec<(String, bool)> = wanted
        .iter()
        .rev()
        .map(|m| (m.to_string(), false))
        .collect();
    while let Some((name, deps_done)) = todo.pop() {
        if order.contains(&name) || builtin(&name) {
            continue;
        }
        if deps_done {
            order.push(name);
            continue;
        }
        if todo.len() > 1000 {
            return Err(format!("the modules {name} depends on form a cycle"));
        }
        let deps = depends(&name)?;
        todo.push((name, true));
        todo.extend(deps.into_iter().map(|d| (d, false)));
    }
    Ok(order)
}

fn find_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            find_files(&p, out);
        } else {
            out.push(p);
        }
    }
}

/// `veth` for `.../veth.ko`, `.ko.xz` or `.ko.zst` (the kernel treats - and _ alike).
fn module_name(path: &Path) -> Option<String> {
    let file = path.file_name()?.to_str()?;
    let stem = [".ko", ".ko.xz", ".ko.zst"]
        .iter()
        .find_map(|ext| file.strip_suffix(ext))?;
    Some(stem.replace('-', "_"))
}

fn is_builtin(modules_builtin: &str, name: &str) -> bool {
    modules_builtin
        .lines()
        .any(|l| module_name(Path::new(l)).as_deref() == Some(name))
}

/// Written under another name first: an interrupted run leaves no truncated module behind.
fn decompress(src: &Path, out: &Path) -> Result<(), String> {
    let name = src.to_string_lossy();
    let bytes = if name.ends_with(".xz") {
        output_for(Command::new("xz").arg("-dc").arg(src), APT_LIMIT)?
    } else if name.ends_with(".zst") {
        output_for(Command::new("zstd").arg("-qdc").arg(src), APT_LIMIT)?
    } else {
        fs::read(src).map_err(|e| format!("cannot read {name}: {e}"))?
    };
    let tmp = out.with_extension("partial");
    fs::write(&tmp, bytes).map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    fs::rename(&tmp, out).map_err(|e| format!("cannot rename {}: {e}", tmp.display()))
}

/// A field of a module's `.modinfo` section (NUL-separated `key=value` strings), found through
/// the ELF64 section headers. Ok(None) when the module has no such field.
fn modinfo(elf: &[u8], key: &str) -> Result<Option<String>, String> {
    let section = elf_section(elf, ".modinfo")?.ok_or("no .modinfo section")?;
    let prefix = format!("{key}=");
    Ok(section
        .split(|b| *b == 0)
        .filter_map(|s| std::str::from_utf8(s).ok())
        .find_map(|s| s.strip_prefix(prefix.as_str()).map(str::to_owned)))
}

/// The bytes of a named section of a little-endian ELF64 file.
fn elf_section<'a>(elf: &'a [u8], wanted: &str) -> Result<Option<&'a [u8]>, String> {
    let bad = || "not a little-endian ELF64 file".to_owned();
    if elf.get(..6) != Some(b"\x7fELF\x02\x01") {
        return Err(bad());
    }
    let u16_at = |o: usize| -> Result<usize, String> {
        Ok(u16::from_le_bytes(elf.get(o..o + 2).ok_or_else(bad)?.try_into().unwrap()) as usize)
    };
    let u32_at = |o: usize| -> Result<usize, String> {
        Ok(u32::from_le_bytes(elf.get(o..o + 4).ok_or_else(bad)?.try_into().unwrap()) as usize)
    };
    let u64_at = |o: usize| -> Result<usize, String> {
        Ok(u64::from_le_bytes(elf.get(o..o + 8).ok_or_else(bad)?.try_into().unwrap()) as usize)
    };
    let (shoff, shentsize, shnum, shstrndx) =
        (u64_at(0x28)?, u16_at(0x3a)?, u16_at(0x3c)?, u16_at(0x3e)?);
    let section = |i: usize| -> Result<(usize, &'a [u8]), String> {
        let h = shoff + i * shentsize;
        let (name, off, size) = (u32_at(h)?, u64_at(h + 24)?, u64_at(h + 32)?);
        Ok((name, elf.get(off..off + size).ok_or_else(bad)?))
    };
    let (_, names) = section(shstrndx)?;
    for i in 0..shnum {
        let (name, bytes) = section(i)?;
        let n = names.get(name..).ok_or_else(bad)?;
        let n = &n[..n.iter().position(|b| *b == 0).unwrap_or(n.len())];
        if n == wanted.as_bytes() {
            return Ok(Some(bytes));
        }
    }
    Ok(None)
}

fn newest_mtime(dir: &Path) -> Option<SystemTime> {
    fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with("InRelease"))
        .filter_map(|e| e.metadata().ok()?.modified().ok())
        .max()
}

pub fn create_dir(d: &Path) -> Result<(), String> {
    fs::create_dir_all(d).map_err(|e| format!("cannot create {}: {e}", d.display()))
}

pub fn write(path: &Path, text: &str) -> Result<(), String> {
    fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_metapackage_names_the_signed_image_and_its_version() {
        let stanza = "Package: linux-image-cloud-amd64\n\
            Source: linux-signed-amd64 (6.1.192+3)\n\
            Version: 6.1.192-3\n\
            Provides: linux-latest-modules-6.1.0-57-cloud-amd64, wireguard-modules (= 1.0.0)\n\
            Depends: linux-image-6.1.0-57-cloud-amd64 (= 6.1.192-3)\n\
            Description: Linux for x86-64 cloud (meta-package)\n";
        assert_eq!(
            image_dependency(stanza),
            Some((
                "linux-image-6.1.0-57-cloud-amd64".into(),
                "6.1.192-3".into()
            ))
        );
        let epoch =
            "Depends: firmware-x | linux-image-6.19.2+unreleased-cloud-amd64 (= 1:6.19.2-1), \
                     linux-image-6.19.2+unreleased-cloud-amd64 (= 1:6.19.2-1)\n";
        assert_eq!(
            image_dependency(epoch),
            Some((
                "linux-image-6.19.2+unreleased-cloud-amd64".into(),
                "1:6.19.2-1".into()
            ))
        );
        assert_eq!(
            deb_file_name("linux-image-x", "1:6.19-1"),
            "linux-image-x_1%3a6.19-1_amd64.deb"
        );
        assert_eq!(image_dependency("Package: x\nDepends: libc6\n"), None);
    }

    #[test]
    fn apt_errors_in_one_line() {
        let out = "\"apt-get\" \"update\" failed (exit status: 100): E: Release file for http://deb.debian.org/debian/dists/sid/InRelease is expired (invalid since 23d 21h 22min 1s). Updates for this repository will not be applied.\n";
        assert_eq!(
            apt_error(out),
            "Release file for http://deb.debian.org/debian/dists/sid/InRelease is expired (invalid since 23d 21h 22min 1s). Updates for this repository will not be applied."
        );
        assert_eq!(
            apt_error("x\ndid not finish within 600s: killed\n"),
            "did not finish within 600s: killed"
        );
    }

    #[test]
    fn sources_name_the_suite_and_its_security_suite() {
        let s = sources_list(super::super::lanes::series("6.12").unwrap());
        assert_eq!(
            s,
            format!(
                "deb [signed-by={KEYRING}] http://deb.debian.org/debian trixie main\n\
                 deb [signed-by={KEYRING}] http://deb.debian.org/debian-security trixie-security main\n"
            )
        );
        assert_eq!(
            sources_list(super::super::lanes::series("sid").unwrap())
                .lines()
                .count(),
            1
        );
    }

    #[test]
    fn module_names_and_builtins() {
        assert_eq!(
            module_name(Path::new("kernel/net/ipv4/tcp_diag.ko.xz")).as_deref(),
            Some("tcp_diag")
        );
        assert_eq!(
            module_name(Path::new("a/nf-nat.ko")).as_deref(),
            Some("nf_nat")
        );
        assert_eq!(module_name(Path::new("modules.order")), None);
        let builtin = "kernel/net/ipv6/ipv6.ko\nkernel/net/ipv4/tcp_cubic.ko\n";
        assert!(is_builtin(builtin, "ipv6"));
        assert!(!is_builtin(builtin, "veth"));
    }

    #[test]
    fn modules_load_after_what_they_depend_on() {
        let deps = |m: &str| -> Result<Vec<String>, String> {
            Ok(match m {
                "tcp_diag" => vec!["inet_diag".into()],
                "inet_diag" => vec!["sock_diag".into()],
                _ => vec![],
            })
        };
        assert_eq!(
            load_order(&["inet_diag", "tcp_diag", "veth"], deps, |_| false).unwrap(),
            ["sock_diag", "inet_diag", "tcp_diag", "veth"]
        );
        assert_eq!(
            load_order(&["tcp_diag", "veth"], deps, |m| m == "sock_diag"
                || m == "veth")
            .unwrap(),
            ["inet_diag", "tcp_diag"]
        );
        let cycle = |m: &str| -> Result<Vec<String>, String> {
            Ok(vec![if m == "a" { "b".into() } else { "a".into() }])
        };
        assert!(load_order(&["a"], cycle, |_| false).is_err());
    }

    /// A minimal ELF64 with a section-name table and one `.modinfo` section.
    fn elf_with_modinfo(modinfo: &[u8]) -> Vec<u8> {
        let names = b"\0.shstrtab\0.modinfo\0";
        let mut elf = vec![0u8; 64];
        elf[..6].copy_from_slice(b"\x7fELF\x02\x01");
        let names_off = elf.len();
        elf.extend_from_slice(names);
        let info_off = elf.len();
        elf.extend_from_slice(modinfo);
        let shoff = elf.len();
        elf[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
        elf[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        elf[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
        elf[0x3e..0x40].copy_from_slice(&1u16.to_le_bytes());
        for (name, off, size) in [
            (0u32, 0usize, 0usize),
            (1, names_off, names.len()),
            (11, info_off, modinfo.len()),
        ] {
            let mut h = [0u8; 64];
            h[..4].copy_from_slice(&name.to_le_bytes());
            h[24..32].copy_from_slice(&(off as u64).to_le_bytes());
            h[32..40].copy_from_slice(&(size as u64).to_le_bytes());
            elf.extend_from_slice(&h);
        }
        elf
    }

    #[test]
    fn modinfo_reads_the_depends_field() {
        let elf = elf_with_modinfo(b"license=GPL\0depends=inet_diag\0retpoline=Y\0name=tcp_diag\0");
        assert_eq!(
            modinfo(&elf, "depends").unwrap().as_deref(),
            Some("inet_diag")
        );
        assert_eq!(modinfo(&elf, "name").unwrap().as_deref(), Some("tcp_diag"));
        assert_eq!(modinfo(&elf, "alias").unwrap(), None);
        let none = elf_with_modinfo(b"depends=\0");
        assert_eq!(modinfo(&none, "depends").unwrap().as_deref(), Some(""));
        assert!(modinfo(b"#!/bin/sh\n", "depends").is_err());
        assert!(modinfo(&elf[..100], "depends").is_err(), "truncated");
    }
}
