//! The remote store as separate processes on 127.0.0.1, against a real etcd
//! (`etcd-server`) and a real `redis-server`: store nodes, two masters, engines
//! (`kvtier remote-probe`: an engine driven through stdin, with synthetic KV).
//!
//! Covered: put/get across engines, replicas on distinct nodes, `mooncakestore://` with
//! the reference `extra_config` keys, an engine contributing a segment, leader failover
//! with placement rebuilt from the nodes, killed nodes (their sole copies become misses,
//! never wrong bytes), etcd down and back (engines keep serving locally and reconnect),
//! eviction, reclaim of an unfinished put, embedded mode (no etcd) over every transport
//! built in, and the Redis tier.
//!
//! The test command installs etcd and redis-server; without them these tests fail, naming
//! what to install.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kvtier::remote::etcd::Etcd;

/// The repository root: this test is built by the `kvtier-cli` package (apps/).
const REPO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

/// Chunk of the probes' model (2 layers of Llama-3.1-8B): 2 MiB of KV per 256 tokens.
const LAYERS: &str = "2";
const ASK_TIMEOUT: Duration = Duration::from_secs(60);
/// etcd lease TTL of the test masters and nodes, in seconds: short, to keep failover
/// waits short, with room for a loaded CI machine.
const LEASE_TTL: &str = "3";

fn free_port() -> u16 {
    support::free_ports(1)[0]
}

fn need(program: &str, package: &str) -> PathBuf {
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = Path::new(dir).join(program);
        if p.is_file() {
            return p;
        }
    }
    panic!("`{program}` not found: install `{package}` (./scripts/test.sh does)");
}

/// A child process (killed on drop) whose stdout lines arrive on a channel; stderr is kept
/// in a file for failure messages.
struct Proc {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    log: PathBuf,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    fn spawn(name: &str, program: &Path, args: &[&str], dir: &Path) -> Proc {
        Proc::spawn_env(name, program, args, &[], dir)
    }

    fn spawn_env(
        name: &str,
        program: &Path,
        args: &[&str],
        envs: &[(&str, &str)],
        dir: &Path,
    ) -> Proc {
        let log = dir.join(format!("{name}.log"));
        let mut child = Command::new(program)
            .args(args)
            .envs(envs.iter().copied())
            .env("KVTIER_LOG", "info")
            .env_remove("KVTIER_CONFIG_FILE")
            .env_remove("LMCACHE_CONFIG_FILE")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        let (tx, lines) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Proc {
            name: name.to_string(),
            stdin: child.stdin.take(),
            child,
            lines,
            log,
        }
    }

