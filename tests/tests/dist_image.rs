//! The OCI image that `cargo +stable xtask dist` builds without a registry (buildah from
//! scratch, written as an oci-archive): one layer holding the static binary and nothing else;
//! podman runs it with the run line deploy/README.md documents (never `--privileged`);
//! `twtrace serve` in it runs as nobody with no capability and counts connections made on
//! loopback on /metrics; after `podman stop` no twtrace program stays loaded.
//!
//! Needs root (podman, and twtrace loads its programs).

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use twtrace_tests::{
    Server, TempDir, client,
    deploy::{CAPS, CONTAINER_ARGV, combined, deploy, output, read, tool},
    dist, exclusive, http_get, proc_status, quiet_programs, require_root, run, settled_programs,
    twtrace_programs_loaded, unique_port,
};

/// What the image runs after CONTAINER_ARGV: it has no /etc/passwd, so `nobody` by number.
const IMAGE_USER: [&str; 2] = ["--user", "65534"];

fn json(path: &Path) -> Value {
    serde_json::from_str(&read(path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// An OCI blob of the unpacked archive, by its `sha256:...` digest.
fn blob(layout: &Path, digest: &Value) -> PathBuf {
    let digest = digest.as_str().expect("digest");
    let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
    layout.join("blobs/sha256").join(hex)
}

#[test]
fn image_holds_the_static_binary_alone() {
    let archive = dist::archive("-oci.tar");
    let layout = TempDir::new("oci-layout");
    run(Command::new("tar")
        .arg("-xf")
        .arg(&archive)
        .arg("-C")
        .arg(&layout.0));
    let index = json(&layout.0.join("index.json"));
    let manifests = index["manifests"].as_array().expect("index.json manifests");
    assert_eq!(manifests.len(), 1, "{index}");
    let manifest = json(&blob(&layout.0, &manifests[0]["digest"]));
    let layers = manifest["layers"].as_array().expect("layers");
    assert_eq!(layers.len(), 1, "one layer: {manifest}");

    // The layer: the binary and the directories leading to it, nothing else.
    let layer = blob(&layout.0, &layers[0]["digest"]);
    let listing = run(Command::new("tar").arg("-tzvf").arg(&layer));
    let entries: BTreeSet<(char, String)> = listing
        .lines()
        .map(|l| {
            let kind = l.chars().next().expect("mode column");
            let name = l.split_whitespace().last().expect("name column");
            (
                kind,
                name.trim_start_matches("./")
                    .trim_end_matches('/')
                    .to_owned(),
            )
        })
        .filter(|(_, name)| !name.is_empty())
        .collect();
    let binary = CONTAINER_ARGV[0].trim_start_matches('/');
    let want: BTreeSet<(char, String)> = [
        ('d', "usr"),
        ('d', "usr/local"),
        ('d', "usr/local/bin"),
        ('-', binary),
    ]
    .map(|(k, n)| (k, n.to_owned()))
    .into();
    assert_eq!(entries, want, "{listing}");
    let unpacked = TempDir::new("oci-layer");
    run(Command::new("tar")
        .arg("-xzf")
        .arg(&layer)
        .arg("-C")
        .arg(&unpacked.0));
    assert!(
        std::fs::read(unpacked.0.join(binary)).unwrap() == std::fs::read(dist::binary()).unwrap(),
        "the image's binary is not dist's"
    );

    // What it runs: the deployments' command line, as nobody by number.
    let config = json(&blob(&layout.0, &manifest["config"]["digest"]))["config"].clone();
    let mut argv: Vec<String> = serde_json::from_value(config["Entrypoint"].clone()).unwrap();
    argv.extend(serde_json::from_value::<Vec<String>>(config["Cmd"].clone()).unwrap());
    let want: Vec<&str> = CONTAINER_ARGV.iter().chain(&IMAGE_USER).copied().collect();
    assert_eq!(argv, want);
    assert_eq!(config["StopSignal"], "SIGTERM");
}

/// The `docker run` line of deploy/README.md, as arguments after `run` and before the image
/// name: the flags podman runs the image with.
fn documented_run_flags() -> Vec<String> {
    let readme = read(&deploy().join("README.md"));
    let mut line = String::new();
    for l in readme.lines().skip_while(|l| !l.starts_with("docker run ")) {
        let (body, more) = match l.trim().strip_suffix('\\') {
            Some(b) => (b, true),
            None => (l.trim(), false),
        };
        line.push_str(body);
        line.push(' ');
        if !more {
            break;
        }
    }
    let words: Vec<String> = line.split_whitespace().map(str::to_owned).collect();
    assert!(
        words.len() > 3 && words[..2] == ["docker", "run"],
        "deploy/README.md has no `docker run` line"
    );
    words[2..words.len() - 1].to_vec()
}

/// This machine's root may lack CAP_SYS_RESOURCE (it does in the project's sandboxes): then no
/// container can get limits above this process's own, and podman's defaults (nofile and nproc
/// at 1048576) and the documented `memlock=-1:-1` are refused at start. The container then
/// gets what can be had: memlock and nofile as this process has them (kernels from 5.11 do not
/// charge BPF maps to memlock at all) and 32768 processes (the runtime's own process holds less
/// than this one does).
fn limits_this_machine_allows(flags: &mut Vec<String>) {
    let cap_eff = u64::from_str_radix(&proc_status("self", "CapEff"), 16).expect("CapEff");
    // CAP_SYS_RESOURCE (linux/capability.h; the libc crate does not name it).
    const CAP_SYS_RESOURCE: u32 = 24;
    if cap_eff & (1 << CAP_SYS_RESOURCE) != 0 {
        return;
    }
    let hard = |resource| {
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes into r.
        assert_eq!(unsafe { libc::getrlimit(resource, &mut r) }, 0);
        r.rlim_max
    };
    let memlock = hard(libc::RLIMIT_MEMLOCK);
    // `--ulimit memlock=-1:-1` in the run line: the option and its value.
    let i = flags
        .iter()
        .position(|f| f == "--ulimit")
        .expect("the run line sets memlock");
    assert_eq!(flags.remove(i + 1), "memlock=-1:-1");
    flags.remove(i);
    for limit in [
        format!("memlock={memlock}:{memlock}"),
        format!("nofile={0}:{0}", hard(libc::RLIMIT_NOFILE)),
        "nproc=32768:32768".to_owned(),
    ] {
        flags.push(format!("--ulimit={limit}"));
    }
}

/// Podman's default seccomp profile (containers-common) allows bpf() only with CAP_SYS_ADMIN
/// up to version 0.50 (Debian 12); newer ones, like Docker's since 23.0, also with CAP_BPF.
/// Where it does not, deploy/README.md says to run with a profile that does, never with
/// SYS_ADMIN: this is that profile, the default one with bpf() allowed to CAP_BPF.
fn seccomp_profile(dir: &Path) -> Option<PathBuf> {
    let default = Path::new("/usr/share/containers/seccomp.json");
    let mut profile = json(default);
    let rules = profile["syscalls"].as_array_mut().expect("syscalls");
    let allows_bpf_to_cap_bpf = rules.iter().any(|r| {
        r["action"] == "SCMP_ACT_ALLOW"
            && r["names"]
                .as_array()
                .is_some_and(|n| n.contains(&"bpf".into()))
            && r["includes"]["caps"]
                .as_array()
                .is_some_and(|c| c.contains(&"CAP_BPF".into()))
    });
    if allows_bpf_to_cap_bpf {
        return None;
    }
    for rule in rules.iter_mut() {
        // The rule that refuses bpf() (with EPERM) to containers without CAP_SYS_ADMIN.
        let refuses = rule["action"] == "SCMP_ACT_ERRNO"
            && rule["excludes"]["caps"]
                .as_array()
                .is_some_and(|c| c.contains(&"CAP_SYS_ADMIN".into()));
        if refuses && let Some(names) = rule["names"].as_array_mut() {
            names.retain(|n| n != "bpf");
        }
    }
    rules.push(serde_json::json!({
        "names": ["bpf"],
        "action": "SCMP_ACT_ALLOW",
        "includes": {"caps": ["CAP_BPF"]}
    }));
    let path = dir.join("seccomp.json");
    std::fs::write(&path, profile.to_string()).unwrap();
    Some(path)
}

/// crun (podman's default runtime on Debian) refuses hosts whose cgroups are in hybrid mode
/// (v1 controllers, v2 mounted beside them), as this machine's are; runc runs there.
fn runtime() -> Option<&'static str> {
    let pure_v2 = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
    (!pure_v2).then_some("runc")
}

/// A container of the test's own, removed (and its image with it) on drop.
struct Container {
    name: String,
    image: String,
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new("podman")
            .args(["rm", "--force", &self.name])
            .output();
        let _ = Command::new("podman").args(["rmi", &self.image]).output();
    }
}

fn podman() -> Command {
    let mut c = Command::new(tool("podman", "podman"));
    if let Some(runtime) = runtime() {
        c.args(["--runtime", runtime]);
    }
    c
}

fn state(name: &str, field: &str) -> String {
    run(podman().args([
        "inspect",
        "--format",
        &format!("{{{{.State.{field}}}}}"),
        name,
    ]))
    .trim()
    .to_owned()
}

#[test]
fn podman_runs_the_image_with_the_documented_capabilities_and_it_leaves_nothing() {
    require_root();
    let archive = dist::archive("-oci.tar");
    let _g = exclusive();
    let before = quiet_programs();

    let loaded = run(podman().args(["load", "--quiet", "--input"]).arg(&archive));
    let image = loaded
        .lines()
        .find_map(|l| l.strip_prefix("Loaded image: "))
        .unwrap_or_else(|| panic!("podman load said: {loaded}"))
        .trim()
        .to_owned();
    let name = format!("twt-image-{}", std::process::id());
    let container = Container {
        name: name.clone(),
        image: image.clone(),
    };

    let mut flags = documented_run_flags();
    let caps: BTreeSet<&str> = flags
        .iter()
        .filter_map(|f| f.strip_prefix("--cap-add="))
        .collect();
    assert_eq!(caps, CAPS.into(), "the documented capabilities");
    assert!(flags.iter().any(|f| f == "--cap-drop=ALL"));
    assert!(!flags.iter().any(|f| f.contains("privileged")));
    let i = flags.iter().position(|f| f == "--name").expect("--name");
    flags[i + 1] = name.clone();
    limits_this_machine_allows(&mut flags);
    let dir = TempDir::new("podman");
    if let Some(profile) = seccomp_profile(&dir.0) {
        flags.push(format!("--security-opt=seccomp={}", profile.display()));
    }
    let http_port = unique_port();
    let listen = format!("127.0.0.1:{http_port}");
    // Only our peer's port: TIME_WAIT left by earlier tests would otherwise take the exported
    // series (`--max-series`) before our peer appears.
    let peer_port = unique_port().to_string();
    let out = output(
        podman()
            .arg("run")
            .args(&flags)
            .arg(&image)
            .args(["serve", "--listen", &listen, "--port", &peer_port])
            .args(IMAGE_USER),
    );
    assert!(out.status.success(), "podman run: {}", combined(&out));

    let deadline = Instant::now() + Duration::from_secs(30);
    while http_get(&listen, "/healthz").0 != 200 {
        assert!(
            Instant::now() < deadline,
            "twtrace serve in the container did not answer in 30 s: {}",
            combined(&output(podman().args(["logs", &name])))
        );
        thread::sleep(Duration::from_millis(200));
    }
    // The kernel's view of the process in the container: nobody, no capability left.
    let pid = state(&name, "Pid");
    assert!(
        proc_status(&pid, "Uid")
            .split_whitespace()
            .all(|u| u == "65534"),
        "Uid: {}",
        proc_status(&pid, "Uid")
    );
    assert_eq!(proc_status(&pid, "CapEff"), "0000000000000000");
    assert_eq!(twtrace_programs_loaded(), before + 4);

    // Known churn to one peer, counted on /metrics.
    const N: u64 = 7;
    let peer = format!("127.0.0.1:{peer_port}");
    let _server = Server::start(None, &peer, &[]);
    client(None, &["--to", &peer, "--count", &N.to_string()]);
    // Every series of a group names its network namespace: this test's, the host's.
    let netns = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata("/proc/self/ns/net").unwrap().ino()
    };
    let series = format!(
        "twtrace_timewait_entered_total{{group=\"peer\",key=\"{peer}\",netns=\"{netns}\"}} {N}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (code, metrics) = http_get(&listen, "/metrics");
        assert_eq!(code, 200);
        if metrics.lines().any(|l| l == series) {
            break;
        }
        assert!(Instant::now() < deadline, "no `{series}` in:\n{metrics}");
        thread::sleep(Duration::from_millis(200));
    }

    // podman stop sends the image's stop signal (SIGTERM): twtrace exits 0, detaching all.
    run(podman().args(["stop", "--time", "15", &name]));
    assert_eq!(
        state(&name, "ExitCode"),
        "0",
        "{}",
        combined(&output(podman().args(["logs", &name])))
    );
    assert_eq!(
        settled_programs(before),
        before,
        "programs left after podman stop"
    );
    drop(container);
}
