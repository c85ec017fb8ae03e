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
        self.unit(id).map(|u| u.label)
    }

    /// The cgroup's label and what its path says of a container or Kubernetes pod.
    pub fn unit(&mut self, id: u64) -> Option<Unit> {
        if !self.paths.contains_key(&id) && self.walked.is_none_or(|t| t.elapsed() >= REWALK) {
            self.paths.clear();
            if let Some(root) = cgroup2_mount() {
                walk(&root, "", 0, &mut self.paths);
            }
            self.walked = Some(Instant::now());
        }
        self.paths.get(&id).map(|p| Unit {
            label: label_of(p),
            workload: workload_of(p),
        })
    }
}

/// A process's cgroup, as the views show it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unit {
    /// `nginx.service`, `container 3f2a9c1b7d0e`, or the path.
    pub label: String,
    pub workload: Workload,
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

/// What a cgroup path says about the workload in it (no API is asked: only the names the
/// container runtimes and the kubelet give their cgroups).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Workload {
    /// The container id's first 12 hex digits.
    pub container: Option<String>,
    /// The Kubernetes pod's UID (`kubepods...pod<UID>`).
    pub pod_uid: Option<String>,
    /// The pod's QoS class: `guaranteed`, `burstable` or `besteffort`.
    pub qos: Option<&'static str>,
}

/// Reads a kubelet cgroup path, in its two shapes: the systemd driver's
/// `/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<UID with _>.slice/cri-containerd-<ID>.scope`
/// and the cgroupfs driver's `/kubepods/burstable/pod<UID>/<ID>`; a Guaranteed pod sits right
/// under `kubepods` (no QoS level in the path).
pub fn workload_of(path: &str) -> Workload {
    let mut w = Workload::default();
    let mut in_kubepods = false;
    for part in path.split('/').filter(|p| !p.is_empty()) {
        let stem = part.strip_suffix(".slice").unwrap_or(part);
        if stem == "kubepods" {
            in_kubepods = true;
            w.qos = Some("guaranteed");
            continue;
        }
        if !in_kubepods {
            if let Some(id) = container_id(part) {
                w.container = Some(id[..12].to_owned());
            }
            continue;
        }
        // `burstable`, `kubepods-burstable`; then the pod: `pod<UID>` or `kubepods-...-pod<UID>`.
        let last = stem.rsplit('-').next().unwrap_or(stem);
        match last {
            "burstable" => w.qos = Some("burstable"),
            "besteffort" => w.qos = Some("besteffort"),
            _ => {
                if let Some(uid) = stem.rfind("pod").map(|i| &stem[i + 3..])
                    && w.pod_uid.is_none()
                    && is_uid(uid)
                {
                    w.pod_uid = Some(uid.replace('_', "-"));
                } else if let Some(id) = container_id(part) {
                    w.container = Some(id[..12].to_owned());
                }
            }
        }
    }
    if !in_kubepods {
        w.qos = None;
    }
    w
}

/// A pod UID: 32 hex digits in groups 8-4-4-4-12, joined by `-` (or `_` under systemd).
fn is_uid(s: &str) -> bool {
    let groups: Vec<&str> = s.split(['-', '_']).collect();
    groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12])
        && groups
            .iter()
            .all(|g| g.bytes().all(|b| b.is_ascii_hexdigit()))
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
    fn kubelet_paths_give_the_pod_and_its_qos() {
        let uid = "7c0a1e3b-5d2f-4a6b-9c8d-0e1f2a3b4c5d";
        let id = "3f2a9c1b7d0e".to_owned() + &"b".repeat(52);
        let systemd = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{id}.scope",
            uid.replace('-', "_")
        );
        assert_eq!(
            workload_of(&systemd),
            Workload {
                container: Some("3f2a9c1b7d0e".into()),
                pod_uid: Some(uid.into()),
                qos: Some("burstable"),
            }
        );
        let guaranteed = format!(
            "/kubepods.slice/kubepods-pod{}.slice/crio-{id}.scope",
            uid.replace('-', "_")
        );
        assert_eq!(workload_of(&guaranteed).qos, Some("guaranteed"));
        assert_eq!(workload_of(&guaranteed).pod_uid.as_deref(), Some(uid));
        let cgroupfs = format!("/kubepods/besteffort/pod{uid}/{id}");
        assert_eq!(
            workload_of(&cgroupfs),
            Workload {
                container: Some("3f2a9c1b7d0e".into()),
                pod_uid: Some(uid.into()),
                qos: Some("besteffort"),
            }
        );
        // Not a pod: a docker container, a service, a pod-like name that is not a UID.
        assert_eq!(
            workload_of(&format!("/system.slice/docker-{id}.scope")),
            Workload {
                container: Some("3f2a9c1b7d0e".into()),
                ..Workload::default()
            }
        );
        assert_eq!(
            workload_of("/system.slice/nginx.service"),
            Workload::default()
        );
        assert_eq!(workload_of("/kubepods/burstable/podxyz").pod_uid, None);
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
