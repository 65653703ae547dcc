//! What a new user meets when choosing CPUs and accelerators: `--cpus N` beyond what the
//! accelerator runs is refused (never fewer CPUs than asked), `--accel auto` falling back to the
//! software CPU says so at the default log level, and logs carry no colour codes off a terminal.

use std::process::{Command, Output};

fn vmm() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_rqemu-vmm"));
    c.env_remove("RQEMU_LOG")
        .env_remove("RUST_LOG")
        .env_remove("NO_COLOR");
    c
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn tcg_refuses_more_cpus_than_it_runs() {
    let out = vmm()
        .args([
            "--accel",
            "tcg",
            "--cpus",
            "9",
            "--kernel",
            "/nonexistent/kernel",
        ])
        .output()
        .unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "stderr: {err}");
    assert!(
        err.contains("--cpus 9") && err.contains("tcg") && err.contains("at most 8"),
        "the error must name the asked count, the accelerator and its limit: {err}"
    );
}

/// Runs `rqemu-vmm --accel auto` in a private mount namespace where `/dev/kvm` is `/dev/null`
/// (KVM present but unusable), stderr on a pipe. Needs root (CI runs as root).
fn auto_without_kvm(extra_env: &[(&str, &str)]) -> Output {
    assert!(
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() } == 0,
        "this test masks /dev/kvm in a private mount namespace and must run as root"
    );
    let bin = env!("CARGO_BIN_EXE_rqemu-vmm");
    let script = format!(
        "mount --make-rprivate / && mount --bind /dev/null /dev/kvm && \
         exec {bin} --accel auto --kernel /nonexistent/kernel"
    );
    let mut c = Command::new("unshare");
    c.args(["--mount", "sh", "-c", &script]);
    c.env_remove("RQEMU_LOG")
        .env_remove("RUST_LOG")
        .env_remove("NO_COLOR");
    for (k, v) in extra_env {
        c.env(k, v);
    }
    c.output().expect("running unshare (util-linux)")
}

#[test]
fn auto_falls_back_to_tcg_with_a_warning_without_colour_codes() {
    if !std::path::Path::new("/dev/kvm").exists() {
        // Without /dev/kvm the fallback happens anyway: run the binary directly.
        eprintln!("NOTE: /dev/kvm absent: checking the fallback warning without masking it");
    }
    let out = if std::path::Path::new("/dev/kvm").exists() {
        auto_without_kvm(&[])
    } else {
        vmm()
            .args(["--accel", "auto", "--kernel", "/nonexistent/kernel"])
            .output()
            .unwrap()
    };
    let err = stderr(&out);
    assert!(
        err.contains("KVM is not usable") && err.contains("software CPU (TCG)"),
        "the fallback must be said at the default log level (warn): {err}"
    );
    assert!(err.contains("WARN"), "the fallback is a warning: {err}");
    assert!(
        !err.contains('\u{1b}'),
        "ANSI escape codes in a log written to a pipe: {err:?}"
    );
    // The run then fails on the missing kernel, with a message naming it.
    assert_eq!(out.status.code(), Some(1), "stderr: {err}");
    assert!(err.contains("/nonexistent/kernel"), "{err}");
}
