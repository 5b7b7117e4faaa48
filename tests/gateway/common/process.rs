//! The real `onecard` binary as a child process, for tests that kill it
//! (SIGKILL) and start it again on the same data directory.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use onecard::app::server::{Addrs, LISTENERS_FILE};

use super::TOKEN;

/// The real binary on `dir/data`, with `terminals` development terminal
/// certificates and `extra` appended to its config.
pub fn spawn_gateway(dir: &Path, terminals: u32, extra: &str) -> Child {
    spawn_gateway_env(dir, terminals, extra, &[])
}

/// As [`spawn_gateway`], with `env` set for the process (for example
/// `ONECARD_CRASH_AT`, a crash point: src/crashpoint.rs).
pub fn spawn_gateway_env(dir: &Path, terminals: u32, extra: &str, env: &[(&str, &str)]) -> Child {
    spawn_gateway_full(dir, terminals, "", extra, env)
}

/// As [`spawn_gateway_env`], with `terminal` added to the `[terminal]`
/// section (`crl = [...]`).
pub fn spawn_gateway_full(
    dir: &Path,
    terminals: u32,
    terminal: &str,
    extra: &str,
    env: &[(&str, &str)],
) -> Child {
    let config = dir.join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\n[terminal]\naddr = \"127.0.0.1:0\"\ndev_certs = true\ndev_terminals = {terminals}\n{terminal}\n[admin]\naddr = \"127.0.0.1:0\"\n[limits]\nterminal_rate_per_s = 100000\nterminal_burst = 100000\n# Tests share two CPUs: another test's load must not shed this one's.\noverload_lag_ms = 0\nrequests_in_flight_max = 4096\n{extra}",
            dir.join("data")
        ),
    )
    .unwrap();
    let _ = std::fs::remove_file(dir.join("data").join(LISTENERS_FILE));
    Command::new(env!("CARGO_BIN_EXE_onecard"))
        .args(["serve", "--config"])
        .arg(&config)
        .env("ONECARD_ADMIN_TOKEN", TOKEN)
        .env("RUST_LOG", "warn")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the onecard binary starts")
}

/// Waits until the gateway has written its bound addresses (it does so once
/// it is ready), or the process exits.
pub fn wait_ready(child: &mut Child, dir: &Path) -> Addrs {
    match try_wait_ready(child, dir) {
        Ok(addrs) => addrs,
        Err(status) => panic!("gateway exited before becoming ready: {status}"),
    }
}

/// As [`wait_ready`], but a gateway that exits first (a crash point
/// reached during start-up) is an answer, not a failure.
pub fn try_wait_ready(child: &mut Child, dir: &Path) -> Result<Addrs, std::process::ExitStatus> {
    beside_workers(|| poll_ready(child, dir))
}

/// Runs `f`, which blocks (sleeps, waits for a process), beside the
/// runtime's workers when the test runs on a multi-threaded runtime
/// (`block_in_place`): the receivers and other tasks of the test go on
/// meanwhile. Blocking a worker instead stalled the simulation's
/// in-process receiver under CI's load until a control call to it failed.
/// A current-thread runtime has no other worker to hand its tasks to.
pub fn beside_workers<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

fn poll_ready(child: &mut Child, dir: &Path) -> Result<Addrs, std::process::ExitStatus> {
    let file = dir.join("data").join(LISTENERS_FILE);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(text) = std::fs::read_to_string(&file) {
            if let Ok(addrs) = serde_json::from_str::<Addrs>(&text) {
                return Ok(addrs);
            }
        }
        if let Some(status) = child.try_wait().unwrap() {
            return Err(status);
        }
        assert!(Instant::now() < deadline, "gateway not ready within 60 s");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits up to `within` for the process to exit; its status, if it did.
pub fn wait_exit(child: &mut Child, within: Duration) -> Option<std::process::ExitStatus> {
    beside_workers(|| poll_exit(child, within))
}

fn poll_exit(child: &mut Child, within: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Child processes killed (SIGKILL) and reaped when dropped: a test that
/// fails half-way does not leave its gateways running.
#[derive(Default)]
pub struct Children(pub Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
