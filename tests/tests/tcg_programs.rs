//! Real dynamically linked Debian programs on the software CPU: `rqemu-vmm --accel tcg` boots
//! the reference guest, whose initramfs carries the host's gzip, xz, bzip2, zstd, coreutils
//! checksums, sort, seq and printf, bc and mawk with their shared libraries (`/opt/host/bin`, built by
//! `scripts/guest-assets.sh`). The same script runs on the host and in the guest; every
//! program's exit status, output digest and (for text) first lines must be identical.
//!
//! This exercises glibc's start-up (ISA-level check, CPUID-based selection of string
//! functions, IFUNCs), libm (bc's and mawk's transcendental functions) and the programs' own
//! optimised loops on the TCG.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use rqemu_e2e::cpio::{append_initramfs, CpioArchive};
use rqemu_e2e::{GuestAssets, RqemuVm};

const TIMEOUT: Duration = Duration::from_secs(1500);

/// Run by `busybox sh` on the host (P=/usr/bin, W=a scratch dir) and as `/test.sh` in the
/// guest (defaults). Every check prints `PROG <name> rc=<status> md5=<digest of stdout>` and
/// text outputs also `OUT <name>: <line>` for their first lines.
const SCRIPT: &str = r#"#!/bin/sh
P="${P:-/opt/host/bin}"
W="${W:-/tmp}"
B=busybox
export LC_ALL=C
{ $B seq 1 20000; $B seq 3 7 70000 | $B sed 's/7/seven/g; s/3/three /'; } >"$W/in.txt"
check() {
    name="$1"; text="$2"; shift 2
    sh -c "$*" >"$W/out" 2>"$W/err"
    rc=$?
    echo "PROG $name rc=$rc md5=$($B md5sum <"$W/out" | $B cut -d' ' -f1)"
    if [ "$text" = text ]; then $B head -n 12 "$W/out" | $B sed "s/^/OUT $name: /"; fi
    [ "$rc" -eq 0 ] || $B head -n 3 "$W/err" | $B sed "s/^/ERR $name: /"
}
IN="$W/in.txt"
check gzip bin "$P/gzip -9 -n -c $IN"
check gunzip bin "$P/gzip -6 -n -c $IN | $P/gzip -d -c"
check xz bin "$P/xz -6 -T1 -c $IN"
check unxz bin "$P/xz -3 -T1 -c $IN | $P/xz -d -c"
check bzip2 bin "$P/bzip2 -9 -c $IN"
check bunzip2 bin "$P/bzip2 -1 -c $IN | $P/bzip2 -d -c"
check zstd bin "$P/zstd -q -19 -c $IN"
check unzstd bin "$P/zstd -q -3 -c $IN | $P/zstd -q -d -c"
check sha256sum text "$P/sha256sum <$IN"
check sha1sum text "$P/sha1sum <$IN"
check md5sum text "$P/md5sum <$IN"
check b2sum text "$P/b2sum <$IN"
check sort text "$P/sort -r $IN"
check sort-n text "$P/sort -n -r -k 2 $IN"
check bc text "echo 'scale=60; 4*a(1); e(1); l(10); sqrt(2); s(1)+c(1); 2^300; 1/7; 355/113' | $P/bc -l"
check mawk-libm text "$P/mawk 'BEGIN { for (i = 1; i <= 12; i++) printf \"%.17g %.17g %.17g %.17g %.17g\n\", sin(i), cos(i / 3), exp(i / 2), log(i * 10), atan2(i, 7) }'"
# a loop long enough for libm's code to be translated (scalar double arithmetic and FMA on
# the host's units under the guest's MXCSR: jit/insn/fp.rs).
check mawk-loop text "$P/mawk 'BEGIN { for (i = 1; i < 20000; i++) s += sin(i) * log(i) + exp(-i / 1000) * cos(i) + i / 7; printf \"%.17g\n\", s }'"
check mawk-sum text "$P/mawk '{ s += sqrt(\$1 + 0.5); n++ } END { printf \"%d %.17g\n\", n, s }' $IN"
# long double (x87) arithmetic, comparisons and conversions: strtold, printf's %Lg/%La.
check seq-ld text "$P/seq -f '%.19g' -0.7 0.37 900 | $B tail -n 12"
check sort-g text "$P/seq -f '%.19g' 1e-5 0.0731 70 | $P/sort -g -r | $B head -n 40"
check printf-ld text "$P/printf '%.21Lg %La %.30Le %Lg\\n' 0.1 1e-4000 3.14159265358979323846264338 -2.5e4931 1.5 2 3e300 7e-310"
# glibc's view of the CPU: which glibc-hwcaps levels (x86-64-v2, -v3, -v4) it supports.
/lib64/ld-linux-x86-64.so.2 --help | $B grep 'x86-64-v' | $B sed 's/^ */ISA /'
echo "PROG done"
"#;