    fn kvtier(name: &str, args: &[&str], dir: &Path) -> Proc {
        Proc::spawn(name, Path::new(env!("CARGO_BIN_EXE_kvtier")), args, dir)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn line(&mut self, timeout: Duration) -> String {
        match self.lines.recv_timeout(timeout) {
            Ok(l) => l,
            Err(_) => panic!(
                "{}: no output within {timeout:?}; its log:\n{}",
                self.name,
                self.log()
            ),
        }
    }

    /// The `ready ...` line's words after `ready`.
    fn ready(&mut self) -> Vec<String> {
        let line = self.line(Duration::from_secs(60));
        let rest = line
            .strip_prefix("ready")
            .unwrap_or_else(|| panic!("{}: expected `ready`, got `{line}`", self.name));
        rest.split_whitespace().map(str::to_owned).collect()
    }

    /// Sends one probe command; returns the answer after `ok ` (panics on `err`).
    fn ask(&mut self, command: &str) -> String {
        let stdin = self.stdin.as_mut().expect("stdin");
        writeln!(stdin, "{command}").unwrap();
        stdin.flush().unwrap();
        let line = self.line(ASK_TIMEOUT);
        match line.strip_prefix("ok") {
            Some(rest) => rest.trim().to_string(),
            None => panic!(
                "{}: `{command}` answered `{line}`; log:\n{}",
                self.name,
                self.log()
            ),
        }
    }

    /// Sends one probe command that must fail; returns the error after `err `.
    fn ask_err(&mut self, command: &str) -> String {
        let stdin = self.stdin.as_mut().expect("stdin");
        writeln!(stdin, "{command}").unwrap();
        stdin.flush().unwrap();
        let line = self.line(ASK_TIMEOUT);
        match line.strip_prefix("err") {
            Some(rest) => rest.trim().to_string(),
            None => panic!("{}: `{command}` should fail, answered `{line}`", self.name),
        }
    }

    /// Like [`Proc::ask`], but an `err` answer is `None` (for polling while the store is
    /// expected to be unavailable, e.g. during a failover).
    fn try_ask(&mut self, command: &str) -> Option<String> {
        let stdin = self.stdin.as_mut().expect("stdin");
        writeln!(stdin, "{command}").unwrap();
        stdin.flush().unwrap();
        let line = self.line(ASK_TIMEOUT);
        if line.starts_with("err") {
            return None;
        }
        Some(
            line.strip_prefix("ok")
                .unwrap_or_else(|| panic!("{}: `{command}` answered `{line}`", self.name))
                .trim()
                .to_string(),
        )
    }

    /// [`Proc::try_ask`] until it answers (a leader may be changing hands), at most 20 s.
    fn ask_store(&mut self, command: &str) -> String {
        let start = Instant::now();
        loop {
            if let Some(answer) = self.try_ask(command) {
                return answer;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "{}: `{command}` kept failing; log:\n{}",
                self.name,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// A `key=value` field of `try_ask(command)`.
    fn try_field(&mut self, command: &str, key: &str) -> Option<String> {
        let answer = self.try_ask(command)?;
        answer
            .split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{key}=")).map(str::to_owned))
    }

    /// A `key=value` field of `ask(command)`.
    fn field(&mut self, command: &str, key: &str) -> String {
        let answer = self.ask(command);
        answer
            .split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{key}=")).map(str::to_owned))
            .unwrap_or_else(|| panic!("`{command}` answered `{answer}`: no {key}"))
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends `signal` (SIGSTOP freezes the process with its sockets open, SIGCONT thaws it).
    fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on the pid of a child we own and have not reaped.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, signal) }, 0);
    }

    /// Stops the process as a user does — Ctrl+C (SIGINT) for a server, end of input for
    /// a probe — and returns how it exited (within 20 s, else a failure).
    fn stop(&mut self, interrupt: bool) -> std::process::ExitStatus {
        if interrupt {
            // SAFETY: kill(2) on the pid of a child we own and have not reaped.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        }
        drop(self.stdin.take());
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "{} did not stop; log:\n{}",
                self.name,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A real etcd on 127.0.0.1 with its data in `dir`.
struct EtcdServer {
    proc: Option<Proc>,
    client_port: u16,
    peer_port: u16,
    dir: PathBuf,
    /// Served over TLS with these certificates, client certificates required.
    tls: Option<TestCerts>,
}

/// A test CA and the certificates it signed, as PEM files (made with the openssl CLI).
struct TestCerts {
    ca: PathBuf,
    server: (PathBuf, PathBuf),
    client: (PathBuf, PathBuf),
}

/// Runs the openssl CLI in `dir`.
fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new(need("openssl", "openssl"))
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A self-signed CA named `name` in `dir` (`{name}.pem`, `{name}-key.pem`).
fn test_ca(dir: &Path, name: &str) -> PathBuf {
    let (cert, key) = (format!("{name}.pem"), format!("{name}-key.pem"));
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &cert,
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
        ],
    );
    dir.join(cert)
}

impl TestCerts {
    /// A CA, a server certificate for 127.0.0.1 and a client certificate, in `dir`.
    fn make(dir: &Path) -> TestCerts {
        let ca = test_ca(dir, "ca");
        let sign = |name: &str, ext: &str| {
            let (key, csr, cert) = (
                format!("{name}-key.pem"),
                format!("{name}.csr"),
                format!("{name}.pem"),
            );
            std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
            openssl(
                dir,
                &[
                    "req",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:prime256v1",
                    "-nodes",
                    "-keyout",
                    &key,
                    "-out",
                    &csr,
                    "-subj",
                    &format!("/CN={name}"),
                ],
            );
            openssl(
                dir,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &csr,
                    "-CA",
                    "ca.pem",
                    "-CAkey",
                    "ca-key.pem",
                    "-CAcreateserial",
                    "-out",
                    &cert,
                    "-days",
                    "2",
                    "-extfile",
                    &format!("{name}.ext"),
                ],
            );
            (dir.join(cert), dir.join(key))
        };
        TestCerts {
            ca,
            // etcd's JSON gateway presents the server certificate to etcd itself when
            // client certificates are required: it needs clientAuth too.
            server: sign(
                "server",
                "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n",
            ),
            client: sign("client", "extendedKeyUsage=clientAuth\n"),
        }
    }
}

impl EtcdServer {
    fn start(dir: &Path) -> EtcdServer {
        Self::start_with(dir, None)
    }

    fn start_with(dir: &Path, tls: Option<TestCerts>) -> EtcdServer {
        let mut e = EtcdServer {
            proc: None,
            client_port: free_port(),
            peer_port: free_port(),
            dir: dir.to_path_buf(),
            tls,
        };
        e.restart();
        e
    }

