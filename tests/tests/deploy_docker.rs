//! The Dockerfile of `deploy/docker/`: no Docker engine here, so a parser of our own
//! (instructions, stages, entrypoint) and its HEALTHCHECK command run against a real HTTP
//! server.
//!
//! A missing tool fails the test and names the Debian package that brings it (`cargo +stable
//! xtask setup` installs them). Nothing here needs root or the network.

use std::{
    collections::BTreeSet,
    io::{BufRead, BufReader, Write},
    net::TcpListener,
    path::Path,
    process::Command,
    thread,
};

use twtrace_tests::deploy::{
    CONTAINER_ARGV, TRACEFS, combined, deploy, expected_caps, output, read, root, tool,
};

const INSTRUCTIONS: [&str; 18] = [
    "FROM",
    "RUN",
    "CMD",
    "LABEL",
    "MAINTAINER",
    "EXPOSE",
    "ENV",
    "ADD",
    "COPY",
    "ENTRYPOINT",
    "VOLUME",
    "USER",
    "WORKDIR",
    "ARG",
    "ONBUILD",
    "STOPSIGNAL",
    "HEALTHCHECK",
    "SHELL",
];

#[derive(Debug)]
struct Instruction {
    line: usize,
    keyword: String,
    args: String,
}

/// Docker's line syntax: comments, `\` continuations (comment lines inside them dropped),
/// keyword + arguments. Heredocs are refused (this file has none).
fn parse_dockerfile(text: &str) -> Vec<Instruction> {
    let mut out = Vec::new();
    let mut pending: Option<(usize, String)> = None;
    for (i, raw) in text.lines().enumerate() {
        let trimmed = raw.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && pending.is_none()) {
            continue;
        }
        let (continues, body) = match trimmed.strip_suffix('\\') {
            Some(b) => (true, b),
            None => (false, trimmed),
        };
        let (start, mut acc) = pending.take().unwrap_or((i + 1, String::new()));
        acc.push_str(body);
        acc.push(' ');
        if continues {
            pending = Some((start, acc));
            continue;
        }
        let acc = acc.trim();
        if acc.is_empty() {
            continue;
        }
        let (keyword, args) = acc.split_once(char::is_whitespace).unwrap_or((acc, ""));
        assert!(
            INSTRUCTIONS.contains(&keyword),
            "Dockerfile:{start}: `{keyword}` is not a Dockerfile instruction (in upper case)"
        );
        assert!(
            !args.contains("<<"),
            "Dockerfile:{start}: heredocs are not parsed here"
        );
        out.push(Instruction {
            line: start,
            keyword: keyword.to_owned(),
            args: args.trim().to_owned(),
        });
    }
    assert!(pending.is_none(), "Dockerfile ends inside a continuation");
    out
}

/// `["a", "b"]`: the exec form, as JSON.
fn exec_form(ins: &Instruction) -> Vec<String> {
    serde_json::from_str(&ins.args).unwrap_or_else(|e| {
        panic!(
            "Dockerfile:{}: {} must use the exec form (a JSON array): {e}",
            ins.line, ins.keyword
        )
    })
}

/// The value of `const NAME: &str = "...";` in a Rust file.
fn rust_const(path: &Path, name: &str) -> String {
    let text = read(path);
    let prefix = format!("const {name}: &str = \"");
    text.lines()
        .find_map(|l| l.trim().strip_prefix(prefix.as_str()))
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_else(|| panic!("{}: no {prefix}...\"", path.display()))
        .to_owned()
}

struct Stage<'a> {
    name: String,
    image: String,
    body: Vec<&'a Instruction>,
}

