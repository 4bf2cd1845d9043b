//! `kvtier bench transfer` and its peer process `kvtier transfer-peer`.
//!
//! The bench starts a receiver process (`transfer-peer`) that registers a region and
//! prints its descriptor, writes the data into it through the chosen transport from this
//! process, reads it back, checks the bytes, and compares the throughput with a plain
//! memcpy and a raw loopback TCP stream between the same two processes, measured in the
//! same run.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use kvtier::config::TransferChannel;
use kvtier::transport::{self, HostBuffer, RemoteAccess, RemoteIov, TransportConfig};

/// Parses `1GiB`, `32MiB`, `4KiB`, `1GB`, `1000` (bytes).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size (e.g. 1GiB, 32MiB)"))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1u64,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        other => return Err(format!("unknown size unit `{other}` in `{s}`")),
    };
    Ok((n * mult as f64) as u64)
}

pub fn parse_channel(s: &str) -> Result<TransferChannel, String> {
    match s {
        "tcp" => Ok(TransferChannel::Tcp),
        "ucx" => Ok(TransferChannel::Ucx),
        "nixl" => Ok(TransferChannel::Nixl),
        other => Err(format!("unknown transport `{other}`: tcp, ucx or nixl")),
    }
}

/// Arguments of `kvtier transfer-peer` (started by the bench and the tests).
#[derive(Args)]
pub struct PeerArgs {
    /// Transport.
    #[arg(long, value_parser = parse_channel)]
    transport: Option<TransferChannel>,
    /// Serve a raw TCP sink instead of a transport endpoint.
    #[arg(long)]
    raw: bool,
    /// Bytes of the registered region.
    #[arg(long, value_parser = parse_size)]
    size: u64,
    /// Shared secret (transport_auth_token).
    #[arg(long)]
    auth_token: Option<String>,
    /// Transport timeout in seconds.
    #[arg(long, default_value_t = 30.0)]
    timeout_sec: f64,
}

/// Arguments of `kvtier bench transfer`.
#[derive(Args)]
pub struct BenchArgs {
    /// Transport: tcp, ucx or nixl.
    #[arg(long, value_parser = parse_channel, default_value = "tcp")]
    transport: TransferChannel,
    /// Bytes moved per iteration.
    #[arg(long, value_parser = parse_size, default_value = "960MiB")]
    size: u64,
    /// Bytes per chunk (one remote range each).
    #[arg(long, value_parser = parse_size, default_value = "32MiB")]
    chunk: u64,
    /// Timed iterations per measurement.
    #[arg(long, default_value_t = 5)]
    iterations: usize,
    /// Parallel streams of the raw socket (and iperf3) baseline, beside one stream.
    #[arg(long, default_value_t = 4)]
    streams: usize,
}

fn transport_config(timeout_sec: f64, auth_token: Option<String>) -> TransportConfig {
    TransportConfig {
        timeout: Duration::from_secs_f64(timeout_sec),
        auth_token,
        host: "127.0.0.1".into(),
    }
}

/// Runs the peer: prints `descriptor <hex>` (or `raw <port>`), then answers commands on
/// stdin (`digest OFFSET LEN`, `notify N`, `regions`) until stdin closes.
pub fn run_peer(args: PeerArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    if args.raw {
        return raw_sink(args.size as usize);
    }
    let region = Arc::new(HostBuffer::new(args.size as usize));
    let stdout = std::io::stdout();
    let channel = args.transport.context("--transport or --raw is required")?;
    let _guard = rt.enter();
    let t = transport::open(channel, transport_config(args.timeout_sec, args.auth_token))?;
    let reg = t.register(region.clone(), RemoteAccess::ReadWrite)?;
    let descriptor = t.local_descriptor()?;
    let hex: String = descriptor.iter().map(|b| format!("{b:02x}")).collect();
    writeln!(stdout.lock(), "descriptor {hex}")?;
    stdout.lock().flush()?;
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let words: Vec<&str> = line.split_whitespace().collect();
        let mut out = stdout.lock();
        match words.as_slice() {
            ["digest", off, len] => {
                let (off, len): (usize, usize) = (off.parse()?, len.parse()?);
                writeln!(out, "digest {:016x}", region.digest(off, len))?;
            }
            ["notify", n] => {
                for _ in 0..n.parse::<usize>()? {
                    let n = rt.block_on(t.recv_notification(Duration::from_secs(30)))?;
                    writeln!(out, "notify {}", String::from_utf8_lossy(&n.message))?;
                }
            }
            ["regions"] => writeln!(out, "regions {}", t.registered_regions())?,
            _ => writeln!(out, "error unknown command `{line}`")?,
        }
        out.flush()?;
    }
    drop(reg);
    Ok(())
}