    fn restart(&mut self) {
        let etcd = need("etcd", "etcd-server");
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let client = format!("{scheme}://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let data = self.dir.join("etcd-data");
        let args = [
            "--name",
            "kvtier-test",
            "--data-dir",
            data.to_str().unwrap(),
            "--listen-client-urls",
            &client,
            "--advertise-client-urls",
            &client,
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
            "--initial-cluster",
            &format!("kvtier-test={peer}"),
            // Short-lived auth tokens (where a test turns authentication on): clients must
            // authenticate again when theirs expires.
            "--auth-token-ttl",
            "2",
        ];
        let mut args: Vec<&str> = args.to_vec();
        let tls_args;
        if let Some(t) = &self.tls {
            tls_args = [
                "--cert-file".to_string(),
                t.server.0.display().to_string(),
                "--key-file".to_string(),
                t.server.1.display().to_string(),
                "--trusted-ca-file".to_string(),
                t.ca.display().to_string(),
                "--client-cert-auth".to_string(),
            ];
            args.extend(tls_args.iter().map(String::as_str));
        }
        self.proc = Some(Proc::spawn("etcd", &etcd, &args, &self.dir));
        let deadline = Instant::now() + Duration::from_secs(30);
        let etcd = self.client("probe");
        let rt = tokio::runtime::Runtime::new().unwrap();
        while rt.block_on(etcd.get(&etcd.key("probe"))).is_err() {
            assert!(Instant::now() < deadline, "etcd did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    fn url(&self, cluster: &str) -> String {
        match &self.tls {
            None => format!("etcd://127.0.0.1:{}/{cluster}", self.client_port),
            Some(t) => format!(
                "etcds://127.0.0.1:{}/{cluster}?cacert={}&cert={}&key={}",
                self.client_port,
                t.ca.display(),
                t.client.0.display(),
                t.client.1.display()
            ),
        }
    }

    fn client(&self, cluster: &str) -> Etcd {
        Etcd::new(&self.url(cluster), Duration::from_secs(2)).unwrap()
    }

    /// The current leader's address.
    fn leader(&self, cluster: &str) -> Option<String> {
        let etcd = self.client(cluster);
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(etcd.get(&etcd.key("master")))
            .ok()
            .flatten()
            .map(|v| String::from_utf8(v).unwrap())
    }
}

fn node(name: &str, etcd: &str, size: &str, dir: &Path) -> Proc {
    let mut p = Proc::kvtier(
        name,
        &[
            "store-node",
            "--etcd",
            etcd,
            "--name",
            name,
            "--segment-size",
            size,
            "--lease-ttl",
            LEASE_TTL,
        ],
        dir,
    );
    p.ready();
    p
}

fn master(name: &str, etcd: &str, dir: &Path) -> (Proc, String) {
    let mut p = Proc::kvtier(
        name,
        &[
            "master",
            "--listen",
            "127.0.0.1:0",
            "--etcd",
            etcd,
            "--lease-ttl",
            LEASE_TTL,
        ],
        dir,
    );
    let addr = p.ready().remove(0);
    (p, addr)
}

fn probe(name: &str, yaml: &str, dir: &Path) -> Proc {
    let config = dir.join(format!("{name}.yaml"));
    std::fs::write(&config, yaml).unwrap();
    let mut p = Proc::kvtier(
        name,
        &[
            "remote-probe",
            "--config",
            config.to_str().unwrap(),
            "--layers",
            LAYERS,
        ],
        dir,
    );
    p.ready();
    p
}

/// Polls `f` every 100 ms until it is true; returns how long that took.
fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    start.elapsed()
}

fn retrieve(p: &mut Proc, seed: u64, tokens: usize) -> usize {
    let answer = p.ask(&format!("retrieve {seed} {tokens}"));
    assert!(
        answer.contains("verified=true"),
        "{}: wrong bytes: {answer}",
        p.name
    );
    answer
        .split_whitespace()
        .find_map(|w| w.strip_prefix("tokens="))
        .unwrap()
        .parse()
        .unwrap()
}

fn kvtier_engine_yaml(master: &str, etcd: &str, replicas: u32) -> String {
    format!(
        "chunk_size: 256\nlocal_cpu: true\nmax_local_cpu_size: 1\nremote_url: kvtier://{master}\n\
         extra_config:\n  metadata_server: {etcd}\n  replica_num: {replicas}\n  \
         local_buffer_size: 33554432\n  transfer_timeout: 3\n"
    )
}

#[test]
fn cluster_replicas_failover_and_killed_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let etcd = EtcdServer::start(dir);
    let url = etcd.url("c1");
    let mut nodes: Vec<Proc> = ["n1", "n2", "n3"]
        .iter()
        .map(|n| node(n, &url, "64MiB", dir))
        .collect();
    let (m1, a1) = master("m1", &url, dir);
    let (m2, a2) = master("m2", &url, dir);
    let mut masters = [(m1, a1.clone()), (m2, a2)];
    // Engine A: kvtier:// naming one master (etcd finds the leader). Engine B: the
    // reference Mooncake keys, and it contributes a segment of its own.
    let mut a = probe("engine-a", &kvtier_engine_yaml(&a1, &url, 2), dir);
    let mut b = probe(
        "engine-b",
        &format!(
            "chunk_size: 256\nlocal_device: \"cpu\"\nremote_url: \"mooncakestore://{a1}/\"\n\
             remote_serde: \"naive\"\nlocal_cpu: true\nmax_local_cpu_size: 1\nextra_config:\n  \
             local_hostname: \"127.0.0.1\"\n  metadata_server: \"{url}\"\n  protocol: \"tcp\"\n  \
             device_name: \"\"\n  master_server_address: \"{a1}\"\n  \
             global_segment_size: 16777216\n  local_buffer_size: 33554432\n  \
             transfer_timeout: 3\n  replica_num: 2\n"
        ),
        dir,
    );
    wait_for("four segments in the pool", Duration::from_secs(30), || {
        b.try_field("stats", "segments").as_deref() == Some("4")
    });

    // Put on A, get on B (B has none of it locally).
    assert_eq!(a.field("store 11 1024", "stored"), "1024");
    a.ask("flush");
    assert_eq!(b.field("lookup 11 1024", "hit"), "1024");
    assert_eq!(retrieve(&mut b, 11, 1024), 1024);
    assert_eq!(b.field("lookup 11 1100", "hit"), "1024");
    // Two replicas per chunk, on distinct nodes.
    for replicas in a.ask_store("locate 11 1024").split_whitespace() {
        let names: Vec<&str> = replicas.split(',').collect();
        assert_eq!(names.len(), 2, "{replicas}");
        assert_ne!(names[0], names[1]);
    }

    // Kill the leader: the standby takes over and rebuilds placement from the nodes.
    let leader = etcd.leader("c1").expect("a leader is published");
    let i = masters
        .iter()
        .position(|(_, addr)| *addr == leader)
        .unwrap();
    let killed = Instant::now();
    masters[i].0.kill();
    let standby = masters[1 - i].1.clone();
    wait_for(
        "the standby takes over",
        Duration::from_secs(3 + 10),
        || etcd.leader("c1").as_deref() == Some(standby.as_str()),
    );
    wait_for("the new leader serves", Duration::from_secs(10), || {
        b.try_ask("stats")
            .is_some_and(|s| s.contains("segments=4") && !s.contains("objects=0 "))
    });
    let failover = killed.elapsed();
    eprintln!(
        "failover: leader killed -> standby serving in {failover:.2?} (lease TTL {LEASE_TTL} s)"
    );
    b.ask("clear");
    assert_eq!(retrieve(&mut b, 11, 1024), 1024, "objects survive failover");
    // Writes work through the new leader.
    assert_eq!(a.field("store 12 512", "stored"), "512");
    a.ask("flush");
    assert_eq!(retrieve(&mut b, 12, 512), 512);

    // A fresh prompt, then kill two of the three store nodes.
    assert_eq!(a.field("store 33 2048", "stored"), "2048");
    a.ask("flush");
    let places: Vec<Vec<String>> = a
        .ask_store("locate 33 2048")
        .split_whitespace()
        .map(|r| r.split(',').map(str::to_owned).collect())
        .collect();
    assert_eq!(places.len(), 8);
    nodes[0].kill();
    // Every chunk still has a live copy: reads fall back to it.
    b.ask("clear");
    assert_eq!(retrieve(&mut b, 33, 2048), 2048);
    nodes[1].kill();
    // Engine B's own segment is named after its `local_hostname`.
    let alive = |p: &Vec<String>| p.iter().any(|n| n == "n3" || n == "127.0.0.1");
    let expected = places.iter().take_while(|p| alive(p)).count() * 256;
    let dead_only = places.iter().filter(|p| !alive(p)).count() as u64;
    // Before the master notices, reads of dead copies fail over or miss: never wrong.
    b.ask("clear");
    assert_eq!(retrieve(&mut b, 33, 2048), expected);
    wait_for(
        "the master drops the dead nodes",
        Duration::from_secs(15),
        || b.try_field("stats", "segments").as_deref() == Some("2"),
    );
    b.ask("clear");
    assert_eq!(retrieve(&mut b, 33, 2048), expected);
    assert_eq!(b.field("lookup 33 2048", "hit"), expected.to_string());
    let stats = b.ask_store("stats");
    let lost: u64 = stats
        .split_whitespace()
        .find_map(|w| w.strip_prefix("lost="))
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        lost >= dead_only,
        "lost={lost}, chunks only on dead nodes {dead_only}"
    );
}

#[test]
fn frozen_master_and_node_are_passed_by_within_the_lease() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let etcd = EtcdServer::start(dir);
    let url = etcd.url("c4");
    let nodes: Vec<Proc> = ["f1", "f2"]
        .iter()
        .map(|n| node(n, &url, "32MiB", dir))
        .collect();
    let (m1, a1) = master("fm1", &url, dir);
    let (m2, a2) = master("fm2", &url, dir);
    let masters = [(m1, a1.clone()), (m2, a2)];
    let mut a = probe("engine-a", &kvtier_engine_yaml(&a1, &url, 2), dir);
    let mut b = probe("engine-b", &kvtier_engine_yaml(&a1, &url, 2), dir);
    wait_for("two segments in the pool", Duration::from_secs(30), || {
        b.try_field("stats", "segments").as_deref() == Some("2")
    });
    assert_eq!(a.field("store 41 1024", "stored"), "1024");
    a.ask("flush");
    assert_eq!(b.field("lookup 41 1024", "hit"), "1024");
    // Both engines now hold a connection to the leader.

