//! Scratch network namespaces for the kernel baselines and the forwarding benchmarks.

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
