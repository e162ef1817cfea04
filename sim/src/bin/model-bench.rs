//! `model-bench matrix|overhead|prefix|replicas [options]`: the benchmarks behind `make bench`,
//! `make bench-overhead`, `make bench-prefix` and `make bench-replicas`. Starts every process
//! it needs on loopback (simulated servers or a fast backend, Envoy, the load tool or wrk) and
//! stops them all, also when it fails. The arithmetic and the reports live in
//! `model_sim::bench`; this file only runs processes and measures them.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use model_sim::bench::envoy::{
    backend_split, fast_backend_config, listener_addresses, matrix_config, overhead_body_variants,
    overhead_server_load_variant, overhead_variants, proxy_config, proxy_config_with_admin,
    Variant, BACKEND_LISTENERS_PER_PROCESS,
};
use model_sim::bench::overhead::{
    self, connections_for, warmup_seconds, wrk_threads, FilterCounts, Measurement, OverheadReport,
    Regime, BASELINE,
};
use model_sim::bench::pool::{cells, ideals, Run, Stats};
use model_sim::bench::prefix::{
    agreement, cells as prefix_cells, filter_stats, guard, json as prefix_json,
    markdown as prefix_markdown, parse_policies as parse_prefix_policies, svg as prefix_svg,
    Agreement, FilterStats, Planned as PrefixPlanned, PrefixParams, PrefixReport, PrefixRun,
    ServerCounters, Workload as PrefixWorkload,
};
use model_sim::bench::procstat::{machine_ticks, process_ticks, Busiest, Series, Usage};
use model_sim::bench::render::{self, Machine, MatrixReport};
use model_sim::bench::replicas::{
    self, parse_policies, polls_from_stats, weights_from_stats, Cpu, Planned, ReplicaPolicy,
    ReplicaRun, ReplicasParams, ReplicasReport, Scenario, WaitCounts,
};
use model_sim::bench::{parse_sizes, MatrixParams, Policy, ServerParams};
use model_sim::report::Sample;
use serde_json::Value;

const USAGE: &str = "\
usage: model-bench matrix   [--smoke] [--out DIR] [--sizes 4x1,20x5] [--rounds N]
                            [--duration SECONDS] [--policies mlb_lor,mlb_random,...]
       model-bench overhead [--smoke] [--out DIR] [--rounds N] [--seconds N]
                            [--endpoints 4,256,1024] [--workers 1,4,16]
                            [--bodies 1024,65536,1048576|none]
       model-bench prefix   [--smoke] [--out DIR] [--rounds N] [--duration SECONDS]
                            [--warmup SECONDS] [--time-scale F] [--servers N]
                            [--users-per-server N] [--threshold K] [--cache-tokens N]
                            [--groups G] [--workloads shared,unique,hot]
                            [--shared-policies mlb_prefix,mlb_lor,mlb_random,least_request,
                                               ring_hash,maglev]
                            [--unique-policies ...] [--hot-policies ...]
       model-bench replicas [--smoke] [--out DIR] [--replicas 1,2,4,8] [--rounds N]
                            [--duration SECONDS] [--warmup SECONDS] [--time-scale F]
                            [--load F] [--servers N] [--scenarios open,mixed,closed]
                            [--policies mlb_lor,mlb_lor_server_load,least_request_full_scan,
                                        least_request,mlb_random]
                            [--mixed-policies ...] [--closed-policies ...]

matrix:   SageMaker's experiment through Envoy for every policy -> DIR/seed-matrix.{json,md,svg}
overhead: Envoy CPU per request, model-lb against Envoy's balancers, in regimes of Envoy
          workers x endpoints, and PREFIX_AWARE against LOR by request-body size
          -> DIR/overhead.{json,md}
prefix:   PREFIX_AWARE against LOR, RANDOM, LEAST_REQUEST, RING_HASH and MAGLEV on simulated
          servers with a prefix cache: shared-prefix, unique and hot-prefix workloads, and two
          Envoy replicas' agreement -> DIR/prefix.{json,md,svg}
replicas: R Envoy replicas in front of the same servers, open loop split at random over them
          -> DIR/replicas.{json,md,svg}. Policies with server load are skipped (and said so)
          when the filter rejects `server_load`, unless a --*policies flag names them.
DIR defaults to bench/results. Run from the repository root (make bench does).";

/// /proc reports CPU time in USER_HZ, which Linux fixes at 100 for user space.
const TICKS_PER_SECOND: f64 = 100.0;
/// How often CPU use is sampled during a run, and the window of the reported peak.
const SAMPLE_EVERY: Duration = Duration::from_millis(250);
const PEAK_WINDOW_S: f64 = 1.0;

/// Every child alive, so that a Ctrl-C or `kill` of model-bench stops them too (Drop does not
/// run when a signal ends the process).
static CHILDREN: Mutex<Vec<u32>> = Mutex::new(Vec::new());
/// The run's scratch directory, removed on a signal too.
static WORK_DIR: Mutex<Option<PathBuf>> = Mutex::new(None);

fn terminate(pid: u32) {
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

/// On SIGINT or SIGTERM: stop every child, then exit.
fn stop_children_on_signal() {
    std::thread::spawn(|| {
        let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        runtime.block_on(async {
            use tokio::signal::unix::{signal, SignalKind};
            let (Ok(mut int), Ok(mut term)) = (
                signal(SignalKind::interrupt()),
                signal(SignalKind::terminate()),
            ) else {
                return;
            };
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        });
        let pids = CHILDREN.lock().map(|c| c.clone()).unwrap_or_default();
        eprintln!(
            "model-bench: interrupted; stopping {} process(es)",
            pids.len()
        );
        for &pid in &pids {
            terminate(pid);
        }
        // Let them exit (they may still write logs) before their directory goes.
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline && pids.iter().any(|&pid| is_running(pid)) {
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Some(dir) = WORK_DIR.lock().ok().and_then(|d| d.clone()) {
            let _ = std::fs::remove_dir_all(dir);
        }
        std::process::exit(130);
    });
}

/// Whether `pid` is alive (an exited child nobody has waited for is a zombie: not running).
fn is_running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            stat.rsplit_once(") ")
                .map(|(_, rest)| !rest.starts_with('Z'))
        })
        .unwrap_or(false)
}

/// A child process that is stopped (TERM, then KILL) when dropped.
struct Proc {
    child: Child,
    what: String,
}

impl Proc {
    fn new(child: Child, what: impl Into<String>) -> Self {
        if let Ok(mut children) = CHILDREN.lock() {
            children.push(child.id());
        }
        Self {
            child,
            what: what.into(),
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(mut children) = CHILDREN.lock() {
            children.retain(|&pid| pid != self.child.id());
        }
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        terminate(self.child.id());
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        eprintln!("model-bench: {} had to be killed", self.what);
    }
}

struct Env {
    envoy: PathBuf,
    wasm: PathBuf,
    noop_wasm: PathBuf,
    sim: PathBuf,
    work: PathBuf,
}

impl Env {
    fn new() -> Result<Self, String> {
        let root = std::env::current_dir().map_err(|e| e.to_string())?;
        let envoy = std::env::var_os("ENVOY_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join(".venv/bin/envoy"));
        let wasm = root.join("target/wasm32-wasip1/release/model_lb.wasm");
        let noop_wasm = root.join("target/wasm32-wasip1/release/noop_filter.wasm");
        let sim = std::env::current_exe()
            .map_err(|e| e.to_string())?
            .parent()
            .ok_or("no executable directory")?
            .to_path_buf();
        for (path, hint) in [(&envoy, "make envoy"), (&wasm, "make build")] {
            if !path.exists() {
                return Err(format!(
                    "{} is missing: run `{hint}` from the repository root (make bench does)",
                    path.display()
                ));
            }
        }
        let work = std::env::temp_dir().join(format!("model-bench-{}", std::process::id()));
        std::fs::create_dir_all(&work).map_err(|e| e.to_string())?;
        if let Ok(mut dir) = WORK_DIR.lock() {
            *dir = Some(work.clone());
        }
        // Every Envoy of the run loads this copy: a `make build` while a benchmark runs must not
        // change the filter halfway through.
        let copy = work.join("model_lb.wasm");
        std::fs::copy(&wasm, &copy).map_err(|e| format!("{}: {e}", wasm.display()))?;
        let wasm = copy;
        // Likewise the simulated servers and the load tool (`make sim` may run meanwhile).
        let bin = work.join("bin");
        std::fs::create_dir_all(&bin).map_err(|e| e.to_string())?;
        for tool in ["model-server", "model-load"] {
            let from = sim.join(tool);
            if from.exists() {
                std::fs::copy(&from, bin.join(tool))
                    .map_err(|e| format!("{}: {e}", from.display()))?;
            }
        }
        let sim = bin;
        Ok(Self {
            envoy,
            wasm,
            noop_wasm,
            sim,
            work,
        })
    }

    fn wasm(&self) -> String {
        self.wasm.to_string_lossy().into_owned()
    }

    /// Starts a model server on a free port; returns it and its port.
    fn server(&self, seed: u64, args: &[String]) -> Result<(Proc, u16), String> {
        let mut child = Command::new(self.sim.join("model-server"))
            .args(["--listen", "127.0.0.1:0", "--seed", &seed.to_string()])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("model-server: {e} (run `make sim`)"))?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let proc = Proc::new(child, "model-server");
        // The server's first line is the address it bound.
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .map_err(|e| e.to_string())?;
        let port = line
            .trim()
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| format!("model-server said {line:?}"))?;
        Ok((proc, port))
    }

    fn write_config(&self, name: &str, config: &Value) -> Result<PathBuf, String> {
        let path = self.work.join(format!("{name}.json"));
        std::fs::write(&path, config.to_string()).map_err(|e| e.to_string())?;
        Ok(path)
    }