    // Freeze the leader (SIGSTOP: its sockets stay open, nothing answers).
    let leader = etcd.leader("c4").expect("a leader is published");
    let i = masters
        .iter()
        .position(|(_, addr)| *addr == leader)
        .unwrap();
    let standby = masters[1 - i].1.clone();
    let frozen = Instant::now();
    masters[i].0.signal(libc::SIGSTOP);
    // The lease TTL + 5 s, with room for a loaded CI machine.
    let bound = Duration::from_secs(3 + 5 + 5);
    wait_for("the standby leads", bound, || {
        etcd.leader("c4").as_deref() == Some(standby.as_str())
    });
    wait_for("engine B reaches the new leader", bound, || {
        b.try_field("stats", "segments").as_deref() == Some("2")
    });
    let moved = frozen.elapsed();
    b.ask("clear");
    assert_eq!(
        retrieve(&mut b, 41, 1024),
        1024,
        "objects survive the freeze"
    );
    assert_eq!(a.field("store 42 512", "stored"), "512");
    a.ask("flush");
    assert_eq!(retrieve(&mut b, 42, 512), 512);
    eprintln!("frozen leader: engines on the standby after {moved:.2?} (lease TTL {LEASE_TTL} s)");
    // Thawed, the old leader knows its term is over: it does not act as leader.
    masters[i].0.signal(libc::SIGCONT);
    assert_eq!(etcd.leader("c4").as_deref(), Some(standby.as_str()));

