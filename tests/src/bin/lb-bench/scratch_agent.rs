//! The real `lb agent` alone in a scratch network namespace, with a bpffs of its own and map
//! capacities sized for N Services: what `memory` and `churn` run. Everything it made (the
//! process, pins, mount, namespace, work folder) goes when it is dropped.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use lb_tests::{lab::Bins, netns::Scratch};

use lb_userspace::loader::Capacities;

pub struct ScratchAgent {
    pub ns: Scratch,
    pub work: PathBuf,
    pub pin_dir: PathBuf,
    bpffs: PathBuf,
    lb: PathBuf,
    agent: Option<Child>,
    /// `<work>/manifests` is a tmpfs of ours (`manifests_in_memory`), unmounted on drop.
    manifests_tmpfs: bool,
}

impl ScratchAgent {
    /// The namespace, work folder (`<work>/manifests` made) and bpffs for a run named `role`.
    pub fn prepare(role: &str, bins: &Bins) -> anyhow::Result<ScratchAgent> {
        let ns = Scratch::new(role)?;
        // Loopback: the API stand-in and the agent's own endpoints listen there.
        let up = Command::new("ip").args(["-n", &ns.0, "link", "set", "lo", "up"]).status()?.success();
        ensure!(up, "ip -n {} link set lo up", ns.0);
        let work = std::env::temp_dir().join(format!("lb-bench-{role}-{}", std::process::id()));
        // A bpffs of our own, outside /sys: `ip netns exec` remounts /sys, so pins under it
        // would be invisible to this process.
        let bpffs = work.join("bpf");
        let me = ScratchAgent {
            ns,
            pin_dir: bpffs.join("lb"),
            work,
            bpffs,
            lb: bins.lb.clone(),
            agent: None,
            manifests_tmpfs: false,
        };
        fs::create_dir_all(me.work.join("manifests"))?;
        fs::create_dir_all(&me.bpffs)?;
        let mounted = Command::new("mount").args(["-t", "bpf", "bpf"]).arg(&me.bpffs).status()?.success();
        ensure!(mounted, "mount -t bpf bpf {}", me.bpffs.display());
        Ok(me)
    }

    /// Puts the manifest folder on a tmpfs (before anything is written there): a generator
    /// writing and renaming thousands of files a second on the disk's filesystem waits on its
    /// journal, and that wait is the generator's, not the agent's. The state folder stays on
    /// disk, as a node's would.
    pub fn manifests_in_memory(&mut self) -> anyhow::Result<()> {
        let dir = self.work.join("manifests");
        let mounted = Command::new("mount").args(["-t", "tmpfs", "lb-bench"]).arg(&dir).status()?.success();
        ensure!(mounted, "mount -t tmpfs lb-bench {}", dir.display());
        self.manifests_tmpfs = true;
        Ok(())
    }