    /// `envoy --mode validate`: every generated configuration is checked before it is used.
    fn validate(&self, name: &str, config: &Value) -> Result<(), String> {
        let path = self.write_config(&format!("{name}-validate"), config)?;
        let output = Command::new(&self.envoy)
            .args(["--mode", "validate", "-l", "error", "-c"])
            .arg(&path)
            .output()
            .map_err(|e| format!("envoy: {e}"))?;
        if output.status.success() {
            Ok(())
        } else {
            Err(format!(
                "envoy rejected the generated {name} configuration ({}):\n{}{}",
                path.display(),
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ))
        }
    }

    /// Starts Envoy on `config`; returns it with its listeners' addresses by name.
    fn envoy(
        &self,
        name: &str,
        config: &Value,
        concurrency: u32,
    ) -> Result<(Proc, Vec<(String, String)>), String> {
        let mut starting = self.spawn_envoy(name, config, concurrency)?;
        let (_, listeners) = self.await_envoy(&mut starting)?;
        Ok((starting.proc, listeners))
    }

    /// Starts Envoy on `config` without waiting for it (several start in parallel).
    fn spawn_envoy(
        &self,
        name: &str,
        config: &Value,
        concurrency: u32,
    ) -> Result<StartingEnvoy, String> {
        let path = self.write_config(name, config)?;
        let admin_path = self.work.join(format!("{name}.admin"));
        let _ = std::fs::remove_file(&admin_path);
        let log_path = self.work.join(format!("{name}.log"));
        let log = std::fs::File::create(&log_path).map_err(|e| e.to_string())?;
        let child = Command::new(&self.envoy)
            .arg("-c")
            .arg(&path)
            .args(["--concurrency", &concurrency.to_string()])
            .args(["--disable-hot-restart", "-l", "warning"])
            .arg("--admin-address-path")
            .arg(&admin_path)
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("envoy: {e}"))?;
        Ok(StartingEnvoy {
            proc: Proc::new(child, format!("envoy {name}")),
            name: name.to_owned(),
            admin_path,
            log_path,
        })
    }

    /// Waits until a started Envoy is ready; returns its admin address and its listeners'
    /// addresses by name.
    fn await_envoy(
        &self,
        starting: &mut StartingEnvoy,
    ) -> Result<(String, Vec<(String, String)>), String> {
        let name = &starting.name;
        let deadline = Instant::now() + Duration::from_secs(60);
        let admin = loop {
            if let Ok(Some(status)) = starting.proc.child.try_wait() {
                let log = std::fs::read_to_string(&starting.log_path).unwrap_or_default();
                return Err(format!("envoy {name} exited ({status}):\n{log}"));
            }
            if let Ok(text) = std::fs::read_to_string(&starting.admin_path) {
                let admin = text.trim().to_owned();
                if http_get(&admin, "/ready").is_some_and(|(status, _)| status == 200) {
                    break admin;
                }
            }
            if Instant::now() > deadline {
                return Err(format!("envoy {name} not ready after 60 s"));
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let (_, body) = http_get(&admin, "/listeners?format=json").ok_or("no /listeners")?;
        let json: Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
        Ok((admin, listener_addresses(&json)))
    }
}

/// An Envoy that was started and may not be ready yet.
struct StartingEnvoy {
    proc: Proc,
    name: String,
    admin_path: PathBuf,
    log_path: PathBuf,
}

fn address_of(listeners: &[(String, String)], name: &str) -> Result<String, String> {
    listeners
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, a)| a.clone())
        .ok_or_else(|| format!("Envoy has no listener {name}"))
}

/// A minimal HTTP/1.1 GET for Envoy's admin API and the servers' `/metrics`: (status, body).
fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nhost: bench\r\nconnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let chunked = head
        .lines()
        .any(|l| l.to_ascii_lowercase().replace(' ', "") == "transfer-encoding:chunked");
    Some((
        status,
        if chunked {
            dechunk(body)
        } else {
            body.to_owned()
        },
    ))
}

/// Joins the chunks of a chunked body (Envoy's admin answers chunked); a body that is not
/// chunked comes back as it is.
fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            return body.to_owned();
        };
        if n == 0 || tail.len() < n {
            break;
        }
        out.push_str(&tail[..n]);
        rest = tail[n..].trim_start_matches("\r\n");
    }
    out
}

fn process_cpu_s(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    process_ticks(&stat).map(|t| t as f64 / TICKS_PER_SECOND)
}

fn machine_cpu_s() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    machine_ticks(&stat).map(|(busy, _)| busy as f64 / TICKS_PER_SECOND)
}

/// CPU use of the processes of one run, sampled while it lasts.
struct CpuWatch {
    started: Instant,
    /// (role, pid, samples); a role may have several processes (the model servers).
    processes: Vec<(String, u32, Series)>,
    machine: Series,
}

impl CpuWatch {
    fn new(roles: Vec<(&str, Vec<u32>)>) -> Self {
        let processes = roles
            .into_iter()
            .flat_map(|(role, pids)| {
                pids.into_iter()
                    .map(move |pid| (role.to_owned(), pid, Series::default()))
            })
            .collect();
        let mut watch = Self {
            started: Instant::now(),
            processes,
            machine: Series::default(),
        };
        watch.sample();
        watch
    }

    fn sample(&mut self) {
        let t = self.started.elapsed().as_secs_f64();
        for (_, pid, series) in &mut self.processes {
            if let Some(cpu) = process_cpu_s(*pid) {
                series.push(t, cpu);
            }
        }
        if let Some(cpu) = machine_cpu_s() {
            self.machine.push(t, cpu);
        }
    }

    /// Waits for `child` to exit, sampling CPU meanwhile.
    fn wait(&mut self, child: &mut Child) -> Result<std::process::ExitStatus, String> {
        loop {
            if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
                return Ok(status);
            }
            self.sample();
            std::thread::sleep(SAMPLE_EVERY);
        }
    }

    /// The busiest process of `role` (highest run average).
    fn usage(&self, role: &str) -> Usage {
        self.processes
            .iter()
            .filter(|(r, _, _)| r == role)
            .map(|(_, _, s)| s.usage(PEAK_WINDOW_S))
            .fold(
                Usage::default(),
                |a, b| if b.average > a.average { b } else { a },
            )
    }

    /// All processes of `role` together.
    fn role_total(&self, role: &str) -> Usage {
        let mut sum = Usage::default();
        for (_, _, s) in self.processes.iter().filter(|(r, _, _)| r == role) {
            let u = s.usage(PEAK_WINDOW_S);
            sum.average += u.average;
            sum.peak += u.peak;
        }
        sum
    }

    fn total(&self) -> Usage {
        let mut sum = Usage::default();
        for (_, _, s) in &self.processes {
            let u = s.usage(PEAK_WINDOW_S);
            sum.average += u.average;
            sum.peak += u.peak;
        }
        sum
    }

    fn machine(&self) -> Usage {
        self.machine.usage(PEAK_WINDOW_S)
    }
}

fn machine() -> Machine {
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let stdout = |cmd: &str, args: &[&str]| {
        Command::new(cmd)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let envoy = std::env::var("ENVOY_BIN").unwrap_or_else(|_| ".venv/bin/envoy".into());
    // "envoy  version: <hash>/1.40.0/Clean/RELEASE/BoringSSL"
    let envoy_version = stdout(&envoy, &["--version"])
        .and_then(|text| {
            let after = text.split("version: ").nth(1)?.to_owned();
            after.split('/').nth(1).map(str::to_owned)
        })
        .unwrap_or_else(|| "?".into());
    let mut commit = stdout("git", &["rev-parse", "--short", "HEAD"]).unwrap_or_default();
    if stdout("git", &["status", "--porcelain", "--untracked-files=no"])
        .is_some_and(|s| !s.is_empty())
    {
        commit.push_str(" (with local changes)");
    }
    Machine {
        date: stdout("date", &["-u", "+%Y-%m-%d %H:%M UTC"]).unwrap_or_default(),
        nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model,
        envoy_version,
        commit,
    }
}

fn write(dir: &Path, name: &str, text: &str) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    std::fs::write(dir.join(name), text).map_err(|e| format!("{}: {e}", dir.join(name).display()))
}

fn read_samples(path: &Path) -> Result<Vec<Sample>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).map_err(|e| format!("{}: {e}", path.display())))
        .collect()
}