    // Freeze a node: reads fall back to the other replica, and the master drops it when
    // its lease expires.
    let frozen = Instant::now();
    nodes[0].signal(libc::SIGSTOP);
    b.ask("clear");
    assert_eq!(
        retrieve(&mut b, 41, 1024),
        1024,
        "read from the live replica"
    );
    wait_for("the master drops the frozen node", bound, || {
        b.try_field("stats", "segments").as_deref() == Some("1")
    });
    eprintln!(
        "frozen node: dropped from the pool after {:.2?}",
        frozen.elapsed()
    );
    b.ask("clear");
    assert_eq!(retrieve(&mut b, 41, 1024), 1024);
    nodes[0].signal(libc::SIGCONT);
}

/// Turns on etcd's authentication: user `root` (needed to enable it) and user `kv`
/// (password `kvpw`) with read-write access to kvtier's keys only.
fn enable_etcd_auth(client_port: u16) {
    use base64_for_test::b64;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{client_port}/v3/auth");
    let calls = [
        ("role/add", serde_json::json!({"name": "root"})),
        (
            "user/add",
            serde_json::json!({"name": "root", "password": "rootpw"}),
        ),
        (
            "user/grant",
            serde_json::json!({"user": "root", "role": "root"}),
        ),
        ("role/add", serde_json::json!({"name": "kvtier"})),
        (
            "role/grant",
            serde_json::json!({"name": "kvtier", "perm": {
                "permType": "READWRITE", "key": b64(b"/kvtier/"), "range_end": b64(b"/kvtier0")}}),
        ),
        (
            "user/add",
            serde_json::json!({"name": "kv", "password": "kvpw"}),
        ),
        (
            "user/grant",
            serde_json::json!({"user": "kv", "role": "kvtier"}),
        ),
        ("enable", serde_json::json!({})),
    ];
    for (path, body) in calls {
        let resp = rt
            .block_on(http.post(format!("{base}/{path}")).json(&body).send())
            .unwrap();
        let status = resp.status();
        let text = rt.block_on(resp.text()).unwrap();
        assert!(status.is_success(), "etcd auth/{path}: {status}: {text}");
    }
}

/// Base64 for etcd's JSON gateway (test side, written out so the test does not lean on
/// the code under test).
mod base64_for_test {
    pub fn b64(data: &[u8]) -> String {
        const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for c in data.chunks(3) {
            let n = (c[0] as u32) << 16
                | (*c.get(1).unwrap_or(&0) as u32) << 8
                | *c.get(2).unwrap_or(&0) as u32;
            for i in 0..4 {
                out.push(if i <= c.len() {
                    T[(n >> (18 - 6 * i) & 63) as usize] as char
                } else {
                    '='
                });
            }
        }
        out
    }
}

#[test]
fn etcd_with_authentication_serves_only_who_has_the_password() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let etcd = EtcdServer::start(dir);
    enable_etcd_auth(etcd.client_port);
    let with_user = format!("etcd://kv:kvpw@127.0.0.1:{}/c6", etcd.client_port);
    let _n = node("a1", &with_user, "16MiB", dir);
    // The password from the environment, the user from the URL.
    let user_only = format!("etcd://kv@127.0.0.1:{}/c6", etcd.client_port);
    let args = ["master", "--listen", "127.0.0.1:0", "--etcd", &user_only];
    let kvtier = Path::new(env!("CARGO_BIN_EXE_kvtier"));
    let mut m = Proc::spawn_env(
        "am1",
        kvtier,
        &args,
        &[("KVTIER_ETCD_PASSWORD", "kvpw")],
        dir,
    );
    let addr = m.ready().remove(0);
    let mut engine = probe("engine", &kvtier_engine_yaml(&addr, &with_user, 1), dir);
    wait_for("the node joins", Duration::from_secs(30), || {
        engine.try_field("stats", "segments").as_deref() == Some("1")
    });
    assert_eq!(engine.field("store 51 512", "stored"), "512");
    engine.ask("flush");
    engine.ask("clear");
    assert_eq!(retrieve(&mut engine, 51, 512), 512);
    // The password never shows in the logs.
    assert!(!engine.log().contains("kvpw"), "{}", engine.log());

    // Without credentials, or with a wrong password, etcd refuses: the error says why.
    let anonymous = format!("etcd://127.0.0.1:{}/c6", etcd.client_port);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let e = Etcd::new(&anonymous, Duration::from_secs(5)).unwrap();
    let err = rt.block_on(e.list("segments/")).unwrap_err().to_string();
    assert!(err.contains("authentication is on"), "{err}");
    let wrong = format!("etcd://kv:nope@127.0.0.1:{}/c6", etcd.client_port);
    let e = Etcd::new(&wrong, Duration::from_secs(5)).unwrap();
    let err = rt.block_on(e.list("segments/")).unwrap_err().to_string();
    assert!(err.contains("etcd refused user `kv`"), "{err}");
    assert!(!err.contains("nope"), "{err}");
    // Right user, right password: it sees the node's registration, and again after its
    // token expired (etcd runs with --auth-token-ttl 2).
    let e = Etcd::new(&with_user, Duration::from_secs(5)).unwrap();
    assert_eq!(rt.block_on(e.list("segments/")).unwrap().len(), 1);
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(rt.block_on(e.list("segments/")).unwrap().len(), 1);
    // The cluster kept working past many token lifetimes.
    engine.ask("clear");
    assert_eq!(retrieve(&mut engine, 51, 512), 512);
}

