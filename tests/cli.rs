//! The `kvtier` command as a user runs it.

use std::process::{Command, Output};

/// The repository root: this test is built by the `kvtier-cli` package (apps/).
const REPO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

fn kvtier(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kvtier"))
        .args(args)
        .current_dir(REPO)
        .env_remove("KVTIER_CONFIG_FILE")
        .env_remove("LMCACHE_CONFIG_FILE")
        .env("KVTIER_LOG", "warn")
        .output()
        .expect("run kvtier")
}

/// The stdout of a run that must have exited with status 0 (its status, stdout and stderr
/// otherwise in the failure).
fn succeeded(out: &Output) -> String {
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "{}\n{stdout}\n{}",
        out.status,
        text(&out.stderr)
    );
    stdout
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn config_check_prints_every_reference_config() {
    let dir = std::path::Path::new(REPO).join("configs");
    let mut checked = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let out = kvtier(&["config", "check", path.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{}: {}",
            path.display(),
            text(&out.stderr)
        );
        let stdout = text(&out.stdout);
        assert!(
            stdout.contains("chunk_size: 256"),
            "{}: {stdout}",
            path.display()
        );
        checked += 1;
    }
    assert!(checked >= 10, "only {checked} configs found");
    let out = kvtier(&["config", "check", "configs/lmcache-1p1d-nixl-decoder.yaml"]);
    let stdout = text(&out.stdout);
    assert!(stdout.contains("pd_role: receiver"), "{stdout}");
    assert!(
        text(&out.stderr).contains("remote_serde"),
        "warning expected"
    );
}