fn matrix(env: &Env, params: &MatrixParams, smoke: bool, out: &Path) -> Result<(), String> {
    let started = Instant::now();
    let server_args = params.server.args();
    let mut runs = Vec::new();
    let mut busiest = Busiest::default();
    let total_runs = params.sizes.len() * params.policies.len() * params.rounds as usize;
    let mut done = 0;
    for (size_index, &(users, instances)) in params.sizes.iter().enumerate() {
        let mut servers = Vec::new();
        let mut ports = Vec::new();
        for i in 0..instances {
            let (proc, port) = env.server(1000 + u64::from(i), &server_args)?;
            servers.push(proc);
            ports.push(port);
        }
        let config = matrix_config(&env.wasm(), &ports, &params.policies);
        env.validate("matrix", &config)?;
        let (envoy, listeners) = env.envoy("matrix", &config, params.envoy_concurrency)?;
        for round in 0..params.rounds {
            for policy in params.order(size_index, round) {
                let address = address_of(&listeners, policy.id())?;
                let samples_path = env.work.join("samples.jsonl");
                let _ = std::fs::remove_file(&samples_path);
                let load = Command::new(env.sim.join("model-load"))
                    .args(["--url", &format!("http://{address}")])
                    .args(params.load_args(users, instances, round))
                    .args(["--label", policy.id()])
                    .arg("--samples")
                    .arg(&samples_path)
                    .stdout(Stdio::null())
                    .spawn()
                    .map_err(|e| format!("model-load: {e} (run `make sim`)"))?;
                let mut load = Proc::new(load, "model-load");
                let mut watch = CpuWatch::new(vec![
                    (render::LOAD, vec![load.pid()]),
                    (render::ENVOY, vec![envoy.pid()]),
                    (render::SERVER, servers.iter().map(Proc::pid).collect()),
                ]);
                let status = watch.wait(&mut load.child)?;
                if !status.success() {
                    return Err(format!(
                        "model-load against {} failed ({status})",
                        policy.id()
                    ));
                }
                for role in [render::LOAD, render::ENVOY, render::SERVER] {
                    busiest.record(role, &watch.usage(role));
                }
                let machine = watch.machine();
                let ours = watch.total();
                busiest.record(render::MACHINE, &machine);
                busiest.record(
                    render::OTHERS,
                    &Usage {
                        average: (machine.average - ours.average).max(0.0),
                        peak: (machine.peak - ours.peak).max(0.0),
                    },
                );
                let run = Run {
                    policy,
                    users,
                    instances,
                    round,
                    samples: read_samples(&samples_path)?,
                    warmup_s: params.warmup_s,
                    duration_s: params.duration_s,
                };
                done += 1;
                let one = cells(
                    std::slice::from_ref(&run),
                    &[(users, instances)],
                    &[policy],
                    &params.server.timing(),
                    params.server.max_batch as usize,
                );
                if let Some(c) = one.first() {
                    let ms = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.0}"));
                    eprintln!(
                        "[{done:>2}/{total_runs}] {users:>3} users {instances:>2} instances round {round}  {:<36} p50 {:>5} ms  p99 {:>5} ms  ttft p99 {:>5} ms  {:>6.1}/instance/min  errors {}",
                        policy.name(),
                        ms(c.stats.p50_ms),
                        ms(c.stats.p99_ms),
                        ms(c.stats.ttft_p99_ms),
                        c.stats.throughput_per_instance_per_min,
                        c.stats.errors
                    );
                }
                runs.push(run);
            }
        }
        drop(envoy);
        drop(servers);
    }
    let timing = params.server.timing();
    let max_batch = params.server.max_batch as usize;
    let cells = cells(&runs, &params.sizes, &params.policies, &timing, max_batch);
    let ideals = ideals(&runs, &params.sizes, &timing, max_batch);
    let report = MatrixReport {
        params: params.clone(),
        cells,
        ideals,
        machine: machine(),
        busiest,
        validation: "Every generated configuration passed `envoy --mode validate` first.".into(),
        elapsed_s: started.elapsed().as_secs_f64(),
        smoke,
    };
    let md = render::markdown(&report);
    write(out, "seed-matrix.json", &render::json(&report.cells))?;
    write(out, "seed-matrix.md", &md)?;
    let title = format!(
        "model-lb vs Envoy balancers, closed loop, 4 users/instance ({})",
        report.machine.date
    );
    write(
        out,
        "seed-matrix.svg",
        &render::svg(&report.cells, &params.policies, &report.ideals, &title),
    )?;
    println!("{md}");
    eprintln!(
        "model-bench: wrote {}/seed-matrix.{{json,md,svg}}",
        out.display()
    );
    Ok(())
}

/// The simulated servers of one fleet.
struct Fleet {
    procs: Vec<Proc>,
    ports: Vec<u16>,
    batches: Vec<u32>,
}

impl Fleet {
    fn start(env: &Env, server: &ServerParams, batches: &[u32]) -> Result<Fleet, String> {
        let mut procs = Vec::new();
        let mut ports = Vec::new();
        for (i, &batch) in batches.iter().enumerate() {
            let args = ServerParams {
                max_batch: batch,
                ..server.clone()
            }
            .args();
            let (proc, port) = env.server(2000 + i as u64, &args)?;
            procs.push(proc);
            ports.push(port);
        }
        Ok(Fleet {
            procs,
            ports,
            batches: batches.to_vec(),
        })
    }

    /// Every server's admitted and queued counters, in port order.
    fn waits(&self) -> Result<Vec<WaitCounts>, String> {
        self.ports
            .iter()
            .map(|port| {
                let (status, body) = http_get(&format!("127.0.0.1:{port}"), "/metrics")
                    .ok_or_else(|| format!("model-server on port {port}: no /metrics"))?;
                if status != 200 {
                    return Err(format!("model-server on port {port}: /metrics {status}"));
                }
                WaitCounts::parse(&body)
                    .ok_or_else(|| format!("model-server on port {port}: no wait counters"))
            })
            .collect()
    }
}

/// A free loopback port, for an Envoy admin listener that its own config must name.
fn free_port() -> Result<u16, String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    Ok(listener.local_addr().map_err(|e| e.to_string())?.port())
}

/// Whether the filter accepts a `server_load` block: `Ok(None)` yes, `Ok(Some(line))` no, with
/// the filter's log line; `Err` when Envoy failed otherwise.
fn probe_server_load(env: &Env, polling: (u64, u64)) -> Result<Option<String>, String> {
    let variant = ReplicaPolicy::LorServerLoad.variant(polling, &[1]);
    let config = proxy_config_with_admin(&env.wasm(), &[9], &[variant], None);
    match env.envoy("probe-server-load", &config, 1) {
        Ok((proc, _)) => {
            drop(proc);
            Ok(None)
        }
        Err(e) if e.contains("rejecting plugin configuration") => Ok(Some(
            e.lines()
                .find(|l| l.contains("rejecting plugin configuration"))
                .and_then(|l| l.split_once("model-lb: rejecting"))
                .map_or_else(
                    || "rejecting plugin configuration".to_owned(),
                    |(_, rest)| format!("rejecting{rest}"),
                ),
        )),
        Err(e) => Err(e),
    }
}

/// One run: R fresh Envoy replicas for the policy, one `model-load`, the servers' counters
/// scraped at the start and the end of the measured window, CPU sampled throughout.
fn replica_run(
    env: &Env,
    params: &ReplicasParams,
    fleet: &Fleet,
    planned: &Planned,
    rate: Option<f64>,
) -> Result<ReplicaRun, String> {
    let policy = planned.policy;
    let variant = policy.variant(params.polling(), &fleet.batches);
    let mut configs = Vec::new();
    for _ in 0..planned.replicas {
        // An admin cluster points at this Envoy's own admin port: it must be known up front.
        let admin_port = if variant.uses_admin_cluster() {
            Some(free_port()?)
        } else {
            None
        };
        configs.push(proxy_config_with_admin(
            &env.wasm(),
            &fleet.ports,
            std::slice::from_ref(&variant),
            admin_port,
        ));
    }
    let mut starting = Vec::new();
    for (i, config) in configs.iter().enumerate() {
        starting.push(env.spawn_envoy(&format!("{}-r{i}", policy.id()), config, 1)?);
    }
    let mut urls = Vec::new();
    let mut admins = Vec::new();
    for s in &mut starting {
        let (admin, listeners) = env.await_envoy(s)?;
        urls.push(format!("http://{}", address_of(&listeners, policy.id())?));
        admins.push(admin);
    }
    let (targets, users, users_per_replica) = match planned.scenario {
        Scenario::Closed if planned.replicas > 1 => (
            params.closed_urls(&urls),
            Some(params.closed_users()),
            params.closed_users_per_replica(),
        ),
        Scenario::Closed => (
            urls.clone(),
            Some(params.closed_users()),
            vec![params.closed_users()],
        ),
        Scenario::Open | Scenario::Mixed => (urls.clone(), None, Vec::new()),
    };
    let samples_path = env.work.join("samples.jsonl");
    let _ = std::fs::remove_file(&samples_path);
    let mut command = Command::new(env.sim.join("model-load"));
    for url in &targets {
        command.args(["--url", url]);
    }
    let load = command
        .args(params.load_args(rate, users.unwrap_or(0), planned.round))
        .args(["--label", policy.id()])
        .arg("--samples")
        .arg(&samples_path)
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("model-load: {e} (run `make sim`)"))?;
    let mut load = Proc::new(load, "model-load");
    let started = Instant::now();
    let mut watch = CpuWatch::new(vec![
        (render::LOAD, vec![load.pid()]),
        (
            render::ENVOY,
            starting.iter().map(|s| s.proc.pid()).collect(),
        ),
        (render::SERVER, fleet.procs.iter().map(Proc::pid).collect()),
    ]);
    let window = [params.warmup_s, params.warmup_s + params.duration_s];
    // At the start and the end of the measured window: the servers' counters, and the polls
    // each replica has made so far (with the time they were read).
    let polls = || -> (Instant, Option<u64>) {
        let counts: Option<Vec<u64>> = admins
            .iter()
            .map(|admin| {
                let (_, body) = http_get(admin, &format!("/stats?filter={}", policy.id()))?;
                polls_from_stats(&body, policy.id())
            })
            .collect();
        (Instant::now(), counts.map(|c| c.iter().sum()))
    };
    let mut scraped: Vec<Vec<WaitCounts>> = Vec::new();
    let mut polled = Vec::new();
    let status = loop {
        if let Some(status) = load.child.try_wait().map_err(|e| e.to_string())? {
            break status;
        }
        let elapsed = started.elapsed().as_secs_f64();
        if let Some(&at) = window.get(scraped.len()) {
            if elapsed >= at {
                scraped.push(fleet.waits()?);
                polled.push(polls());
                continue;
            }
        }
        watch.sample();
        let next = window.get(scraped.len()).map_or(SAMPLE_EVERY, |&at| {
            Duration::from_secs_f64((at - elapsed).max(0.0))
        });
        std::thread::sleep(next.min(SAMPLE_EVERY));
    };
    watch.sample();
    if !status.success() {
        return Err(format!(
            "model-load against {} failed ({status})",
            policy.id()
        ));
    }
    while scraped.len() < 2 {
        scraped.push(fleet.waits()?);
        polled.push(polls());
    }
    // Upstream requests no client sent (the server-load polls), per replica and second of the
    // measured window.
    let polls_per_s = match (polled.first(), polled.get(1)) {
        (Some((t0, Some(p0))), Some((t1, Some(p1)))) if t1 > t0 => Some(
            p1.saturating_sub(*p0) as f64
                / t1.duration_since(*t0).as_secs_f64()
                / f64::from(planned.replicas),
        ),
        _ => None,
    };
    let weights_seen = match admins.first() {
        Some(admin) if policy.weighted() => {
            let body = http_get(admin, "/stats?filter=weight").map_or(String::new(), |(_, b)| b);
            weights_from_stats(&body, policy.id(), &fleet.ports)
        }
        _ => Vec::new(),
    };
    for s in &starting {
        terminate(s.proc.pid());
    }
    let machine = watch.machine();
    let ours = watch.total();
    let cpu = Cpu {
        load: watch.usage(render::LOAD),
        envoy_busiest: watch.usage(render::ENVOY),
        envoy_total: watch.role_total(render::ENVOY),
        server_busiest: watch.usage(render::SERVER),
        servers_total: watch.role_total(render::SERVER),
        others: Usage {
            average: (machine.average - ours.average).max(0.0),
            peak: (machine.peak - ours.peak).max(0.0),
        },
        machine,
    };
    drop(starting);
    Ok(ReplicaRun {
        scenario: planned.scenario,
        replicas: planned.replicas,
        policy,
        run: Run {
            policy: policy.base(),
            users: users.unwrap_or(0),
            instances: params.servers,
            round: planned.round,
            samples: read_samples(&samples_path)?,
            warmup_s: params.warmup_s,
            duration_s: params.duration_s,
        },
        rate_per_s: rate,
        users,
        users_per_replica,
        waits: WaitCounts::delta(&scraped[0], &scraped[1]),
        cpu,
        polls_per_s_per_replica: polls_per_s,
        weights_seen,
    })
}