#[test]
fn etcd_over_tls_with_client_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let certs = TestCerts::make(dir);
    let (ca, client) = (certs.ca.clone(), certs.client.clone());
    let etcd = EtcdServer::start_with(dir, Some(certs));
    let url = etcd.url("c7");
    // A node, a master and an engine keep membership and leadership in etcd over TLS.
    let _n = node("t1", &url, "16MiB", dir);
    let (_m, addr) = master("tm1", &url, dir);
    let mut engine = probe("engine", &kvtier_engine_yaml(&addr, &url, 1), dir);
    wait_for("the node joins", Duration::from_secs(30), || {
        engine.try_field("stats", "segments").as_deref() == Some("1")
    });
    assert_eq!(engine.field("store 61 512", "stored"), "512");
    engine.ask("flush");
    engine.ask("clear");
    assert_eq!(retrieve(&mut engine, 61, 512), 512);

    // Refused, each with the reason: no client certificate, plain text to the TLS port,
    // and a server certificate that the trusted CA did not sign.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let port = etcd.client_port;
    let list = |url: &str| {
        let e = Etcd::new(url, Duration::from_secs(5)).unwrap();
        rt.block_on(e.list("segments/"))
    };
    assert_eq!(list(&url).unwrap().len(), 1);
    let no_cert = format!("etcds://127.0.0.1:{port}/c7?cacert={}", ca.display());
    let err = list(&no_cert).unwrap_err().to_string();
    assert!(
        err.contains(&format!("https://127.0.0.1:{port}")) && err.contains("bad certificate"),
        "{err}"
    );
    let plain = format!("etcd://127.0.0.1:{port}/c7");
    assert!(list(&plain).is_err());
    let other_ca = test_ca(dir, "other-ca");
    let wrong_ca = format!(
        "etcds://127.0.0.1:{port}/c7?cacert={}&cert={}&key={}",
        other_ca.display(),
        client.0.display(),
        client.1.display()
    );
    let err = list(&wrong_ca).unwrap_err().to_string();
    assert!(err.contains("certificate verify failed"), "{err}");
    // Misconfigurations are named before anything is sent.
    for (url, says) in [
        (
            format!("etcds://127.0.0.1:{port}/c7?cert={}", client.0.display()),
            "`cert` and `key` go together",
        ),
        (
            format!("etcd://127.0.0.1:{port}/c7?cacert={}", ca.display()),
            "use etcds://",
        ),
        (
            format!("etcds://127.0.0.1:{port}/c7?cafile=x"),
            "unknown query parameter `cafile`",
        ),
        (
            format!("etcds://127.0.0.1:{port}/c7?cacert=/nonexistent/ca.pem"),
            "cacert=/nonexistent/ca.pem",
        ),
    ] {
        let err = Etcd::new(&url, Duration::from_secs(5))
            .unwrap_err()
            .to_string();
        assert!(err.contains(says), "{url}: {err}");
    }
}