#[test]
fn config_check_names_file_key_line_and_suggestion() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "chunk_size: 256\nmax_local_cpu_sise: 5\n").unwrap();
    let out = kvtier(&["config", "check", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    for needle in ["bad.yaml", ":2", "max_local_cpu_sise", "max_local_cpu_size"] {
        assert!(err.contains(needle), "missing `{needle}` in: {err}");
    }
    std::fs::write(&bad, "chunk_size: lots\n").unwrap();
    let out = kvtier(&["config", "check", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains("chunk_size") && err.contains("integer"),
        "{err}"
    );
}

#[test]
fn demo_runs_end_to_end() {
    let out = kvtier(&[
        "demo",
        "--prompts",
        "2",
        "--prefix-tokens",
        "512",
        "--suffix-tokens",
        "300",
    ]);
    let stdout = succeeded(&out);
    assert!(stdout.contains("SYNTHETIC"), "{stdout}");
    assert!(
        stdout.contains("all retrieved KV verified byte for byte"),
        "{stdout}"
    );
    assert!(stdout.contains("retrieve after restart"), "{stdout}");
}

#[test]
fn demo_pd_runs_the_1p1d_example_and_stops_every_process() {
    let out = kvtier(&[
        "demo",
        "pd",
        "--free-ports",
        "--requests",
        "2",
        "--input-len",
        "600",
        "--output-len",
        "4",
        "--layers",
        "2",
    ]);
    let stdout = succeeded(&out);
    assert_eq!(
        stdout.matches("decoder verified: true").count(),
        2,
        "{stdout}"
    );
    assert!(stdout.contains("Prefill node TTFT stats"), "{stdout}");
    for who in ["decoder", "prefiller", "proxy"] {
        assert!(
            stdout.contains(&format!("{who}: stopped (exit status: 0)")),
            "{stdout}"
        );
    }
}

#[test]
fn remote_store_commands_refuse_incomplete_settings_naming_what_is_missing() {
    let out = kvtier(&["store-node"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("--etcd"),
        "{}",
        text(&out.stderr)
    );
    let out = kvtier(&["master", "--listen", "127.0.0.1:0"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("--segment-size"),
        "{}",
        text(&out.stderr)
    );
    let out = kvtier(&["store-node", "--etcd", "127.0.0.1:2379"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("expected etcd://[user[:password]@]host:port"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn demo_pd_on_vllm_says_how_to_install_what_is_missing() {
    // A Python without the kvtier package: the demo explains what to install, and fails.
    let out = Command::new(env!("CARGO_BIN_EXE_kvtier"))
        .args(["demo", "pd", "--engine", "vllm", "--free-ports"])
        .env("KVTIER_PYTHON", "python3-that-does-not-exist")
        .output()
        .expect("kvtier runs");
    let err = text(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("KVTIER_PYTHON"), "{err}");
    assert!(err.contains("scripts/install-vllm.sh"), "{err}");
}

#[test]
fn bench_gpu_skips_cleanly_without_a_device_and_fails_when_one_is_required() {
    if std::path::Path::new("/dev/nvidiactl").exists() {
        eprintln!("a GPU is present: scripts/device-check.sh measures it");
        return;
    }
    let out = kvtier(&["bench", "gpu", "--size-mib", "1", "--iterations", "1"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(stdout.starts_with("SKIP: "), "{stdout}");
    let out = kvtier(&["bench", "gpu", "--require-device"]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("CUDA") || err.contains("cuda"), "{err}");
}

/// Starts `kvtier master` (embedded, 8 MiB segment) with `extra` flags; returns its
/// stderr after it printed `ready`, then stops it.
fn master_log(extra: &[&str]) -> String {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("master.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_kvtier"))
        .args(["master", "--segment-size", "8MiB"])
        .args(extra)
        .env_remove("KVTIER_TRANSPORT_AUTH_TOKEN")
        .env("KVTIER_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(line.starts_with("ready"), "{line}");
    std::fs::read_to_string(log).unwrap()
}

#[test]
fn listeners_stay_on_loopback_unless_told_and_warn_when_open_beyond_it() {
    let help = text(&kvtier(&["master", "--help"]).stdout);
    assert!(help.contains("[default: 127.0.0.1:50051]"), "{help}");
    let quiet = master_log(&["--listen", "127.0.0.1:0"]);
    assert!(!quiet.contains("beyond this host"), "{quiet}");
    // Every host, no secret: one warning naming what is exposed.
    let open = master_log(&["--listen", "0.0.0.0:0"]);
    assert!(
        open.contains("kvtier store master listens on 0.0.0.0:")
            && open.contains("without transport_auth_token")
            && open.contains("transport descriptors"),
        "{open}"
    );
    assert_eq!(
        open.matches("kvtier store master listens").count(),
        1,
        "{open}"
    );
    let guarded = master_log(&["--listen", "0.0.0.0:0", "--auth-token", "s3cret"]);
    assert!(!guarded.contains("beyond this host"), "{guarded}");
}

/// `kvtier bench remote` over NIXL ends with status 0 (it used to print its results and
/// then die of SIGSEGV in the NIXL wheel's exit handlers).
#[cfg(feature = "nixl")]
#[test]
fn bench_remote_over_nixl_exits_cleanly() {
    let out = kvtier(&[
        "bench",
        "remote",
        "--transports",
        "nixl",
        "--objects",
        "2",
        "--size",
        "1MiB",
        "--iterations",
        "1",
        "--redis",
        "none",
    ]);
    let stdout = succeeded(&out);
    assert!(stdout.contains("kvtier store (nixl)"), "{stdout}");
}

/// A process that sent and received P/D KV over NIXL (a prefiller and a decoder in one)
/// exits with status 0 after its results, as every NIXL user must (the wheel's bundled UCX
/// once crashed in its exit handlers).
#[cfg(feature = "nixl")]
#[test]
fn bench_pd_over_nixl_exits_cleanly() {
    let out = kvtier(&[
        "bench",
        "pd",
        "--transport",
        "nixl",
        "--input-len",
        "600",
        "--layers",
        "2",
        "--concurrency",
        "1",
        "--requests",
        "2",
        "--overlap-requests",
        "1",
        "--iterations",
        "1",
        "--decoder-buffer",
        "16MiB",
        "--prefiller-buffer",
        "4MiB",
    ]);
    let stdout = succeeded(&out);
    assert!(stdout.contains("P/D path over nixl"), "{stdout}");
}

/// `kvtier bench pd` on a small model: every level and the overlap run complete, the KV
/// checked at the receiver, and each goal's ratio printed beside its target.
#[test]
fn bench_pd_runs_every_level_and_prints_the_ratios() {
    let out = kvtier(&[
        "bench",
        "pd",
        "--input-len",
        "600",
        "--layers",
        "2",
        "--concurrency",
        "1,4",
        "--requests",
        "4",
        "--overlap-requests",
        "1",
        "--prefill-tokens-per-sec",
        "20000",
        "--iterations",
        "2",
        "--decoder-buffer",
        "16MiB",
        "--prefiller-buffer",
        "4MiB",
    ]);
    let stdout = succeeded(&out);
    for line in [
        "raw tcp write, same ranges",
        "raw tcp write beside two checksum",
        "concurrency   1: 4 requests",
        "concurrency   4: 4 requests",
        "transfer left after prefill ended",
    ] {
        assert!(stdout.contains(line), "missing `{line}`:\n{stdout}");
    }
    // Ratios only from plausible baselines; a loopback TCP baseline here always is.
    assert!(stdout.contains("x the raw transfer"), "{stdout}");
    // The ratio to the floor, or the floor refused: a few megabytes on a loaded machine can
    // time the write beside the checksums at under half the write alone.
    assert!(
        stdout.contains("x the raw write beside both checksum passes")
            || stdout.contains("the write beside the checksums is implausible"),
        "{stdout}"
    );
    assert!(
        stdout.contains("cost per byte at concurrency 4"),
        "{stdout}"
    );
}