fn replicas(
    env: &Env,
    params: &ReplicasParams,
    explicit_server_load: bool,
    smoke: bool,
    out: &Path,
) -> Result<(), String> {
    let started = Instant::now();
    // The commit and the time the filter was copied for the run, not when it ended.
    let machine_at_start = machine();
    let polling = params.polling();
    let mut plan = params.plan();
    let mut skipped = Vec::new();
    if plan.iter().any(|r| r.policy.needs_server_load()) {
        if let Some(line) = probe_server_load(env, polling)? {
            if explicit_server_load {
                return Err(format!(
                    "the filter (target/wasm32-wasip1/release/model_lb.wasm) does not accept `server_load` yet: {line}"
                ));
            }
            let names: Vec<&str> = ReplicaPolicy::ALL
                .iter()
                .filter(|p| p.needs_server_load() && plan.iter().any(|r| r.policy == **p))
                .map(|p| p.name())
                .collect();
            let note = format!(
                "{}: the filter (target/wasm32-wasip1/release/model_lb.wasm) does not accept `server_load` yet (\"{line}\"). Rerun `make bench-replicas` once it does.",
                names.join(", ")
            );
            eprintln!("model-bench: skipping {note}");
            skipped.push(note);
            plan.retain(|r| !r.policy.needs_server_load());
        }
    }
    let open_batches = params.fleet(Scenario::Open);
    let mixed_batches = params.fleet(Scenario::Mixed);
    let open_capacity = params.capacity_per_s(&open_batches)?;
    let mixed_capacity = params.capacity_per_s(&mixed_batches)?;
    let (open_rate, mixed_rate) = (open_capacity * params.load, mixed_capacity * params.load);
    eprintln!(
        "model-bench: {} runs; poll interval {} ms, arrivals {open_rate:.2}/s (uniform fleet), {mixed_rate:.2}/s (mixed fleet)",
        plan.len(),
        polling.0
    );
    let mut fleet: Option<(bool, Fleet)> = None;
    let mut runs = Vec::new();
    for (i, planned) in plan.iter().enumerate() {
        let mixed = planned.scenario.mixed_fleet();
        if fleet.as_ref().map(|(m, _)| *m) != Some(mixed) {
            drop(fleet.take());
            let batches = if mixed { &mixed_batches } else { &open_batches };
            let servers = Fleet::start(env, &params.server, batches)?;
            // Every policy this fleet will see, in one config, checked once.
            let mut variants: Vec<Variant> = Vec::new();
            for r in plan.iter().filter(|r| r.scenario.mixed_fleet() == mixed) {
                if !variants.iter().any(|v| v.name == r.policy.id()) {
                    variants.push(r.policy.variant(polling, batches));
                }
            }
            let admin = Some(free_port()?);
            let config = proxy_config_with_admin(&env.wasm(), &servers.ports, &variants, admin);
            env.validate(if mixed { "mixed" } else { "uniform" }, &config)?;
            fleet = Some((mixed, servers));
        }
        let Some((_, servers)) = fleet.as_ref() else {
            return Err("no servers".into());
        };
        let rate = match planned.scenario {
            Scenario::Open => Some(open_rate),
            Scenario::Mixed => Some(mixed_rate),
            Scenario::Closed => None,
        };
        let run = replica_run(env, params, servers, planned, rate)?;
        let stats = Stats::of(&[&run.run]);
        let ms = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.0}"));
        eprintln!(
            "[{:>2}/{}] {:<6} R={} round {} {:<36} p50 {:>5} ms  ttft p99 {:>5} ms  {:>6.1}/instance/min  waited {:>5}  envoy cpu {:.2}  polls/s {}  errors {}",
            i + 1,
            plan.len(),
            planned.scenario.id(),
            planned.replicas,
            planned.round,
            planned.policy.name(),
            ms(stats.p50_ms),
            ms(stats.ttft_p99_ms),
            stats.throughput_per_instance_per_min,
            run.waits
                .share_pct()
                .map_or("-".into(), |v| format!("{v:.1} %")),
            run.cpu.envoy_busiest.average,
            run.polls_per_s_per_replica
                .map_or("-".into(), |v| format!("{v:.0}")),
            stats.errors
        );
        runs.push(run);
    }
    drop(fleet);
    let report = ReplicasReport {
        params: params.clone(),
        cells: replicas::cells(&runs),
        machine: machine_at_start,
        open_rate,
        open_capacity,
        mixed_rate,
        mixed_capacity,
        skipped,
        validation: "Every generated configuration passed `envoy --mode validate` first.".into(),
        elapsed_s: started.elapsed().as_secs_f64(),
        smoke,
    };
    let md = replicas::markdown(&report);
    write(out, "replicas.json", &replicas::json(&report.cells))?;
    write(out, "replicas.md", &md)?;
    let title = format!(
        "Envoy replicas, {} servers x {} slots, open loop at {:.0} % of capacity ({})",
        params.servers,
        params.server.max_batch,
        params.load * 100.0,
        report.machine.date
    );
    write(out, "replicas.svg", &replicas::svg(&report.cells, &title))?;
    println!("{md}");
    eprintln!(
        "model-bench: wrote {}/replicas.{{json,md,svg}}",
        out.display()
    );
    Ok(())
}

/// What polling alone costs: over `seconds` without traffic, the server-load proxy's polls and
/// CPU against the main proxy's CPU in the same seconds (Envoy's and the wasm VMs' own idle
/// work), as a line for the overhead report.
fn idle_polling(
    polling: u32,
    main: u32,
    admin: &str,
    name: &str,
    endpoints: u32,
    seconds: f64,
) -> String {
    let polls = || {
        http_get(admin, &format!("/stats?filter={name}"))
            .and_then(|(_, body)| polls_from_stats(&body, name))
    };
    let cpu = || Some((process_cpu_s(polling)?, process_cpu_s(main)?));
    let (p0, c0, t0) = (polls(), cpu(), Instant::now());
    std::thread::sleep(Duration::from_secs_f64(seconds));
    let (p1, c1, t1) = (polls(), cpu(), Instant::now());
    let span = t1.duration_since(t0).as_secs_f64();
    match (p0, p1, c0, c1) {
        (Some(p0), Some(p1), Some(c0), Some(c1)) if p1 > p0 => {
            let rate = (p1 - p0) as f64 / span;
            let cores = (c1.0 - c0.0) / span;
            let idle = (c1.1 - c0.1) / span;
            format!(
                "{endpoints} endpoints, {name} without traffic for {seconds:.0} s: {rate:.0} polls/s (each endpoint every {:.0} ms) and {cores:.3} cores, against {idle:.3} cores for the main proxy in the same seconds: about {:.0} µs of Envoy CPU per poll (CPU time has a 10 ms resolution).",
                f64::from(endpoints) * 1000.0 / rate,
                ((cores - idle).max(0.0)) * 1e6 / rate
            )
        }
        _ => format!(
            "{endpoints} endpoints, {name} without traffic: no polls seen in {seconds:.0} s (Envoy's cluster stats)."
        ),
    }
}

struct OverheadParams {
    rounds: u32,
    seconds: u32,
    endpoints: Vec<u32>,
    workers: Vec<u32>,
    /// Request-body sizes for PREFIX_AWARE against LOR (one worker, `body_endpoints`).
    bodies: Vec<u32>,
    body_endpoints: u32,
    /// Seconds of each one-connection (unloaded) latency run in the body regimes.
    unloaded_seconds: u32,
    /// Longest warm-up round, seconds; 0: no warm-up round (the smoke run).
    max_warmup_s: u32,
}

/// One listener under test: its variant, URL, the proxy Envoy serving it and that Envoy's
/// admin address (for the filter's counters).
struct OverheadTarget {
    name: String,
    url: String,
    pid: u32,
    admin: String,
    filter: bool,
}

/// Raises this process's open-file limit (which its children inherit) as far as allowed: to
/// `want` if it may raise the hard limit (root), else to the hard limit. Returns the soft limit.
#[allow(clippy::unnecessary_cast)] // rlim_t is u64 on 64-bit Linux only
fn raise_fd_limit(want: u64) -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 0;
        }
        if limit.rlim_cur >= want as libc::rlim_t {
            return limit.rlim_cur as u64;
        }
        let wanted = libc::rlimit {
            rlim_cur: (want as libc::rlim_t).max(limit.rlim_cur),
            rlim_max: (want as libc::rlim_t).max(limit.rlim_max),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) == 0 {
            return wanted.rlim_cur as u64;
        }
        let to_hard = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &to_hard) == 0 {
            return to_hard.rlim_cur as u64;
        }
        limit.rlim_cur as u64
    }
}

/// The filter counters (`cas_conflicts`, `fail_open.*`) of every pool of an Envoy.
fn filter_counters(admin: &str, pool: &str) -> FilterStats {
    http_get(admin, "/stats?filter=cas_conflicts%7Cfail_open")
        .map(|(_, body)| filter_stats(&body, pool))
        .unwrap_or_default()
}

