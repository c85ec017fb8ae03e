//! cgroup ids (recorded by the kernel programs with `bpf_get_current_cgroup_id`) -> the systemd
//! unit or container a process runs in. The id is that of the cgroup v2 (unified) hierarchy,
//! and there a cgroup's id is the inode number of its directory, so a walk of the cgroup2
//! mount maps ids to paths. Only that mount: on a hybrid v1/v2 host every v1 hierarchy's root
//! has inode 1 too.

use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

/// A miss re-walks the tree at most this often (new containers appear; walks cost).
const REWALK: Duration = Duration::from_secs(5);
const MAX_DEPTH: usize = 12;

#[derive(Default)]
pub struct CgroupNames {
    paths: HashMap<u64, String>,
    walked: Option<Instant>,
}

impl CgroupNames {
    pub fn new() -> Self {
        Self::default()
    }

    /// A short label for the cgroup: `nginx.service`, `container 3f2a9c1b7d0e`, or the path.
    pub fn label(&mut self, id: u64) -> Option<String> {
        if !self.paths.contains_key(&id) && self.walked.is_none_or(|t| t.elapsed() >= REWALK) {
            self.paths.clear();
            if let Some(root) = cgroup2_mount() {
                walk(&root, "", 0, &mut self.paths);
            }
            self.walked = Some(Instant::now());
        }
        self.paths.get(&id).map(|p| label_of(p))
    }
}

/// Where the cgroup2 filesystem is mounted: /sys/fs/cgroup on unified hosts,
/// /sys/fs/cgroup/unified on hybrid ones.
pub fn cgroup2_mount() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_, dir, fstype) = (f.next()?, f.next()?, f.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(dir))
    })
}

fn walk(dir: &Path, rel: &str, depth: usize, out: &mut HashMap<u64, String>) {
    let Ok(meta) = dir.metadata() else { return };
    out.insert(
        meta.ino(),
        if rel.is_empty() {
            "/".into()
        } else {
            rel.into()
        },
    );
    if depth >= MAX_DEPTH {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            let name = e.file_name();
            let name = name.to_string_lossy();
            walk(&e.path(), &format!("{rel}/{name}"), depth + 1, out);
        }
    }
}

/// The innermost meaningful name of a cgroup path.
pub fn label_of(path: &str) -> String {
    for part in path.rsplit('/') {
        if let Some(id) = container_id(part) {
            return format!("container {}", &id[..12]);
        }
        if part.ends_with(".service") || part.ends_with(".scope") && !part.starts_with("session-") {
            return part.to_owned();
        }
    }
    path.to_owned()
}

/// `docker-<64 hex>.scope`, `cri-containerd-<hex>.scope`, `crio-<hex>.scope`, `libpod-<hex>`,
/// or a bare 64-hex directory (cgroupfs drivers).
fn container_id(part: &str) -> Option<&str> {
    let stem = part.strip_suffix(".scope").unwrap_or(part);
    let id = stem.rsplit('-').next()?;
    (id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())).then_some(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels() {
        assert_eq!(label_of("/system.slice/nginx.service"), "nginx.service");
        let id = "3f2a9c1b7d0e".to_owned() + &"a".repeat(52);
        assert_eq!(
            label_of(&format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-pod1.slice/cri-containerd-{id}.scope"
            )),
            "container 3f2a9c1b7d0e"
        );
        assert_eq!(
            label_of(&format!("/system.slice/docker-{id}.scope")),
            "container 3f2a9c1b7d0e"
        );
        assert_eq!(
            label_of("/user.slice/user-0.slice/session-3.scope"),
            "/user.slice/user-0.slice/session-3.scope"
        );
        assert_eq!(label_of("/"), "/");
    }

    #[test]
    fn the_root_cgroup_resolves_when_mounted() {
        let Some(meta) = cgroup2_mount().and_then(|p| p.metadata().ok()) else {
            eprintln!("no cgroup2 mount: skipped");
            return;
        };
        assert_eq!(CgroupNames::new().label(meta.ino()), Some("/".into()));
    }
}