#[test]
fn etcd_outage_engines_serve_locally_and_reconnect() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let mut etcd = EtcdServer::start(dir);
    let url = etcd.url("c2");
    // This node takes its settings from the Mooncake keys of an LMCache config file.
    let node_yaml = dir.join("node.yaml");
    std::fs::write(
        &node_yaml,
        format!(
            "extra_config:\n  local_hostname: \"127.0.0.1\"\n  metadata_server: \"{url}\"\n  \
             protocol: \"tcp\"\n  global_segment_size: 67108864\n"
        ),
    )
    .unwrap();
    let mut n = Proc::kvtier(
        "n1",
        &[
            "store-node",
            "--config",
            node_yaml.to_str().unwrap(),
            "--lease-ttl",
            LEASE_TTL,
        ],
        dir,
    );
    assert_eq!(n.ready()[0], "127.0.0.1", "named after local_hostname");
    let (m, addr) = master("m1", &url, dir);
    let mut a = probe("engine-a", &kvtier_engine_yaml(&addr, &url, 1), dir);
    let mut b = probe("engine-b", &kvtier_engine_yaml(&addr, &url, 1), dir);
    wait_for("the node joins", Duration::from_secs(30), || {
        a.try_field("stats", "segments").as_deref() == Some("1")
    });
    a.ask("store 44 512");
    a.ask("flush");
    assert_eq!(retrieve(&mut b, 44, 512), 512);

    etcd.stop();
    // Past the leader lease: the master has stepped down.
    std::thread::sleep(Duration::from_secs(4));
    // A keeps serving what it holds locally and stores new prompts locally.
    assert_eq!(a.field("lookup 44 512", "hit"), "512");
    assert_eq!(retrieve(&mut a, 44, 512), 512);
    assert_eq!(a.field("store 45 512", "stored"), "512");
    a.ask("flush");
    assert_eq!(retrieve(&mut a, 45, 512), 512);
    // B has nothing local: a miss, answered, not a hang or an error.
    assert_eq!(b.field("lookup 45 512", "hit"), "0");
    assert_eq!(retrieve(&mut b, 45, 512), 0);

    etcd.restart();
    // B's own tiers hold 44 since it read it: clear them so only the store can answer.
    let start = Instant::now();
    loop {
        b.ask("clear");
        if b.field("lookup 44 512", "hit") == "512" {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the store is not back after 30 s; etcd log:\n{}\nmaster log:\n{}\nnode log:\n{}\nengine log:\n{}",
            etcd.proc.as_ref().unwrap().log(),
            m.log(),
            n.log(),
            b.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let took = start.elapsed();
    eprintln!("etcd back -> remote tier serving again in {took:.2?}");
    assert_eq!(retrieve(&mut b, 44, 512), 512);
    a.ask("store 46 768");
    a.ask("flush");
    assert_eq!(retrieve(&mut b, 46, 768), 768);
}

fn embedded_master(
    name: &str,
    protocol: &str,
    size: &str,
    dir: &Path,
    extra: &[&str],
) -> (Proc, String) {
    let mut args = vec![
        "master",
        "--listen",
        "127.0.0.1:0",
        "--segment-size",
        size,
        "--protocol",
        protocol,
    ];
    args.extend_from_slice(extra);
    let mut p = Proc::kvtier(name, &args, dir);
    let addr = p.ready().remove(0);
    (p, addr)
}

fn embedded_engine_yaml(master: &str, protocol: &str) -> String {
    format!(
        "chunk_size: 256\nlocal_cpu: true\nmax_local_cpu_size: 1\nremote_url: kvtier://{master}\n\
         extra_config:\n  protocol: {protocol}\n  local_buffer_size: 33554432\n  transfer_timeout: 5\n"
    )
}

#[test]
fn eviction_and_reclaim_without_etcd() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    // Room for five 2 MiB chunks; short put timeout and read lease.
    let (_m, addr) = embedded_master(
        "master",
        "tcp",
        "10MiB",
        dir,
        &["--put-timeout", "1", "--read-lease", "1"],
    );
    let mut a = probe("engine-a", &embedded_engine_yaml(&addr, "tcp"), dir);
    let mut b = probe("engine-b", &embedded_engine_yaml(&addr, "tcp"), dir);
    for seed in 1..=4 {
        a.ask(&format!("store {seed} 512"));
        a.ask("flush");
    }
    let evicted: u64 = a.field("stats", "evicted").parse().unwrap();
    assert!(evicted >= 3, "evicted {evicted}");
    // The newest prompt is there, the oldest is gone; nothing wrong is ever read.
    assert_eq!(retrieve(&mut b, 4, 512), 512);
    assert_eq!(b.field("lookup 1 512", "hit"), "0");
    assert_eq!(retrieve(&mut b, 1, 512), 0);

    // A client that dies between PutStart and PutEnd: its room comes back.
    let used_before: u64 = a.field("stats", "used").parse().unwrap();
    a.ask("put-start-only 1048576");
    assert_eq!(a.field("stats", "pending"), "1");
    assert!(a.field("stats", "used").parse::<u64>().unwrap() > used_before);
    wait_for(
        "the unfinished put is reclaimed",
        Duration::from_secs(10),
        || a.field("stats", "pending") == "0",
    );
    assert_eq!(a.field("stats", "reclaimed"), "1");
    assert_eq!(
        a.field("stats", "used").parse::<u64>().unwrap(),
        used_before
    );
}

fn embedded_round_trip(protocol: &str) {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let (mut master, addr) = embedded_master("master", protocol, "64MiB", dir, &[]);
    let mut a = probe("engine-a", &embedded_engine_yaml(&addr, protocol), dir);
    let mut b = probe("engine-b", &embedded_engine_yaml(&addr, protocol), dir);
    a.ask("store 7 1280");
    a.ask("flush");
    assert_eq!(retrieve(&mut b, 7, 1280), 1280);
    assert_eq!(b.field("remove 7 1280", "removed"), "5");
    b.ask("clear");
    assert_eq!(b.field("lookup 7 1280", "hit"), "0");
    // Every process that used the transport exits cleanly (the NIXL wheel's UCX used to
    // crash every one of them in its exit handlers: status 139).
    for (p, interrupt) in [(&mut a, false), (&mut b, false), (&mut master, true)] {
        let status = p.stop(interrupt);
        assert!(
            status.success(),
            "{} ({protocol}): {status}; log:\n{}",
            p.name,
            p.log()
        );
    }
}

#[test]
fn embedded_master_over_tcp() {
    embedded_round_trip("tcp");
}

#[cfg(feature = "ucx")]
#[test]
fn embedded_master_over_ucx() {
    embedded_round_trip("ucx");
}

#[cfg(feature = "nixl")]
#[test]
fn embedded_master_over_nixl() {
    embedded_round_trip("nixl");
}