/// A raw TCP sink: accepts connections (each on a thread of its own, so parallel streams
/// run in parallel) and reads each to EOF into a buffer of its own (wrapping around), then
/// answers with the byte count: the socket's own limit. Buffers are reused across
/// connections, so only the first iteration pays for faulting them.
fn raw_sink(size: usize) -> anyhow::Result<()> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    println!("raw {}", listener.local_addr()?.port());
    std::io::stdout().flush()?;
    let spare: Arc<std::sync::Mutex<Vec<kvtier::memory::KvBuffer>>> = Arc::default();
    let pool = Arc::new(kvtier::memory::BufferPool::new(0));
    let piece = size.clamp(1, 64 << 20);
    for stream in listener.incoming() {
        let mut s = stream?;
        let (spare, pool) = (spare.clone(), pool.clone());
        std::thread::spawn(move || -> std::io::Result<()> {
            // The same kind of memory the transports land bytes in (pre-faulted huge pages).
            let taken = spare.lock().expect("lock").pop();
            let mut region = taken.unwrap_or_else(|| pool.alloc(piece));
            let mut total = 0u64;
            loop {
                let at = (total as usize) % region.len();
                let n = s.read(&mut region[at..])?;
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
            spare.lock().expect("lock").push(region);
            s.write_all(&total.to_le_bytes())
        });
    }
    Ok(())
}

/// A peer process and its pipes.
pub struct Peer {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl Peer {
    /// Starts `kvtier transfer-peer` with `args`; returns it and its first output line.
    pub fn spawn(args: &[String]) -> anyhow::Result<(Peer, String)> {
        let exe = std::env::current_exe()?;
        let mut child = Command::new(exe)
            .arg("transfer-peer")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the peer process")?;
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().context("peer stdout")?);
        let mut peer = Peer {
            child,
            stdin,
            stdout,
        };
        let first = peer.line()?;
        Ok((peer, first))
    }

    fn line(&mut self) -> anyhow::Result<String> {
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            bail!("peer process exited early");
        }
        Ok(line.trim_end().to_string())
    }

    /// Sends a command and returns the answer line.
    pub fn ask(&mut self, command: &str) -> anyhow::Result<String> {
        let stdin = self.stdin.as_mut().context("peer stdin closed")?;
        writeln!(stdin, "{command}")?;
        stdin.flush()?;
        self.line()
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.stdin.take();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn unhex(s: &str) -> anyhow::Result<Vec<u8>> {
    if s.len() % 2 != 0 {
        bail!("odd-length hex");
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).context("bad hex"))
        .collect()
}

fn gib_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64().max(1e-9) / (1u64 << 30) as f64
}

/// Best and mean of `times`.
fn best_mean(times: &[Duration]) -> (Duration, Duration) {
    let best = times.iter().min().copied().unwrap_or_default();
    let mean = times.iter().sum::<Duration>() / times.len().max(1) as u32;
    (best, mean)
}