/// `name -> lines` from the `PROG`/`OUT`/`ERR` lines of an output (console noise ignored).
fn results(text: &str) -> BTreeMap<String, Vec<String>> {
    let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in text.lines().map(|l| l.trim_end_matches('\r')) {
        let Some(start) = ["PROG ", "OUT ", "ERR "].iter().find_map(|p| line.find(p)) else {
            continue;
        };
        let line = &line[start..];
        let mut words = line.splitn(3, ' ');
        let (Some(_), Some(name)) = (words.next(), words.next()) else {
            continue;
        };
        map.entry(name.trim_end_matches(':').to_string())
            .or_default()
            .push(line.to_string());
    }
    map
}

#[test]
fn debian_programs_match_the_host_under_tcg() {
    let assets = GuestAssets::locate().expect("guest assets (run scripts/guest-assets.sh)");
    let dir = tempfile::tempdir().unwrap();

    // Host reference run.
    let work = dir.path().join("host");
    std::fs::create_dir(&work).unwrap();
    let script = dir.path().join("programs.sh");
    std::fs::write(&script, SCRIPT).unwrap();
    let host = Command::new("busybox")
        .arg("sh")
        .arg(&script)
        .env("P", "/usr/bin")
        .env("W", &work)
        .output()
        .expect("running the script on the host with busybox sh (scripts/install-deps.sh)");
    let host_text = String::from_utf8_lossy(&host.stdout).into_owned();
    let host_res = results(&host_text);
    assert!(
        host.status.success() && host_res.contains_key("done"),
        "host run failed: {}\n{host_text}",
        String::from_utf8_lossy(&host.stderr)
    );
    for (name, lines) in &host_res {
        assert!(
            !lines.iter().any(|l| l.starts_with("ERR ")),
            "{name} fails on the host: {lines:?}"
        );
    }

    // Guest run on the software CPU.
    let mut extra = CpioArchive::new();
    extra
        .add_file("test.sh", 0o755, SCRIPT.as_bytes())
        .expect("cpio");
    let initrd = dir.path().join("initrd.img");
    append_initramfs(&assets.initramfs, &extra.finish(), &initrd).expect("initramfs");
    let run = RqemuVm::new(&assets)
        .initrd(&initrd)
        .timeout(TIMEOUT)
        .run()
        .unwrap_or_else(|e| panic!("{e}"));
    let status = run.finished();
    let text = &run.console;
    let guest_res = results(text);
    let report = run.transcript();
    assert!(
        guest_res.contains_key("done"),
        "the guest script did not finish\n{report}"
    );

    // glibc in the guest must see x86-64-v2 (SSE3 to SSE4.2, POPCNT, CX16, LAHF) and
    // x86-64-v3 (AVX, AVX2, BMI1/2, FMA, F16C, LZCNT, MOVBE, OSXSAVE).
    let isa: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("ISA x86-64-v"))
        .collect();
    for level in ["x86-64-v2", "x86-64-v3"] {
        assert!(
            isa.iter()
                .any(|l| l.contains(&format!("{level} (supported, searched)"))),
            "glibc does not consider the software CPU {level}: {isa:?}\n{report}"
        );
    }
    eprintln!("tcg_programs: glibc-hwcaps in the guest: {isa:?}");

    let mut bad = Vec::new();
    for (name, want) in &host_res {
        let got = guest_res.get(name);
        if got == Some(want) {
            eprintln!("tcg_programs: {name}: matches the host ({})", want[0]);
        } else {
            bad.push(format!("{name}:\n  host  {want:?}\n  guest {got:?}"));
        }
    }
    assert!(
        bad.is_empty(),
        "programs differ from the host:\n{}\n{report}",
        bad.join("\n")
    );
    assert!(text.contains("RQEMU-EXIT=0"), "{report}");
    assert!(status.success(), "{report}");
    eprintln!(
        "tcg_programs: {} checks match the host; guest run {:.1} s",
        host_res.len() - 1,
        run.elapsed.as_secs_f64()
    );
}