#[test]
fn in_engine_store_without_any_server() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    // No local CPU tier: the in-process store is the only tier.
    let mut a = probe(
        "engine",
        "chunk_size: 256\nlocal_cpu: false\nremote_url: kvtier://local\n\
         extra_config:\n  global_segment_size: 33554432\n  local_buffer_size: 16777216\n",
        dir,
    );
    assert_eq!(a.field("store 5 1024", "stored"), "1024");
    assert_eq!(a.field("lookup 5 1024", "hit"), "1024");
    assert_eq!(retrieve(&mut a, 5, 1024), 1024);
}

/// Mooncake's own master (`mooncake_master` from the `mooncake-transfer-engine` wheel):
/// `KVTIER_MOONCAKE_MASTER`, else the wheel in `target/py` where the test command installs
/// it. Missing, the test fails saying how to install it (as for etcd).
fn mooncake_master() -> PathBuf {
    if let Some(p) = std::env::var_os("KVTIER_MOONCAKE_MASTER").map(PathBuf::from) {
        assert!(
            p.is_file(),
            "KVTIER_MOONCAKE_MASTER={} is not a file",
            p.display()
        );
        return p;
    }
    let lib = Path::new(REPO).join("target/py/lib");
    let found = std::fs::read_dir(&lib).ok().and_then(|dirs| {
        dirs.flatten()
            .map(|d| d.path().join("site-packages/mooncake/mooncake_master"))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "mooncake_master not found: install the mooncake-transfer-engine wheel into \
             target/py (./scripts/test.sh does) or set KVTIER_MOONCAKE_MASTER"
        )
    })
}

fn mooncake_probe_yaml(addr: &str) -> String {
    format!(
        "chunk_size: 256\nlocal_cpu: false\nremote_url: \"mooncakestore://{addr}/\"\n\
         extra_config:\n  master_server_address: \"{addr}\"\n  protocol: \"tcp\"\n  \
         local_hostname: \"127.0.0.1\"\n  transfer_timeout: 3\n"
    )
}

#[test]
fn a_store_url_that_names_something_else_says_what_is_there() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    // Mooncake's own master where the reference config expects one: kvtier's engine must
    // say that `kvtier master` serves this URL, not hang or print a protocol error.
    let program = mooncake_master();
    let port = free_port();
    let metrics = free_port();
    let mut mc = Proc::spawn(
        "mooncake_master",
        &program,
        &[
            &format!("--rpc_port={port}"),
            "--rpc_address=127.0.0.1",
            &format!("--metrics_port={metrics}"),
            "--metrics_host=127.0.0.1",
            "--enable_http_metadata_server=false",
        ],
        dir,
    );
    wait_for("mooncake_master listens", Duration::from_secs(20), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let addr = format!("127.0.0.1:{port}");
    let mut engine = probe("engine", &mooncake_probe_yaml(&addr), dir);
    let err = engine.ask_err("stats");
    assert!(
        err.contains(&format!("{addr} is not a kvtier store master")),
        "{err}"
    );
    assert!(err.contains("start `kvtier master` there"), "{err}");
    assert!(err.contains("mooncake_master"), "{err}");
    // A store that fails is a miss, never a hang: lookups answer.
    assert_eq!(engine.field("lookup 1 512", "hit"), "0");
    assert!(
        mc.child.try_wait().unwrap().is_none(),
        "mooncake_master died"
    );

    // An HTTP server there (say, a vLLM or the proxy).
    let http = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = http.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        use std::io::Read;
        for mut s in http.incoming().flatten() {
            let mut b = [0u8; 64];
            let _ = s.read(&mut b);
            let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n");
        }
    });
    let mut engine = probe("engine-http", &mooncake_probe_yaml(&addr), dir);
    let err = engine.ask_err("stats");
    assert!(err.contains("like an HTTP server"), "{err}");
    assert!(err.contains("`kvtier master`"), "{err}");

    // Control: the same engine settings against `kvtier master` work.
    let (_m, master_addr) = embedded_master("master", "tcp", "8MiB", dir, &[]);
    let mut engine = probe("engine-ok", &embedded_engine_yaml(&master_addr, "tcp"), dir);
    assert_eq!(engine.field("stats", "segments"), "1");
}

#[test]
fn redis_tier_shares_kv_between_engines() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let port = free_port();
    let redis = need("redis-server", "redis-server");
    let _server = Proc::spawn(
        "redis",
        &redis,
        &[
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        dir,
    );
    wait_for("redis-server starts", Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let yaml = format!(
        "chunk_size: 256\nlocal_cpu: true\nmax_local_cpu_size: 1\nremote_url: redis://127.0.0.1:{port}\n"
    );
    let mut a = probe("engine-a", &yaml, dir);
    let mut b = probe("engine-b", &yaml, dir);
    a.ask("store 9 1024");
    a.ask("flush");
    assert_eq!(b.field("lookup 9 1024", "hit"), "1024");
    assert_eq!(retrieve(&mut b, 9, 1024), 1024);
    assert_eq!(b.field("remove 9 1024", "removed"), "4");
    b.ask("clear");
    assert_eq!(b.field("lookup 9 1024", "hit"), "0");
}