/// The fast backend for `endpoints` endpoints: Envoy processes of at most 256 listeners each
/// (started in parallel); returns them and every listener's port.
fn start_backends(env: &Env, endpoints: u32) -> Result<(Vec<Proc>, Vec<u16>), String> {
    let mut starting = Vec::new();
    for (i, count) in backend_split(endpoints).into_iter().enumerate() {
        let config = fast_backend_config(count);
        if i == 0 {
            env.validate("backend", &config)?;
        }
        starting.push(env.spawn_envoy(&format!("backend-{endpoints}-{i}"), &config, 1)?);
    }
    let mut ports = Vec::new();
    for s in &mut starting {
        let (_, listeners) = env.await_envoy(s)?;
        // Listeners are named b0, b1, ...: keep their order.
        let mut named: Vec<(u32, u16)> = listeners
            .iter()
            .filter_map(|(n, a)| {
                Some((
                    n.strip_prefix('b')?.parse().ok()?,
                    a.rsplit(':').next()?.parse().ok()?,
                ))
            })
            .collect();
        named.sort_unstable();
        ports.extend(named.into_iter().map(|(_, p)| p));
    }
    if ports.len() != endpoints as usize {
        return Err(format!(
            "the backend listens on {} ports, not {endpoints}",
            ports.len()
        ));
    }
    Ok((starting.into_iter().map(|s| s.proc).collect(), ports))
}

/// One wrk run; returns its parsed output and the CPU of the proxy, backend and wrk.
fn wrk_run(
    target: &OverheadTarget,
    backends: &[u32],
    regime: &Regime,
    seconds: u32,
    script: Option<&Path>,
) -> Result<(WrkResult, f64, Usage, Usage, Usage), String> {
    let before = process_cpu_s(target.pid).unwrap_or(0.0);
    let mut command = Command::new("wrk");
    command
        .arg(format!("-t{}", wrk_threads(regime)))
        .arg(format!("-c{}", regime.connections))
        .args(["--latency", "-d"])
        .arg(format!("{seconds}s"));
    if let Some(script) = script {
        command.arg("-s").arg(script);
    }
    let wrk = command
        .arg(&target.url)
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("wrk: {e} (make bench-overhead installs it)"))?;
    let mut wrk = Proc::new(wrk, "wrk");
    let mut watch = CpuWatch::new(vec![
        ("proxy", vec![target.pid]),
        ("backend", backends.to_vec()),
        ("wrk", vec![wrk.pid()]),
    ]);
    watch.wait(&mut wrk.child)?;
    let proxy_cpu_s = process_cpu_s(target.pid).unwrap_or(0.0) - before;
    let mut text = String::new();
    if let Some(mut stdout) = wrk.child.stdout.take() {
        let _ = stdout.read_to_string(&mut text);
    }
    let parsed =
        overhead::parse_wrk(&text).ok_or_else(|| format!("cannot read wrk output:\n{text}"))?;
    Ok((
        parsed,
        proxy_cpu_s,
        watch.usage("proxy"),
        watch.usage("backend"),
        watch.usage("wrk"),
    ))
}

type WrkResult = (u64, f64, f64, f64, u64);

/// A regime's rounds: an uncounted warm-up round, then `rounds` rounds of every target in
/// alternating order; the filter's counters are read (after a housekeeping flush) before the
/// first and after the last measured round.
fn overhead_rounds(
    regime: Regime,
    targets: &[OverheadTarget],
    backends: &[u32],
    params: &OverheadParams,
    seconds: u32,
    script: Option<&Path>,
) -> Result<(Vec<Measurement>, Vec<FilterCounts>), String> {
    let mut measurements = Vec::new();
    let mut filters = Vec::new();
    if params.max_warmup_s > 0 {
        let warmup = warmup_seconds(&regime).min(params.max_warmup_s);
        for t in targets {
            wrk_run(t, backends, &regime, warmup, script)?;
        }
    }
    // The filter flushes its counters on its housekeeping tick (1 s): wait for the warm-up's.
    let settle = || std::thread::sleep(Duration::from_millis(1200));
    if params.max_warmup_s > 0 {
        settle();
    }
    let before: Vec<FilterStats> = targets
        .iter()
        .map(|t| filter_counters(&t.admin, &t.name))
        .collect();
    for round in 1..=params.rounds {
        let mut order: Vec<usize> = (0..targets.len()).collect();
        // Alternate the direction so no variant always runs right after another.
        if round % 2 == 0 {
            order.reverse();
        }
        for i in order {
            let t = &targets[i];
            let (
                (requests, requests_per_s, p50_ms, p99_ms, errors),
                proxy_cpu_s,
                proxy,
                backend,
                load,
            ) = wrk_run(t, backends, &regime, seconds, script)?;
            let m = Measurement {
                variant: t.name.clone(),
                regime,
                round,
                requests,
                requests_per_s,
                p50_ms,
                p99_ms,
                proxy_cpu_s,
                proxy,
                backend,
                load,
                errors,
            };
            eprintln!(
                "{:<48} round {round} {:<20} {requests_per_s:>8.0} req/s  {:>6.1} µs/request  p99 {p99_ms:>6.2} ms  errors {errors}",
                regime.label(),
                t.name,
                m.cpu_us_per_request()
            );
            measurements.push(m);
        }
    }
    settle();
    for (t, b) in targets.iter().zip(before) {
        if !t.filter {
            continue;
        }
        let a = filter_counters(&t.admin, &t.name);
        filters.push(FilterCounts {
            variant: t.name.clone(),
            regime,
            stats: FilterStats {
                cas_conflicts: a.cas_conflicts.saturating_sub(b.cas_conflicts),
                fail_open: a.fail_open.saturating_sub(b.fail_open),
                ..FilterStats::default()
            },
        });
    }
    Ok((measurements, filters))
}

