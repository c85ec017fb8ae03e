//! `twt-docs DIR`: writes twtrace's man pages and shell completions (see
//! `twtrace_tests::docs`) under DIR/man and DIR/completions, removes pages of subcommands that
//! no longer exist, and prints each path it wrote.

use std::{fs, path::PathBuf, process::ExitCode};

use twtrace_tests::docs;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [dir] = args.as_slice() else {
        eprintln!("usage: twt-docs DIR");
        return ExitCode::from(2);
    };
    match write(&PathBuf::from(dir)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("twt-docs: {e}");
            ExitCode::FAILURE
        }
    }
}

fn write(dir: &std::path::Path) -> std::io::Result<()> {
    let files = docs::render();
    for sub in ["man", "completions"] {
        fs::create_dir_all(dir.join(sub))?;
    }
    // A page whose subcommand is gone would otherwise stay behind.
    for entry in fs::read_dir(dir.join("man"))? {
        let path = entry?.path();
        let name = format!(
            "man/{}",
            path.file_name().unwrap_or_default().to_string_lossy()
        );
        if !files.iter().any(|(f, _)| *f == name) {
            fs::remove_file(&path)?;
        }
    }
    for (name, bytes) in files {
        let path = dir.join(&name);
        fs::write(&path, bytes)?;
        println!("{}", path.display());
    }
    Ok(())
}