/// Best time of `iters` rounds of raw loopback TCP streams moving `size` bytes (written in
/// `chunk`s, split evenly over `streams` parallel connections) to a peer process: the
/// physical limit transports are compared with.
fn raw_socket_best(
    size: usize,
    chunk: usize,
    iters: usize,
    streams: usize,
) -> anyhow::Result<Duration> {
    let streams = streams.clamp(1, 64);
    let (mut raw_peer, first) = Peer::spawn(&["--raw".into(), "--size".into(), size.to_string()])?;
    let port: u16 = first
        .strip_prefix("raw ")
        .context("raw peer greeting")?
        .parse()?;
    let mut src = kvtier::memory::BufferPool::new(0).alloc(size);
    src.fill(3);
    let share = size.div_ceil(streams);
    let mut raw = Vec::new();
    // One untimed round first: connections' buffers at the sink are faulted in once.
    for i in 0..=iters {
        let t = Instant::now();
        let moved = std::thread::scope(|scope| {
            let handles: Vec<_> = src
                .chunks(share)
                .map(|part| {
                    scope.spawn(move || -> anyhow::Result<u64> {
                        let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
                        for piece in part.chunks(chunk) {
                            s.write_all(piece)?;
                        }
                        s.shutdown(std::net::Shutdown::Write)?;
                        let mut ack = [0u8; 8];
                        s.read_exact(&mut ack)?;
                        let got = u64::from_le_bytes(ack);
                        if got != part.len() as u64 {
                            bail!("raw sink received {got} of {} bytes", part.len());
                        }
                        Ok(got)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .map_err(|_| anyhow::anyhow!("raw stream thread panicked"))?
                })
                .sum::<anyhow::Result<u64>>()
        })?;
        let took = t.elapsed();
        if moved != size as u64 {
            bail!("raw streams moved {moved} of {size} bytes");
        }
        if i == 0 {
            continue;
        }
        raw.push(took);
        println!(
            "  raw socket ({streams} stream{}) iteration {i}/{iters}: {:.2} GiB/s",
            if streams == 1 { "" } else { "s" },
            gib_s(size as u64, took)
        );
    }
    drop(src);
    drop(raw_peer.stdin.take());
    let (raw_best, _) = best_mean(&raw);
    Ok(raw_best)
}

/// GiB/s of the best raw loopback TCP transfer to a peer process, over one stream or four
/// in parallel (see [`raw_socket_best`]).
pub fn raw_socket_gib_s(size: usize, chunk: usize, iters: usize) -> anyhow::Result<f64> {
    let one = raw_socket_best(size, chunk, iters, 1)?;
    let four = raw_socket_best(size, chunk, iters, 4)?;
    Ok(gib_s(size as u64, one.min(four)))
}

/// iperf3's loopback throughput moving `size` bytes with `streams` parallel streams, in
/// GiB/s, when `iperf3` is installed (`None` when it is not).
fn iperf3_gib_s(size: usize, streams: usize) -> anyhow::Result<Option<f64>> {
    if Command::new("iperf3").arg("--version").output().is_err() {
        return Ok(None);
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut server = Command::new("iperf3")
        .args(["-s", "-1", "-B", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting iperf3 -s")?;
    let mut out = None;
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(100));
        let run = Command::new("iperf3")
            .args(["-c", "127.0.0.1", "-p", &port.to_string(), "-J"])
            .args(["-n", &size.to_string(), "-P", &streams.to_string()])
            .output()?;
        if run.status.success() {
            out = Some(run.stdout);
            break;
        }
    }
    let _ = server.kill();
    let _ = server.wait();
    let Some(out) = out else {
        bail!("iperf3 -c could not reach its server on port {port}");
    };
    let v: serde_json::Value = serde_json::from_slice(&out).context("iperf3 -J output")?;
    let bits = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3 -J output has no end.sum_received.bits_per_second")?;
    Ok(Some(bits / 8.0 / (1u64 << 30) as f64))
}

/// Times of `iterations` (at least one) single-threaded copies of `bytes` bytes between two
/// buffers, both ends opaque to the optimiser so the copy cannot be elided as dead.
pub fn memcpy_times(bytes: usize, iterations: usize) -> Vec<Duration> {
    let a = vec![1u8; bytes];
    let mut b = vec![2u8; bytes];
    (0..iterations.max(1))
        .map(|_| {
            let t = Instant::now();
            std::hint::black_box(b.as_mut_slice()).copy_from_slice(std::hint::black_box(&a));
            std::hint::black_box(&mut b);
            t.elapsed()
        })
        .collect()
}

pub fn run_bench(args: BenchArgs) -> anyhow::Result<()> {
    let size = args.size as usize;
    let chunk = args.chunk as usize;
    if chunk == 0 || size == 0 || size % chunk != 0 {
        bail!("--size must be a non-zero multiple of --chunk");
    }
    let n = size / chunk;
    let iters = args.iterations.max(1);
    println!(
        "kvtier bench transfer: {} moving {} x {} MiB = {:.2} GiB between two processes, {iters} iterations",
        args.transport,
        n,
        chunk >> 20,
        size as f64 / (1u64 << 30) as f64
    );

    // memcpy, same bytes, this process.
    let memcpy = memcpy_times(size, iters);
    let (memcpy_best, _) = best_mean(&memcpy);
    println!(
        "  memcpy (1 thread)        : {:>6.2} GiB/s",
        gib_s(size as u64, memcpy_best)
    );

    // The socket's limit: one stream, and several in parallel (one stream is bound by one
    // core's copies; the transports may use more).
    let raw_one = raw_socket_best(size, chunk, iters, 1)?;
    let raw_many = raw_socket_best(size, chunk, iters, args.streams)?;
    let raw_best = raw_one.min(raw_many);
    let iperf = match iperf3_gib_s(size, args.streams) {
        Ok(g) => g,
        Err(e) => {
            println!("  iperf3: {e:#}");
            None
        }
    };

    // The transport.
    let rt = tokio::runtime::Runtime::new()?;
    let _guard = rt.enter();
    let (mut peer, first) = Peer::spawn(&[
        "--transport".into(),
        args.transport.to_string(),
        "--size".into(),
        size.to_string(),
    ])?;
    let descriptor = unhex(first.strip_prefix("descriptor ").context("peer greeting")?)?;
    let local = transport::open(args.transport, transport_config(60.0, None))?;
    let src = Arc::new(HostBuffer::new(size));
    src.fill_pattern(0x6b76);
    let back = Arc::new(HostBuffer::new(size));
    let src_reg = local.register(src.clone(), RemoteAccess::LocalOnly)?;
    let back_reg = local.register(back.clone(), RemoteAccess::LocalOnly)?;
    let conn = rt.block_on(local.connect(&descriptor))?;
    let remote_region = kvtier_transport::Descriptor::decode(&descriptor, local.kind())?
        .regions
        .first()
        .context("peer offers no region")?
        .id;
    // Scatter: chunk i goes to slot n-1-i, as KV pages land out of order.
    let remote: Vec<RemoteIov> = (0..n)
        .map(|i| RemoteIov {
            region: remote_region,
            offset: ((n - 1 - i) * chunk) as u64,
            len: chunk as u64,
        })
        .collect();
    let out_iov = (0..n)
        .map(|i| src_reg.iov(i * chunk, chunk))
        .collect::<Result<Vec<_>, _>>()?;
    let in_iov = (0..n)
        .map(|i| back_reg.iov(i * chunk, chunk))
        .collect::<Result<Vec<_>, _>>()?;
    let mut writes = Vec::new();
    for i in 0..iters {
        let t = Instant::now();
        rt.block_on(conn.write(&out_iov, &remote))?;
        writes.push(t.elapsed());
        println!(
            "  {} write iteration {}/{iters}: {:.2} GiB/s",
            args.transport,
            i + 1,
            gib_s(size as u64, writes[i])
        );
    }
    let mut reads = Vec::new();
    for i in 0..iters {
        let t = Instant::now();
        rt.block_on(conn.read(&in_iov, &remote))?;
        reads.push(t.elapsed());
        println!(
            "  {} read iteration {}/{iters}: {:.2} GiB/s",
            args.transport,
            i + 1,
            gib_s(size as u64, reads[i])
        );
    }
    // Verify: every chunk at its slot in the peer, and read back intact.
    for i in 0..n {
        let theirs = peer.ask(&format!("digest {} {chunk}", (n - 1 - i) * chunk))?;
        let ours = format!("digest {:016x}", src.digest(i * chunk, chunk));
        if theirs != ours {
            bail!("chunk {i}: peer holds {theirs}, sent {ours}");
        }
    }
    if back.digest(0, size) != src.digest(0, size) {
        bail!("bytes read back differ from bytes written");
    }
    println!("  verified: all {n} chunks byte-identical at the peer and read back");

    let (wb, wm) = best_mean(&writes);
    let (rb, rm) = best_mean(&reads);
    let memcpy_g = gib_s(size as u64, memcpy_best);
    let raw_g = gib_s(size as u64, raw_best);
    println!("\nsummary (GiB/s, best of {iters}; mean in brackets)");
    println!("  memcpy 1 thread   {memcpy_g:>7.2}");
    println!(
        "  raw TCP streams   {raw_g:>7.2}  (1 stream {:.2}, {} streams {:.2})",
        gib_s(size as u64, raw_one),
        args.streams,
        gib_s(size as u64, raw_many)
    );
    match iperf {
        Some(g) => println!(
            "  iperf3 -P {:<6} {g:>7.2}  (the peer tool, same bytes)",
            args.streams
        ),
        None => println!("  iperf3            not installed (apt-get install iperf3 to add it)"),
    }
    // One thread copies host memory at a few to some tens of GiB/s; outside a generous
    // band the baseline was mis-measured and a ratio to it would mean nothing.
    let memcpy_plausible = (0.5..=200.0).contains(&memcpy_g);
    if !memcpy_plausible {
        println!("  (memcpy baseline {memcpy_g:.2} GiB/s is implausible: no ratio to it)");
    }
    // The socket baseline is an upper bound only if no transport beat it.
    let fastest = gib_s(size as u64, wb.min(rb));
    let raw_plausible = raw_g >= fastest;
    if !raw_plausible {
        println!(
            "  (raw socket baseline {raw_g:.2} GiB/s is below the transport's {fastest:.2}: not a limit, no ratio to it)"
        );
    }
    for (what, best, mean) in [("write", wb, wm), ("read", rb, rm)] {
        let g = gib_s(size as u64, best);
        let of_memcpy = if memcpy_plausible {
            format!(", {:.0}% of memcpy", 100.0 * g / memcpy_g)
        } else {
            String::new()
        };
        let of_raw = if raw_plausible {
            format!("  = {:.0}% of raw socket", 100.0 * g / raw_g)
        } else {
            String::new()
        };
        println!(
            "  {:<4} {:<12} {g:>7.2} ({:.2}){of_raw}{of_memcpy}",
            args.transport.to_string(),
            what,
            gib_s(size as u64, mean),
        );
    }
    Ok(())
}