/// Starts one proxy Envoy per variant (in parallel; a proxy each, so that 16 workers x 1,024
/// endpoints of upstream connections stay within one process's file descriptors) and waits for
/// them. A variant whose plugin configuration the filter rejects is skipped with a note.
fn start_proxies(
    env: &Env,
    tag: &str,
    ports: &[u16],
    variants: &[Variant],
    workers: u32,
    notes: &mut Vec<String>,
) -> Result<(Vec<Proc>, Vec<OverheadTarget>), String> {
    let mut starting = Vec::new();
    for v in variants {
        let config = proxy_config_with_admin(&env.wasm(), ports, std::slice::from_ref(v), None);
        starting.push((
            v,
            env.spawn_envoy(&format!("proxy-{tag}-{}", v.name), &config, workers)?,
        ));
    }
    let mut procs = Vec::new();
    let mut targets = Vec::new();
    for (v, mut s) in starting {
        match env.await_envoy(&mut s) {
            Ok((admin, listeners)) => {
                targets.push(OverheadTarget {
                    name: v.name.clone(),
                    url: format!("http://{}/", address_of(&listeners, &v.name)?),
                    pid: s.proc.pid(),
                    admin,
                    filter: v.policy.uses_filter(),
                });
                procs.push(s.proc);
            }
            Err(e) if e.contains("rejecting plugin configuration") => {
                let line = e
                    .lines()
                    .find(|l| l.contains("rejecting plugin configuration"))
                    .unwrap_or("rejecting plugin configuration")
                    .to_owned();
                eprintln!("model-bench: skipping {}: {line}", v.name);
                let note = format!(
                    "**Not run:** {}: the filter rejects its configuration ({}).",
                    v.name,
                    line.split_once("model-lb: ")
                        .map_or(line.as_str(), |(_, l)| l)
                );
                if !notes.contains(&note) {
                    notes.push(note);
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok((procs, targets))
}

/// File descriptors a regime needs in its busiest process: a proxy holds a connection per
/// (worker, endpoint) it has sent to, a backend process the same for each of its listeners and
/// each live proxy.
fn fds_needed(workers: u32, endpoints: u32, proxies: u32) -> u64 {
    let per_backend = u64::from(endpoints.min(BACKEND_LISTENERS_PER_PROCESS));
    let proxy = u64::from(workers) * u64::from(endpoints) + 512;
    let backend = per_backend * (1 + u64::from(proxies) * u64::from(workers)) + 512;
    proxy.max(backend)
}

fn overhead(env: &Env, params: &OverheadParams, smoke: bool, out: &Path) -> Result<(), String> {
    let started = Instant::now();
    if !env.noop_wasm.exists() {
        return Err(format!(
            "{} is missing: run `make noop-filter` (make bench-overhead does)",
            env.noop_wasm.display()
        ));
    }
    let noop = env.noop_wasm.to_string_lossy().into_owned();
    let max_workers = params.workers.iter().copied().max().unwrap_or(1);
    let max_endpoints = params.endpoints.iter().copied().max().unwrap_or(1);
    let need = fds_needed(max_workers, max_endpoints, 3);
    let fd_limit = raise_fd_limit(need.max(65_536));
    let mut names: Vec<String> = Vec::new();
    let mut add_names = |vs: &[Variant]| {
        for v in vs {
            if !names.contains(&v.name) {
                names.push(v.name.clone());
            }
        }
    };
    add_names(&overhead_variants(&noop, 1));
    add_names(&[overhead_server_load_variant()]);
    add_names(&overhead_body_variants());
    let mut notes = Vec::new();
    let mut measurements = Vec::new();
    let mut filters = Vec::new();
    let mut regimes = Vec::new();
    let mut body_regimes = Vec::new();
    for &endpoints in &params.endpoints {
        let (backends, ports) = start_backends(env, endpoints)?;
        let backend_pids: Vec<u32> = backends.iter().map(Proc::pid).collect();
        for &workers in &params.workers {
            let mut variants = overhead_variants(&noop, workers);
            let proxies = variants.len() as u32;
            let need = fds_needed(workers, endpoints, proxies + 1);
            if need > fd_limit {
                return Err(format!(
                    "{workers} workers x {endpoints} endpoints needs about {need} open files per process; the limit is {fd_limit}: raise it (`ulimit -n {need}`) or leave that regime out (--workers, --endpoints)"
                ));
            }
            let regime = Regime {
                workers,
                endpoints,
                body_bytes: None,
                connections: connections_for(workers),
            };
            // LOR with server load polls every endpoint all the time: it runs with one worker,
            // in an Envoy of its own like every variant, so its polls cost only its own runs.
            if workers == 1 {
                variants.push(overhead_server_load_variant());
            }
            let tag = format!("{workers}x{endpoints}");
            let (procs, targets) =
                start_proxies(env, &tag, &ports, &variants, workers, &mut notes)?;
            if let Some(t) = targets.iter().find(|t| t.name == "mlb_lor_server_load") {
                if let Some(main) = targets.iter().find(|t| t.name == BASELINE) {
                    notes.push(idle_polling(
                        t.pid,
                        main.pid,
                        &t.admin,
                        &t.name,
                        endpoints,
                        if smoke { 1.0 } else { 5.0 },
                    ));
                }
            }
            let (m, f) = overhead_rounds(
                regime,
                &targets,
                &backend_pids,
                params,
                params.seconds,
                None,
            )?;
            measurements.extend(m);
            filters.extend(f);
            regimes.push(regime);
            drop(procs);
        }
        if endpoints == params.body_endpoints && !params.bodies.is_empty() {
            let variants = overhead_body_variants();
            let (procs, targets) = start_proxies(
                env,
                &format!("body{endpoints}"),
                &ports,
                &variants,
                1,
                &mut notes,
            )?;
            for &bytes in &params.bodies {
                let mut files = Vec::new();
                for key in 0..16 {
                    let path = env.work.join(format!("body-{bytes}-{key}.json"));
                    std::fs::write(&path, overhead::chat_body(bytes, key))
                        .map_err(|e| format!("{}: {e}", path.display()))?;
                    files.push(path.to_string_lossy().into_owned());
                }
                let script = env.work.join(format!("post-{bytes}.lua"));
                std::fs::write(&script, overhead::wrk_post_script(&files))
                    .map_err(|e| format!("{}: {e}", script.display()))?;
                for (connections, seconds) in [
                    (connections_for(1), params.seconds),
                    (1, params.unloaded_seconds),
                ] {
                    let regime = Regime {
                        workers: 1,
                        endpoints,
                        body_bytes: Some(bytes),
                        connections,
                    };
                    let (m, f) = overhead_rounds(
                        regime,
                        &targets,
                        &backend_pids,
                        params,
                        seconds,
                        Some(&script),
                    )?;
                    measurements.extend(m);
                    filters.extend(f);
                    body_regimes.push(regime);
                }
            }
            drop(procs);
        }
        drop(backends);
    }
    regimes.sort_by_key(|r| (r.workers, r.endpoints));
    regimes.extend(body_regimes);
    let list = |v: &[u32]| v.iter().map(u32::to_string).collect::<Vec<_>>().join(", ");
    let report = OverheadReport {
        rows: overhead::rows(&measurements, &names, &regimes, &filters),
        measurements,
        machine_line: machine().line(),
        method: format!(
            "Method: a fast backend (Envoy answering 200 once it has the request body, `direct_response` behind the buffer filter; processes of at most {BACKEND_LISTENERS_PER_PROCESS} listeners, one listener per endpoint) and, for every variant, a proxy Envoy of its own with `--concurrency` W and one listener and cluster over the endpoints, in regimes of W = {} workers x {} endpoints. Several workers per core is fine here: on this {}-core machine 16 workers time-share the cores (with wrk and the backend), so a request costs what it costs plus the context switches, and a compare-and-swap can lose to a worker that was descheduled between its read and its write, which makes conflicts likelier than on 16 real cores; the CPU per request still counts every cycle spent on it, and LEAST_REQUEST in the same regime pays the same. Each listener spreads its connections exactly evenly over the workers (`connection_balance_config: exact_balance`), and wrk opens 4 connections per worker, at least 16 (`-t1` with one worker, `-t2` otherwise), so every worker is busy. wrk runs {} s per variant; {} rounds after an uncounted warm-up round (long enough for every worker to connect to most endpoints, at most {} s; 0: none), variants in alternating order. CPU per request is the proxy's user + system time over the run (`/proc/<pid>/stat`) divided by the requests wrk completed; ratios and differences to LEAST_REQUEST are taken per round, then the median; the filter's *own cost* is its CPU per request minus LEAST_REQUEST's. CAS conflicts and fail-opens are the filter's counters (`wasmcustom.model_lb.<pool>.cas_conflicts`, `fail_open.*`) from the proxy's admin `/stats`, read before the first and after the last measured round (after a housekeeping flush). mlb_lor_batched is LOR with `\"release_batching_ms\": 10`. With one worker also: wasm_noop (LEAST_REQUEST behind a proxy-wasm filter that does nothing, `bench/noop-filter`: the floor for any wasm filter), mlb_lor_no_passive (`\"passive_health\": false`) and mlb_lor_server_load (`server_load` as in production: `/metrics` of every endpoint every 100 ms through the pool's cluster, at most 200 polls/s, so 1,024 endpoints are each polled every 5 s; its CPU per request includes its polls). Request bodies: {} endpoints, one worker, POST chat bodies of {} bytes (16 different keys in turn, the key in the first message), LOR against PREFIX_AWARE (default `prefix_length` 4096 and `concurrency_threshold` 8, with its hold filter), loaded (16 connections, {} s) and unloaded (one connection, {} s). Open-file limit for this run: {fd_limit}.",
            list(&params.workers),
            list(&params.endpoints),
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            params.seconds,
            params.rounds,
            params.max_warmup_s,
            params.body_endpoints,
            list(&params.bodies),
            params.seconds,
            params.unloaded_seconds
        ),
        notes,
        elapsed_s: started.elapsed().as_secs_f64(),
        smoke,
    };
    let md = overhead::markdown(&report);
    write(
        out,
        "overhead.json",
        &(serde_json::to_string_pretty(&report.rows).map_err(|e| e.to_string())? + "\n"),
    )?;
    write(out, "overhead.md", &md)?;
    println!("{md}");
    eprintln!("model-bench: wrote {}/overhead.{{json,md}}", out.display());
    Ok(())
}

/// A keep-alive HTTP/1.1 GET client for one server's `/load`, reconnecting when needed.
struct KeepAlive {
    addr: String,
    stream: Option<BufReader<std::net::TcpStream>>,
}

impl KeepAlive {
    fn new(addr: String) -> Self {
        Self { addr, stream: None }
    }

    fn connect(&self) -> Option<BufReader<std::net::TcpStream>> {
        let stream = std::net::TcpStream::connect(&self.addr).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        let _ = stream.set_nodelay(true);
        Some(BufReader::new(stream))
    }

    /// The body of `GET path`, or `None` (the connection is then dropped and remade next time).
    fn get(&mut self, path: &str) -> Option<String> {
        for _ in 0..2 {
            if self.stream.is_none() {
                self.stream = self.connect();
            }
            let stream = self.stream.as_mut()?;
            let result = (|| -> Option<String> {
                write!(
                    stream.get_mut(),
                    "GET {path} HTTP/1.1\r\nhost: bench\r\n\r\n"
                )
                .ok()?;
                let mut line = String::new();
                stream.read_line(&mut line).ok()?;
                let status: u16 = line.split_whitespace().nth(1)?.parse().ok()?;
                let mut length = None;
                loop {
                    line.clear();
                    stream.read_line(&mut line).ok()?;
                    let l = line.trim_end();
                    if l.is_empty() {
                        break;
                    }
                    if let Some((k, v)) = l.split_once(':') {
                        if k.eq_ignore_ascii_case("content-length") {
                            length = v.trim().parse::<usize>().ok();
                        }
                    }
                }
                let mut body = vec![0u8; length?];
                stream.read_exact(&mut body).ok()?;
                (status == 200).then(|| String::from_utf8_lossy(&body).into_owned())
            })();
            if result.is_some() {
                return result;
            }
            self.stream = None;
        }
        None
    }
}

/// Samples every server's requests in flight (`GET /load`: running + waiting) every `every`
/// in a thread of its own, until stopped.
struct Sampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<Vec<u32>>>>,
}

impl Sampler {
    fn start(ports: &[u16], every: Duration) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = std::sync::Arc::clone(&stop);
        let mut clients: Vec<KeepAlive> = ports
            .iter()
            .map(|p| KeepAlive::new(format!("127.0.0.1:{p}")))
            .collect();
        let thread = std::thread::spawn(move || {
            let mut sweeps = Vec::new();
            let mut next = Instant::now();
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                let sweep: Option<Vec<u32>> = clients
                    .iter_mut()
                    .map(|c| {
                        let body = c.get("/load")?;
                        let v: Value = serde_json::from_str(&body).ok()?;
                        v["server_load"].as_u64().map(|n| n as u32)
                    })
                    .collect();
                // A sweep with a server that did not answer is left out, not guessed.
                if let Some(sweep) = sweep {
                    sweeps.push(sweep);
                }
                next += every;
                let now = Instant::now();
                if next > now {
                    std::thread::sleep(next - now);
                } else {
                    next = now;
                }
            }
            sweeps
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> Vec<Vec<u32>> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A minimal HTTP/1.1 POST on a fresh connection: (status, the `x-served-by` header).
fn http_post_served_by(addr: &str, path: &str, body: &str) -> Option<(u16, Option<String>)> {
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .ok()?;
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let head = text
        .split_once("\r\n\r\n")
        .map_or(text.as_str(), |(h, _)| h);
    let served_by = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case("x-served-by")
            .then(|| v.trim().to_owned())
    });
    Some((status, served_by))
}

/// The simulated servers of a prefix run.
fn start_prefix_fleet(
    env: &Env,
    servers: u32,
    args: &[String],
) -> Result<(Vec<Proc>, Vec<u16>), String> {
    let mut procs = Vec::new();
    let mut ports = Vec::new();
    for i in 0..servers {
        let (proc, port) = env.server(3000 + u64::from(i), args)?;
        procs.push(proc);
        ports.push(port);
    }
    Ok((procs, ports))
}

/// Every server's counters, in port order.
fn prefix_counters(ports: &[u16]) -> Result<Vec<ServerCounters>, String> {
    ports
        .iter()
        .map(|port| {
            let (status, body) = http_get(&format!("127.0.0.1:{port}"), "/metrics")
                .ok_or_else(|| format!("model-server on port {port}: no /metrics"))?;
            if status != 200 {
                return Err(format!("model-server on port {port}: /metrics {status}"));
            }
            ServerCounters::parse(&body)
                .ok_or_else(|| format!("model-server on port {port}: no prefix-cache counters"))
        })
        .collect()
}

/// Two PREFIX_AWARE replicas in front of the same (fast) servers: does every key go to one
/// server, whichever replica and worker routes it?
fn prefix_agreement(env: &Env, params: &PrefixParams) -> Result<Agreement, String> {
    let mut args = params.server_args();
    // Fast: the check needs answers, not timing.
    if let Some(i) = args.iter().position(|a| a == "--time-scale") {
        args[i + 1] = "0.01".into();
    }
    let (fleet, ports) = start_prefix_fleet(env, params.servers, &args)?;
    let variant = params.variant(Policy::ModelLbPrefixAware);
    let config = proxy_config(&env.wasm(), &ports, std::slice::from_ref(&variant));
    let mut starting = Vec::new();
    for replica in ["a", "b"] {
        starting.push(env.spawn_envoy(
            &format!("prefix-replica-{replica}"),
            &config,
            params.envoy_concurrency,
        )?);
    }
    let mut addresses = Vec::new();
    for s in &mut starting {
        let (_, listeners) = env.await_envoy(s)?;
        addresses.push(address_of(&listeners, &variant.name)?);
    }
    let mut answers = Vec::new();
    for group in 0..params.groups {
        let mut per_replica: Vec<Vec<Option<String>>> = Vec::new();
        for addr in &addresses {
            let mut got = Vec::new();
            for repeat in 0..params.agreement_repeats {
                let body = params.agreement_body(group, repeat);
                got.push(
                    http_post_served_by(addr, "/v1/chat/completions", &body)
                        .filter(|(status, _)| *status == 200)
                        .and_then(|(_, b)| b),
                );
            }
            per_replica.push(got);
        }
        let b = per_replica.pop().unwrap_or_default();
        let a = per_replica.pop().unwrap_or_default();
        answers.push((group, a, b));
    }
    drop(starting);
    drop(fleet);
    Ok(agreement(&answers, params.servers))
}

/// One run: fresh servers, one Envoy for the policy, one `model-load`; the servers' counters at
/// the start and the end of the measured window, their requests in flight sampled throughout.
fn prefix_run(
    env: &Env,
    params: &PrefixParams,
    planned: &PrefixPlanned,
) -> Result<PrefixRun, String> {
    let policy = planned.policy;
    let (fleet, ports) = start_prefix_fleet(env, params.servers, &params.server_args())?;
    let variant = params.variant(policy);
    let config = proxy_config(&env.wasm(), &ports, std::slice::from_ref(&variant));
    let mut starting = env.spawn_envoy(
        &format!("prefix-{}", policy.id()),
        &config,
        params.envoy_concurrency,
    )?;
    let (admin, listeners) = env.await_envoy(&mut starting)?;
    let url = format!("http://{}", address_of(&listeners, &variant.name)?);
    let samples_path = env.work.join("samples.jsonl");
    let _ = std::fs::remove_file(&samples_path);
    let sampler = Sampler::start(&ports, Duration::from_millis(params.sample_every_ms));
    let load = Command::new(env.sim.join("model-load"))
        .args(["--url", &url])
        .args(params.load_args(planned.workload, planned.round))
        .args(["--label", policy.id()])
        .arg("--samples")
        .arg(&samples_path)
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("model-load: {e} (run `make sim`)"))?;
    let mut load = Proc::new(load, "model-load");
    let started = Instant::now();
    let mut watch = CpuWatch::new(vec![
        (render::LOAD, vec![load.pid()]),
        (render::ENVOY, vec![starting.proc.pid()]),
        (render::SERVER, fleet.iter().map(Proc::pid).collect()),
    ]);
    let window = [params.warmup_s, params.warmup_s + params.duration_s];
    let mut scraped: Vec<Vec<ServerCounters>> = Vec::new();
    let status = loop {
        if let Some(status) = load.child.try_wait().map_err(|e| e.to_string())? {
            break status;
        }
        let elapsed = started.elapsed().as_secs_f64();
        if let Some(&at) = window.get(scraped.len()) {
            if elapsed >= at {
                scraped.push(prefix_counters(&ports)?);
                continue;
            }
        }
        watch.sample();
        let next = window.get(scraped.len()).map_or(SAMPLE_EVERY, |&at| {
            Duration::from_secs_f64((at - elapsed).max(0.0))
        });
        std::thread::sleep(next.min(SAMPLE_EVERY));
    };
    watch.sample();
    let sweeps = sampler.finish();
    if !status.success() {
        return Err(format!(
            "model-load against {} failed ({status})",
            policy.id()
        ));
    }
    while scraped.len() < 2 {
        scraped.push(prefix_counters(&ports)?);
    }
    let filter = if policy.uses_filter() {
        // The filter flushes its counters on its housekeeping tick (1 s).
        std::thread::sleep(Duration::from_millis(1200));
        let body = http_get(
            &admin,
            &format!("/stats?filter=wasmcustom.model_lb.{}.", variant.name),
        )
        .map_or(String::new(), |(_, b)| b);
        Some(filter_stats(&body, &variant.name))
    } else {
        None
    };
    terminate(starting.proc.pid());
    let machine = watch.machine();
    let ours = watch.total();
    let cpu = Cpu {
        load: watch.usage(render::LOAD),
        envoy_busiest: watch.usage(render::ENVOY),
        envoy_total: watch.role_total(render::ENVOY),
        server_busiest: watch.usage(render::SERVER),
        servers_total: watch.role_total(render::SERVER),
        others: Usage {
            average: (machine.average - ours.average).max(0.0),
            peak: (machine.peak - ours.peak).max(0.0),
        },
        machine,
    };
    drop(starting);
    drop(fleet);
    Ok(PrefixRun {
        workload: planned.workload,
        policy,
        round: planned.round,
        run: Run {
            policy,
            users: params.users(),
            instances: params.servers,
            round: planned.round,
            samples: read_samples(&samples_path)?,
            warmup_s: params.warmup_s,
            duration_s: params.duration_s,
        },
        counters: ServerCounters::delta(&scraped[0], &scraped[1]),
        guard: guard(&sweeps, params.threshold),
        filter,
        cpu,
    })
}

fn prefix(env: &Env, params: &PrefixParams, smoke: bool, out: &Path) -> Result<(), String> {
    let started = Instant::now();
    let machine_at_start = machine();
    if !params.key_is_the_system_prompt() {
        eprintln!(
            "model-bench: note: system prompts of {} tokens are shorter than prefix_length {}: PREFIX_AWARE's key will include the conversation's first messages",
            params.system_prompt_tokens, params.prefix_length
        );
    }
    // Every policy's listener in one config, checked once.
    let variants: Vec<Variant> = params
        .all_policies()
        .into_iter()
        .map(|p| params.variant(p))
        .collect();
    let ports: Vec<u16> = (0..params.servers).map(|i| 8000 + i as u16).collect();
    env.validate("prefix", &proxy_config(&env.wasm(), &ports, &variants))?;
    let plan = params.plan();
    eprintln!(
        "model-bench: {} runs of {} s + {} s; {} servers, {} users; first, two Envoy replicas on {} keys",
        plan.len(),
        params.warmup_s,
        params.duration_s,
        params.servers,
        params.users(),
        params.groups
    );
    let agreement = prefix_agreement(env, params)?;
    eprintln!(
        "agreement: {} of {} keys on the same server from both replicas ({} of {} servers own keys, {}-{} keys each)",
        agreement.agreed,
        agreement.keys,
        agreement.servers_used,
        agreement.servers,
        agreement.keys_per_server.0,
        agreement.keys_per_server.1
    );
    let mut runs = Vec::new();
    for (i, planned) in plan.iter().enumerate() {
        let run = prefix_run(env, params, planned)?;
        let one = prefix_cells(std::slice::from_ref(&run));
        if let Some(c) = one.first() {
            let ms = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.0}"));
            eprintln!(
                "[{:>2}/{}] {:<6} {:<24} ttft p50 {:>5} ms  p99 {:>6} ms  {:>6.1}/instance/min  hit {:>5}  busiest {:>5}  most in flight {} ({})  errors {}",
                i + 1,
                plan.len(),
                planned.workload.id(),
                planned.policy.name(),
                ms(c.ttft_p50_ms),
                ms(c.stats.p99_ms),
                c.stats.throughput_per_instance_per_min,
                c.counters
                    .hit_rate_pct()
                    .map_or("-".into(), |v| format!("{v:.1}%")),
                c.busiest
                    .as_ref()
                    .map_or("-".into(), |(_, v)| format!("{v:.1}%")),
                c.guard.max,
                c.guard.max_while_room,
                c.stats.errors
            );
        }
        runs.push(run);
    }
    let report = PrefixReport {
        params: params.clone(),
        cells: prefix_cells(&runs),
        agreement,
        machine: machine_at_start,
        validation: "Every generated configuration passed `envoy --mode validate` first.".into(),
        elapsed_s: started.elapsed().as_secs_f64(),
        smoke,
    };
    let md = prefix_markdown(&report);
    write(out, "prefix.json", &prefix_json(&report.cells))?;
    write(out, "prefix.md", &md)?;
    let title = format!(
        "PREFIX_AWARE vs LOR and Envoy, {} servers, {} users, cache {} tokens ({})",
        params.servers,
        params.users(),
        params.prefix_cache_tokens,
        report.machine.date
    );
    write(out, "prefix.svg", &prefix_svg(&report.cells, &title))?;
    println!("{md}");
    eprintln!(
        "model-bench: wrote {}/prefix.{{json,md,svg}}",
        out.display()
    );
    Ok(())
}

fn prefix_params(args: &Args) -> Result<PrefixParams, String> {
    let mut p = if args.smoke {
        PrefixParams::smoke()
    } else {
        PrefixParams::full()
    };
    let fraction = |flag: &str, v: &str| -> Result<f64, String> {
        v.parse::<f64>()
            .ok()
            .filter(|x| *x > 0.0 && *x <= 1.0)
            .ok_or_else(|| format!("{flag} needs a number in (0, 1], not {v:?}"))
    };
    for (flag, value) in &args.options {
        let policies = || parse_prefix_policies(value).map_err(|e| format!("{flag}: {e}"));
        match flag.as_str() {
            "--rounds" => p.rounds = positive(flag, value)?,
            "--duration" => p.duration_s = positive(flag, value)?,
            "--warmup" => {
                p.warmup_s = value
                    .parse::<f64>()
                    .ok()
                    .filter(|w| *w >= 0.0)
                    .ok_or_else(|| format!("{flag} needs a number >= 0, not {value:?}"))?;
            }
            "--time-scale" => p.server.time_scale = fraction(flag, value)?,
            "--servers" => p.servers = positive(flag, value)?,
            "--users-per-server" => p.users_per_server = positive(flag, value)?,
            "--threshold" => p.threshold = positive(flag, value)?,
            "--cache-tokens" => p.prefix_cache_tokens = positive(flag, value)?,
            "--groups" => p.groups = positive(flag, value)?,
            "--workloads" => {
                p.workloads = value
                    .split(',')
                    .map(|id| {
                        PrefixWorkload::from_id(id.trim()).ok_or_else(|| {
                            format!("{flag}: unknown {id:?}; known: shared, unique, hot")
                        })
                    })
                    .collect::<Result<_, _>>()?;
            }
            "--shared-policies" => p.shared_policies = policies()?,
            "--unique-policies" => p.unique_policies = policies()?,
            "--hot-policies" => p.hot_policies = policies()?,
            _ => return Err(format!("prefix does not take {flag}\n\n{USAGE}")),
        }
    }
    if p.prefix_cache_tokens > p.kv_cache_tokens {
        p.kv_cache_tokens = p.prefix_cache_tokens;
    }
    Ok(p)
}

/// Parsed command line.
struct Args {
    command: String,
    smoke: bool,
    out: PathBuf,
    options: Vec<(String, String)>,
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
    let command = args.next().ok_or(USAGE)?;
    if command == "-h" || command == "--help" {
        return Err(USAGE.into());
    }
    let mut parsed = Args {
        command,
        smoke: false,
        out: PathBuf::from("bench/results"),
        options: Vec::new(),
    };
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--smoke" => parsed.smoke = true,
            "-h" | "--help" => return Err(USAGE.into()),
            flag if flag.starts_with("--") => {
                let value = args
                    .next()
                    .ok_or_else(|| format!("{flag} needs a value\n\n{USAGE}"))?;
                if flag == "--out" {
                    parsed.out = PathBuf::from(value);
                } else {
                    parsed.options.push((flag.to_owned(), value));
                }
            }
            other => return Err(format!("unexpected argument {other:?}\n\n{USAGE}")),
        }
    }
    Ok(parsed)
}