fn stages(instructions: &[Instruction]) -> Vec<Stage<'_>> {
    let mut out: Vec<Stage> = Vec::new();
    for ins in instructions {
        if ins.keyword == "FROM" {
            let words: Vec<&str> = ins.args.split_whitespace().collect();
            let words: Vec<&str> = words.into_iter().filter(|w| !w.starts_with("--")).collect();
            assert!(
                words.len() == 3 && words[1].eq_ignore_ascii_case("AS"),
                "Dockerfile:{}: every stage is named (FROM image AS name): {}",
                ins.line,
                ins.args
            );
            assert!(
                !out.iter().any(|s| s.name == words[2]),
                "Dockerfile:{}: stage {} twice",
                ins.line,
                words[2]
            );
            out.push(Stage {
                name: words[2].to_owned(),
                image: words[0].to_owned(),
                body: Vec::new(),
            });
        } else {
            let stage = out.last_mut().unwrap_or_else(|| {
                panic!(
                    "Dockerfile:{}: {} before the first FROM (not used in this file)",
                    ins.line, ins.keyword
                )
            });
            stage.body.push(ins);
        }
    }
    out
}

#[test]
fn dockerfile_builds_with_the_project_toolchain_and_runs_serve() {
    let path = deploy().join("docker/Dockerfile");
    let text = read(&path);
    let instructions = parse_dockerfile(&text);
    let stages = stages(&instructions);
    assert!(stages.len() >= 2, "a multi-stage build");

    // COPY --from names an earlier stage.
    for (i, stage) in stages.iter().enumerate() {
        for ins in &stage.body {
            if let Some(from) = ins
                .args
                .split_whitespace()
                .find_map(|w| w.strip_prefix("--from="))
            {
                assert!(
                    stages[..i].iter().any(|s| s.name == from),
                    "Dockerfile:{}: --from={from} is not an earlier stage",
                    ins.line
                );
            }
        }
    }

    // Builder: the toolchain of rust-toolchain.toml and of `xtask setup`.
    let toolchain = read(&root().join("rust-toolchain.toml"));
    let channel = toolchain
        .lines()
        .find_map(|l| l.trim().strip_prefix("channel = \""))
        .and_then(|r| r.split('"').next())
        .expect("rust-toolchain.toml: channel");
    let setup = root().join("xtask/src/setup.rs");
    let llvm = rust_const(&setup, "LLVM");
    let linker = rust_const(&setup, "BPF_LINKER");
    let builder = &stages[0];
    assert!(
        builder.image.starts_with(&format!("rust:{channel}-")),
        "the builder uses Rust {channel} (rust-toolchain.toml): {}",
        builder.image
    );
    let runs: String = builder
        .body
        .iter()
        .filter(|i| i.keyword == "RUN")
        .map(|i| i.args.as_str())
        .collect::<Vec<_>>()
        .join("\n");
    for want in [
        format!("llvm-{llvm}-dev"),
        format!("PATH=/usr/lib/llvm-{llvm}/bin:$PATH cargo install --locked bpf-linker@{linker}"),
        format!("--no-default-features --features llvm-{llvm}"),
        "rust-src".to_owned(),
        "cargo build --release --locked".to_owned(),
    ] {
        assert!(
            runs.contains(&want),
            "the builder does not run `{want}`:\n{runs}"
        );
    }

    // Runtime: the binary on Debian slim, root (twtrace drops privileges itself), serving.
    let runtime = stages.last().unwrap();
    assert_eq!(runtime.image, "debian:bookworm-slim");
    let find = |kw: &str| -> Vec<&Instruction> {
        runtime
            .body
            .iter()
            .copied()
            .filter(|i| i.keyword == kw)
            .collect()
    };
    assert!(
        find("USER").is_empty(),
        "no USER: twtrace must start as root"
    );
    let [entrypoint] = find("ENTRYPOINT")[..] else {
        panic!("one ENTRYPOINT in the final stage")
    };
    let [cmd] = find("CMD")[..] else {
        panic!("one CMD in the final stage")
    };
    let mut argv = exec_form(entrypoint);
    argv.extend(exec_form(cmd));
    assert_eq!(argv, CONTAINER_ARGV);
    assert!(
        find("COPY").iter().any(|c| c.args.starts_with("--from=")
            && c.args.split_whitespace().last() == Some(argv[0].as_str())),
        "the final stage copies the binary from the builder to {}",
        argv[0]
    );
    assert!(
        find("EXPOSE").iter().any(|e| e
            .args
            .split_whitespace()
            .any(|p| p == "9979" || p == "9979/tcp")),
        "EXPOSE 9979"
    );
    let [health] = find("HEALTHCHECK")[..] else {
        panic!("one HEALTHCHECK in the final stage")
    };
    assert!(health.args.contains("/healthz"), "{}", health.args);

    // The documented run line: the capability set, no --privileged, the host mounts.
    let run_line: String = text
        .lines()
        .filter_map(|l| l.strip_prefix('#'))
        .skip_while(|l| !l.trim_start().starts_with("docker run"))
        .take_while(|l| !l.trim().is_empty())
        .collect::<Vec<_>>()
        .join(" ")
        .replace('\\', " ");
    assert!(
        !run_line.is_empty(),
        "no `docker run` line in the Dockerfile's comments"
    );
    let words: Vec<&str> = run_line.split_whitespace().collect();
    let added: BTreeSet<String> = words
        .iter()
        .filter_map(|w| w.strip_prefix("--cap-add="))
        .map(str::to_owned)
        .collect();
    assert_eq!(added, expected_caps(), "docker run --cap-add");
    assert!(
        !words
            .iter()
            .any(|w| w.starts_with("--cap-add") && !w.contains('=')),
        "docker run: spell capabilities --cap-add=NAME (checked above): {run_line}"
    );
    for want in ["--cap-drop=ALL", "--pid=host", "--network=host"] {
        assert!(words.contains(&want), "docker run lacks {want}: {run_line}");
    }
    // Host mounts: the kernel's BTF, read-only, and nothing else (no tracefs).
    let mut mounts = Vec::new();
    let mut rest = words.iter();
    while let Some(w) = rest.next() {
        if ["-v", "--volume", "--mount"].contains(w) {
            mounts.push(rest.next().copied().unwrap_or_default());
        } else if let Some(m) = ["--volume=", "--mount="]
            .iter()
            .find_map(|p| w.strip_prefix(p))
        {
            mounts.push(m);
        }
    }
    assert_eq!(
        mounts,
        ["/sys/kernel/btf:/sys/kernel/btf:ro"],
        "docker run host mounts: {run_line}"
    );
    for word in TRACEFS {
        assert!(
            !run_line.contains(word),
            "docker run: serve reads no tracefs, no {word}: {run_line}"
        );
    }
    assert!(
        !words.contains(&"--privileged"),
        "docker run must not be --privileged"
    );
}

