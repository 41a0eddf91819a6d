//! `cargo xtask audit`: cargo-deny (advisories, licenses, bans, sources) against the RustSec
//! advisories kept in this repository under `deny/advisory-db`, since CI reaches only the
//! package registries. cargo-deny wants its database as a git checkout under `db-path`
//! (`deny.toml`) in a folder named after the database URL; this lays one out from the
//! snapshot, dated by the snapshot's date so that `maximum-db-staleness` tells when it is old.
//! `--refresh DIR` takes the advisories of every crate in the lock file from a clone of
//! the RustSec advisory database at DIR.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Context as _;

use crate::run::{root, run as run_cmd};

/// cargo-deny 0.20's folder for `https://github.com/rustsec/advisory-db` under `db-path`.
const DB_FOLDER: &str = "advisory-db-3157b0e258782691";

fn snapshot() -> PathBuf {
    root().join("deny/advisory-db")
}

pub fn run(refresh: Option<PathBuf>) -> anyhow::Result<()> {
    if let Some(clone) = refresh {
        return refresh_from(&clone);
    }
    eprintln!("== audit (cargo deny, advisory snapshot of {})", snapshot_date()?);
    lay_out_db()?;
    // Every package of the lock file, so that `cargo metadata` runs offline.
    run_cmd(Command::new("cargo").current_dir(root()).args(["fetch", "--locked", "--quiet"]))?;
    run_cmd(Command::new("cargo").current_dir(root()).args(["deny", "--offline", "check"]))
}

fn snapshot_date() -> anyhow::Result<String> {
    let path = snapshot().join("DATE");
    let date = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok(date.trim().to_string())
}

/// `target/advisory-dbs/<DB_FOLDER>`: the snapshot's `crates/` as one commit of its date.
fn lay_out_db() -> anyhow::Result<()> {
    let db = root().join("target/advisory-dbs").join(DB_FOLDER);
    if db.exists() {
        std::fs::remove_dir_all(&db).with_context(|| format!("removing {}", db.display()))?;
    }
    std::fs::create_dir_all(&db)?;
    copy_dir(&snapshot().join("crates"), &db.join("crates"))?;
    let date = format!("{}T00:00:00Z", snapshot_date()?);
    let git = |args: &[&str]| {
        let mut c = Command::new("git");
        c.current_dir(&db)
            .args([
                "-c",
                "user.name=lb-audit",
                "-c",
                "user.email=lb-audit@localhost",
                "-c",
                "commit.gpgsign=false",
            ])
            .args(args)
            .env("GIT_AUTHOR_DATE", &date)
            .env("GIT_COMMITTER_DATE", &date);
        c
    };
    run_cmd(&mut git(&["init", "--quiet"]))?;
    run_cmd(&mut git(&["add", "--all"]))?;
    run_cmd(&mut git(&["commit", "--quiet", "-m", "RustSec advisories of this project's crates"]))
}

fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

/// Replaces the snapshot with the advisories, from the clone at `clone`, of every crate the
/// lock file names, and dates it today.
fn refresh_from(clone: &Path) -> anyhow::Result<()> {
    let source = clone.join("crates");
    anyhow::ensure!(
        source.is_dir(),
        "{} has no crates/ folder: not a RustSec advisory-db clone",
        clone.display()
    );
    let lock = std::fs::read_to_string(root().join("Cargo.lock"))?;
    let names: BTreeSet<&str> =
        lock.lines().filter_map(|l| l.strip_prefix("name = \"")?.strip_suffix('"')).collect();
    let dest = snapshot().join("crates");
    if dest.exists() {
        std::fs::remove_dir_all(&dest)?;
    }
    let mut copied = 0;
    for name in &names {
        let from = source.join(name);
        if from.is_dir() {
            copy_dir(&from, &dest.join(name))?;
            copied += std::fs::read_dir(&from)?.count();
        }
    }
    let today = String::from_utf8(Command::new("date").args(["-u", "+%Y-%m-%d"]).output()?.stdout)?;
    std::fs::write(snapshot().join("DATE"), today.trim().to_string() + "\n")?;
    eprintln!("audit: {copied} advisories of {} crates copied into {}", names.len(), dest.display());
    Ok(())
}