fn positive<T: std::str::FromStr + PartialOrd + Default>(flag: &str, v: &str) -> Result<T, String> {
    v.parse::<T>()
        .ok()
        .filter(|n| *n > T::default())
        .ok_or_else(|| format!("{flag} needs a positive number, not {v:?}"))
}

fn matrix_params(args: &Args) -> Result<MatrixParams, String> {
    let mut p = if args.smoke {
        MatrixParams::smoke()
    } else {
        MatrixParams::full()
    };
    for (flag, value) in &args.options {
        match flag.as_str() {
            "--sizes" => p.sizes = parse_sizes(value)?,
            "--rounds" => p.rounds = positive(flag, value)?,
            "--duration" => p.duration_s = positive(flag, value)?,
            "--policies" => {
                p.policies = value
                    .split(',')
                    .map(|id| {
                        Policy::from_id(id.trim()).ok_or_else(|| {
                            let all: Vec<&str> = Policy::ALL.iter().map(|p| p.id()).collect();
                            format!("--policies: unknown {id:?}; known: {}", all.join(", "))
                        })
                    })
                    .collect::<Result<_, _>>()?;
            }
            _ => return Err(format!("matrix does not take {flag}\n\n{USAGE}")),
        }
    }
    Ok(p)
}

fn overhead_params(args: &Args) -> Result<OverheadParams, String> {
    let mut p = if args.smoke {
        OverheadParams {
            rounds: 1,
            seconds: 1,
            endpoints: vec![4],
            workers: vec![1, 4],
            bodies: vec![1024, 65536],
            body_endpoints: 4,
            unloaded_seconds: 1,
            max_warmup_s: 0,
        }
    } else {
        OverheadParams {
            rounds: 3,
            seconds: 5,
            endpoints: vec![4, 256, 1024],
            workers: vec![1, 4, 16],
            bodies: vec![1024, 65536, 1 << 20],
            body_endpoints: 4,
            unloaded_seconds: 2,
            max_warmup_s: 12,
        }
    };
    let list = |flag: &str, value: &str| -> Result<Vec<u32>, String> {
        value.split(',').map(|n| positive(flag, n.trim())).collect()
    };
    for (flag, value) in &args.options {
        match flag.as_str() {
            "--rounds" => p.rounds = positive(flag, value)?,
            "--seconds" => p.seconds = positive(flag, value)?,
            "--endpoints" => p.endpoints = list(flag, value)?,
            "--workers" => p.workers = list(flag, value)?,
            "--bodies" => {
                p.bodies = if value == "none" {
                    Vec::new()
                } else {
                    list(flag, value)?
                };
                if p.bodies.iter().any(|&b| b < 256) {
                    return Err("--bodies: each body needs at least 256 bytes".into());
                }
            }
            _ => return Err(format!("overhead does not take {flag}\n\n{USAGE}")),
        }
    }
    if !p.bodies.is_empty() && !p.endpoints.contains(&p.body_endpoints) {
        p.body_endpoints = p.endpoints.iter().copied().min().unwrap_or(4);
    }
    Ok(p)
}