    /// Starts the agent (node `bench`, capacities `caps`, else the agent's defaults) with
    /// `source` (its `--manifests` or `--kubeconfig`) and `extra` flags; returns when it
    /// started.
    pub fn start(
        &mut self,
        caps: Option<&Capacities>,
        source: &[&str],
        extra: &[&str],
    ) -> anyhow::Result<Instant> {
        let log = fs::File::create(self.work.join("agent.log"))?;
        let flags = caps.map(|caps| {
            [
                ("--max-frontends", caps.frontends),
                ("--max-services", caps.services),
                ("--max-backends", caps.backends),
                ("--max-maglev-slots", caps.maglev_slots),
                ("--max-members", caps.members),
            ]
        });
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns.0])
            .arg(&self.lb)
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .arg("agent");
        cmd.args(source).arg("--state-dir").arg(self.work.join("state"));
        cmd.args(["--cgroup-root", "off", "--node-name", "bench"]).args(extra);
        for (flag, v) in flags.into_iter().flatten() {
            cmd.arg(flag).arg(v.to_string());
        }
        let t0 = Instant::now();
        self.agent = Some(cmd.stdout(Stdio::null()).stderr(log).spawn().context("starting lb agent")?);
        Ok(t0)
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.work.join("agent.log")).unwrap_or_default()
    }

    /// Waits (up to `limit`) for the agent's log to say it synced `n` services, every one
    /// programmed; the time since `t0`.
    pub fn wait_synced(&mut self, n: u32, t0: Instant, limit: Duration) -> anyhow::Result<f64> {
        let want = format!("synced: {n} services (0 not programmed)");
        loop {
            let text = self.log();
            if text.contains(&want) {
                return Ok(t0.elapsed().as_secs_f64());
            }
            let exited = self.agent.as_mut().map(|a| a.try_wait()).transpose()?.flatten().is_some();
            ensure!(!exited && t0.elapsed() < limit, "the agent did not sync {n} services:\n{text}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The agent's pid (`ip netns exec` execs it: the child's pid is the agent's).
    /// Waits until the agent's state folder holds a copy of every manifest file of `dir` (the
    /// copies of 100 000 files take tens of seconds on a slow disk: one-time work of a start).
    pub fn wait_for_copies(&self, dir: &Path, limit: Duration) -> anyhow::Result<()> {
        let yaml_files = |d: &Path| -> usize {
            fs::read_dir(d)
                .map(|r| {
                    r.filter_map(Result::ok)
                        .filter(|e| e.path().extension().is_some_and(|x| x == "yaml"))
                        .count()
                })
                .unwrap_or(0)
        };
        let state = self.work.join("state/manifests");
        let (want, t0) = (yaml_files(dir), Instant::now());
        while yaml_files(&state) < want {
            ensure!(
                t0.elapsed() < limit,
                "the agent copied {} of {want} files in {limit:?}",
                yaml_files(&state)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    }

    pub fn pid(&self) -> u32 {
        self.agent.as_ref().map(|a| a.id()).unwrap_or(0)
    }

    /// A field of the agent's `/proc/PID/status`, in KiB.
    pub fn status_kib(&self, field: &str) -> Option<u64> {
        let text = fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        let line = text.lines().find(|l| l.starts_with(field))?;
        line.split_whitespace().nth(1)?.parse().ok()
    }

    /// The value of `series` (name and labels) on the agent's `/metrics` page.
    pub fn metric(&self, series: &str) -> Option<u64> {
        // A scrape at 100 000 Services reads 500 000 counters: more room than the lab's.
        let page = lb_tests::lab::metrics_in(&self.ns.0, 5).ok()?;
        lb_tests::lab::Lab::metric(&page, series)
    }

    /// The agent's CPU time so far (user + system), in seconds.
    pub fn cpu_seconds(&self) -> f64 {
        let stat = fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap_or_default();
        // After the command name's closing parenthesis: state is field 3, utime 14, stime 15.
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let f: Vec<&str> = rest.split_whitespace().collect();
        // `rest` starts at field 3, so field k is f[k - 3].
        match (f.get(11).and_then(|x| x.parse::<u64>().ok()), f.get(12).and_then(|x| x.parse::<u64>().ok())) {
            (Some(u), Some(s)) => (u + s) as f64 / 100.0,
            _ => 0.0,
        }
    }

    /// Stops the agent (SIGTERM) and waits for it.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(mut agent) = self.agent.take() {
            // SAFETY: signalling the agent this process started.
            unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) };
            agent.wait()?;
        }
        Ok(())
    }
}

impl Drop for ScratchAgent {
    fn drop(&mut self) {
        let _ = self.stop();
        let _ = Command::new("ip")
            .args(["netns", "exec", &self.ns.0])
            .arg(&self.lb)
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .args(["agent", "--cleanup"])
            .output();
        let _ = fs::remove_dir_all(&self.pin_dir);
        let _ = Command::new("umount").arg(&self.bpffs).status();
        if self.manifests_tmpfs {
            let _ = Command::new("umount").arg(self.work.join("manifests")).status();
        }
        let _ = fs::remove_dir_all(&self.work);
    }
}
