//! Scratch network namespaces: for the benchmarks' kernel baselines and forwarding, and for
//! tests that need an interface of their own.

use std::{
    fs,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};

/// A network namespace of our own (`lbb<pid><role>`), removed on drop.
pub struct Scratch(pub String);

impl Scratch {
    pub fn new(role: &str) -> anyhow::Result<Scratch> {
        let name = format!("lbb{}{role}", std::process::id());
        let ok = Command::new("ip").args(["netns", "add", &name]).status()?.success();
        ensure!(ok, "ip netns add {name}");
        Ok(Scratch(name))
    }

    /// Runs `cmd args < input` in the namespace; the time, or None past `limit` (killed).
    pub fn time(
        &self,
        cmd: &str,
        args: &[&str],
        input: &Path,
        limit: Duration,
    ) -> anyhow::Result<Option<Duration>> {
        // Errors go to a file: a pipe nobody reads until exit can fill up and stall the tool.
        let err_path = input.with_extension("err");
        let t = Instant::now();
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.0, cmd])
            .args(args)
            .stdin(fs::File::open(input)?)
            .stdout(Stdio::null())
            .stderr(fs::File::create(&err_path)?)
            .spawn()
            .with_context(|| format!("starting {cmd}"))?;
        loop {
            if let Some(status) = child.try_wait()? {
                if !status.success() {
                    let err = fs::read_to_string(&err_path).unwrap_or_default();
                    let err: String = err.lines().take(5).collect::<Vec<_>>().join("\n");
                    bail!("{cmd} {}: {status}: {err}", args.join(" "));
                }
                return Ok(Some(t.elapsed()));
            }
            if t.elapsed() > limit {
                let _ = child.kill();
                let _ = child.wait();
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn reset(&self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        let _ = Command::new("ip").args(["netns", "add", &self.0]).status();
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// A scratch namespace `role` with a veth pair `lbb0`/`lbb1` up, forwarding on, and each of
/// `routes` (`ip route add ROUTE dev lbb0`): an interface a pod could sit behind, for the
/// pod source check's FIB lookup.
pub fn routed_veth(role: &str, routes: &[&str]) -> anyhow::Result<Scratch> {
    let ns = Scratch::new(role)?;
    let setup = ["link add lbb0 type veth peer name lbb1", "link set lbb0 up", "link set lbb1 up"];
    let routes = routes.iter().map(|r| format!("route add {r} dev lbb0"));
    for args in setup.iter().map(|s| s.to_string()).chain(routes) {
        crate::lab::nsip(&ns.0, &args)?;
    }
    crate::lab::sysctl(&ns.0, "net.ipv4.ip_forward", "1")?;
    Ok(ns)
}