/// The replicas benchmark's parameters, and whether a `--*policies` flag named a policy with
/// server load (then a filter that rejects it is an error, not a skip).
fn replicas_params(args: &Args) -> Result<(ReplicasParams, bool), String> {
    let mut p = if args.smoke {
        ReplicasParams::smoke()
    } else {
        ReplicasParams::full()
    };
    let mut explicit = false;
    let fraction = |flag: &str, v: &str| -> Result<f64, String> {
        v.parse::<f64>()
            .ok()
            .filter(|x| *x > 0.0 && *x <= 1.0)
            .ok_or_else(|| format!("{flag} needs a number in (0, 1], not {v:?}"))
    };
    for (flag, value) in &args.options {
        let policies = || parse_policies(value).map_err(|e| format!("{flag}: {e}"));
        match flag.as_str() {
            "--replicas" => {
                p.replicas = value
                    .split(',')
                    .map(|n| positive(flag, n.trim()))
                    .collect::<Result<_, _>>()?;
            }
            "--rounds" => p.rounds = positive(flag, value)?,
            "--duration" => p.duration_s = positive(flag, value)?,
            "--warmup" => {
                p.warmup_s = value
                    .parse::<f64>()
                    .ok()
                    .filter(|w| *w >= 0.0)
                    .ok_or_else(|| format!("{flag} needs a number >= 0, not {value:?}"))?;
            }
            "--time-scale" => p.server.time_scale = fraction(flag, value)?,
            "--load" => p.load = fraction(flag, value)?,
            "--servers" => p.servers = positive(flag, value)?,
            "--scenarios" => {
                p.scenarios = value
                    .split(',')
                    .map(|id| {
                        Scenario::from_id(id.trim()).ok_or_else(|| {
                            format!("{flag}: unknown {id:?}; known: open, mixed, closed")
                        })
                    })
                    .collect::<Result<_, _>>()?;
            }
            "--policies" => p.policies = policies()?,
            "--mixed-policies" => p.mixed_policies = policies()?,
            "--closed-policies" => p.closed_policies = policies()?,
            _ => return Err(format!("replicas does not take {flag}\n\n{USAGE}")),
        }
        if flag.ends_with("policies") {
            explicit |= policies()?.iter().any(|p| p.needs_server_load());
        }
    }
    if p.closed_shares.len() > p.servers as usize {
        return Err("--servers: fewer servers than closed-loop replicas".into());
    }
    Ok((p, explicit))
}

fn run(args: &Args) -> Result<(), String> {
    match args.command.as_str() {
        "matrix" => {
            let params = matrix_params(args)?;
            let env = Env::new()?;
            let result = matrix(&env, &params, args.smoke, &args.out);
            let _ = std::fs::remove_dir_all(&env.work);
            result
        }
        "overhead" => {
            let params = overhead_params(args)?;
            let env = Env::new()?;
            let result = overhead(&env, &params, args.smoke, &args.out);
            let _ = std::fs::remove_dir_all(&env.work);
            result
        }
        "prefix" => {
            let params = prefix_params(args)?;
            let env = Env::new()?;
            let result = prefix(&env, &params, args.smoke, &args.out);
            let _ = std::fs::remove_dir_all(&env.work);
            result
        }
        "replicas" => {
            let (params, explicit) = replicas_params(args)?;
            let env = Env::new()?;
            let result = replicas(&env, &params, explicit, args.smoke, &args.out);
            let _ = std::fs::remove_dir_all(&env.work);
            result
        }
        other => Err(format!("unknown command {other:?}\n\n{USAGE}")),
    }
}

fn main() -> ExitCode {
    stop_children_on_signal();
    match parse_args(std::env::args().skip(1)).and_then(|args| run(&args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("model-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