/// One HTTP exchange on `listener`: returns the request line, answers with `status`.
fn serve_once(listener: TcpListener, status: &'static str) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let (stream, _) = listener.accept().expect("accept");
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut request = String::new();
        reader.read_line(&mut request).unwrap();
        let mut line = String::new();
        while reader.read_line(&mut line).unwrap_or(0) > 2 {
            line.clear();
        }
        let mut stream = stream;
        let _ = write!(
            stream,
            "HTTP/1.1 {status}\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n"
        );
        request.trim().to_owned()
    })
}

/// The HEALTHCHECK command, run as Docker would run it (against a local server on another
/// port): success on 200 for GET /healthz, failure on 503.
#[test]
fn dockerfile_healthcheck_command_works() {
    let text = read(&deploy().join("docker/Dockerfile"));
    let health = parse_dockerfile(&text)
        .into_iter()
        .find(|i| i.keyword == "HEALTHCHECK")
        .expect("HEALTHCHECK");
    let json = &health.args[health
        .args
        .find("CMD [")
        .expect("HEALTHCHECK ... CMD [...]")
        + 4..];
    let argv: Vec<String> = serde_json::from_str(json).expect("HEALTHCHECK CMD in exec form");
    assert!(
        argv.join(" ").contains("9979"),
        "the health check asks port 9979"
    );
    tool("bash", "bash");
    for (status, ok) in [("200 OK", true), ("503 Service Unavailable", false)] {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = serve_once(listener, status);
        let argv: Vec<String> = argv
            .iter()
            .map(|a| a.replace("9979", &port.to_string()))
            .collect();
        let out = output(Command::new(&argv[0]).args(&argv[1..]));
        assert_eq!(server.join().unwrap(), "GET /healthz HTTP/1.0");
        assert_eq!(
            out.status.success(),
            ok,
            "health check against {status}: {} {}",
            out.status,
            combined(&out)
        );
    }
}
