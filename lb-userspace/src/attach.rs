//! Attaching the loaded programs to interfaces: XDP in native (driver) mode with a loud
//! fallback to generic mode, TC ingress through tcx (kernel >= 6.6) with a fallback to a
//! clsact qdisc + netlink filter.
//!
//! `attach_*_link` return links owned by the `Ebpf` object (gone with it). The agent uses
//! `attach_pinned`: the bpf_link is pinned under `<pin dir>/links/`, so the program stays
//! attached when the agent stops, and a restarted agent swaps its new program into the same
//! link atomically (`bpf_link_update`): no packet ever meets an interface without the
//! datapath. Removing the pin (or the whole pin dir) detaches it.

use std::path::{Path, PathBuf};

use aya::{
    Ebpf,
    programs::{
        SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        tc::{NlOptions, SchedClassifierLink, SchedClassifierLinkId, TcAttachOptions, qdisc_add_clsact},
        xdp::{XdpLink, XdpLinkId},
    },
};

use crate::loader::{TC_PROGRAM, XDP_PROGRAM};

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("attaching {program} to {iface}: {source}")]
    Program { program: &'static str, iface: String, source: aya::programs::ProgramError },
    #[error("program {0} missing (was the object loaded?)")]
    Missing(&'static str),
}

/// How a program ended up attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attached {
    XdpNative,
    /// Generic (skb) XDP: works everywhere, much slower. Reported by the caller as a warning,
    /// a metric and in `lb status`.
    XdpGeneric,
    Tcx,
    TcClsact,
    /// Took over the link a previous agent pinned (its mode is unchanged).
    Replaced,
}

/// Which hook, for pin names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    Xdp,
    Tc,
}

impl Hook {
    fn name(self) -> &'static str {
        match self {
            Hook::Xdp => "xdp",
            Hook::Tc => "tc",
        }
    }
}

/// Where the link of `hook` on `iface` is pinned.
pub fn link_pin_path(pin_dir: &Path, hook: Hook, iface: &str) -> PathBuf {
    pin_dir.join("links").join(format!("{}-{iface}", hook.name()))
}

/// What keeps an attachment alive.
#[derive(Debug)]
pub enum Holder {
    /// The pin in bpffs: survives the agent.
    Pinned(PathBuf),
    /// A link the `Ebpf` object owns (netlink attachments cannot be pinned): detached with
    /// it, when the agent exits.
    OwnedXdp(XdpLinkId),
    OwnedTc(SchedClassifierLinkId),
}

impl Holder {
    /// Releases the attachment: unpins (detaching the program) or detaches the owned link.
    pub fn release(self, ebpf: &mut Ebpf) {
        match self {
            Holder::Pinned(path) => {
                let _ = std::fs::remove_file(path);
            }
            Holder::OwnedXdp(id) => {
                if let Some(Ok(prog)) = ebpf.program_mut(XDP_PROGRAM).map(<&mut Xdp>::try_from) {
                    let _ = prog.detach(id);
                }
            }
            Holder::OwnedTc(id) => detach_tc(ebpf, id),
        }
    }
}

/// Attaches `hook`'s program to `iface`, taking over a link pinned by an earlier agent if
/// there is a live one, and pins the result.
pub fn attach_pinned(
    ebpf: &mut Ebpf,
    hook: Hook,
    iface: &str,
    pin_dir: &Path,
) -> Result<(Attached, Holder), AttachError> {
    let path = link_pin_path(pin_dir, hook, iface);
    let _ = std::fs::create_dir_all(path.parent().unwrap_or(pin_dir));
    let err =
        |program: &'static str| move |source| AttachError::Program { program, iface: iface.into(), source };
    match hook {
        Hook::Xdp => {
            let replaced = take_over(&path).and_then(|fd| XdpLink::try_from(fd).ok()).and_then(|link| {
                let prog: &mut Xdp = ebpf.program_mut(XDP_PROGRAM)?.try_into().ok()?;
                prog.attach_to_link(link).ok()
            });
            let (how, id) = match replaced {
                Some(id) => (Attached::Replaced, id),
                None => attach_xdp_link(ebpf, iface)?,
            };
            let prog: &mut Xdp = ebpf
                .program_mut(XDP_PROGRAM)
                .ok_or(AttachError::Missing(XDP_PROGRAM))?
                .try_into()
                .map_err(err(XDP_PROGRAM))?;
            let link = prog.take_link(id).map_err(err(XDP_PROGRAM))?;
            match FdLink::try_from(link).map(|fd| fd.pin(&path)) {
                Ok(Ok(_)) => Ok((how, Holder::Pinned(path))),
                // A netlink attachment (old kernel): the conversion dropped (detached) it;
                // attach again and keep it owned.
                _ => attach_xdp_link(ebpf, iface).map(|(how, id)| (how, Holder::OwnedXdp(id))),
            }
        }
        Hook::Tc => {
            let replaced =
                take_over(&path).and_then(|fd| SchedClassifierLink::try_from(fd).ok()).and_then(|link| {
                    let prog: &mut SchedClassifier = ebpf.program_mut(TC_PROGRAM)?.try_into().ok()?;
                    prog.attach_to_link(link).ok()
                });
            let (how, id) = match replaced {
                Some(id) => (Attached::Replaced, id),
                None => attach_tc_link(ebpf, iface)?,
            };
            if how == Attached::TcClsact {
                return Ok((how, Holder::OwnedTc(id)));
            }
            let prog: &mut SchedClassifier = ebpf
                .program_mut(TC_PROGRAM)
                .ok_or(AttachError::Missing(TC_PROGRAM))?
                .try_into()
                .map_err(err(TC_PROGRAM))?;
            let link = prog.take_link(id).map_err(err(TC_PROGRAM))?;
            match FdLink::try_from(link).map(|fd| fd.pin(&path)) {
                Ok(Ok(_)) => Ok((how, Holder::Pinned(path))),
                _ => attach_tc_link(ebpf, iface).map(|(how, id)| (how, Holder::OwnedTc(id))),
            }
        }
    }
}

/// The link pinned at `path`, if one is there. The pin is removed at once: the link is
/// pinned again once it runs our program; a stale one (its interface went away, which
/// detached it) is simply dropped and the caller attaches afresh.
fn take_over(path: &Path) -> Option<FdLink> {
    PinnedLink::from_pin(path).ok()?.unpin().ok()
}

/// XDP on `iface`: native first, generic if the driver cannot.
pub fn attach_xdp(ebpf: &mut Ebpf, iface: &str) -> Result<Attached, AttachError> {
    attach_xdp_link(ebpf, iface).map(|(a, _)| a)
}

/// `attach_xdp`, also returning the link to detach later.
pub fn attach_xdp_link(ebpf: &mut Ebpf, iface: &str) -> Result<(Attached, XdpLinkId), AttachError> {
    let prog: &mut Xdp =
        ebpf.program_mut(XDP_PROGRAM)
            .ok_or(AttachError::Missing(XDP_PROGRAM))?
            .try_into()
            .map_err(|source| AttachError::Program { program: XDP_PROGRAM, iface: iface.into(), source })?;
    match prog.attach(iface, XdpMode::Driver) {
        Ok(id) => Ok((Attached::XdpNative, id)),
        Err(native) => match prog.attach(iface, XdpMode::Skb) {
            Ok(id) => {
                eprintln!(
                    "warning: {iface}: native XDP unavailable ({native}); using generic XDP (slow path)"
                );
                Ok((Attached::XdpGeneric, id))
            }
            Err(source) => Err(AttachError::Program { program: XDP_PROGRAM, iface: iface.into(), source }),
        },
    }
}

/// TC ingress on `iface`: tcx, else clsact + netlink.
pub fn attach_tc(ebpf: &mut Ebpf, iface: &str) -> Result<Attached, AttachError> {
    attach_tc_link(ebpf, iface).map(|(a, _)| a)
}

/// `attach_tc`, also returning the link to detach later.
pub fn attach_tc_link(
    ebpf: &mut Ebpf,
    iface: &str,
) -> Result<(Attached, SchedClassifierLinkId), AttachError> {
    let prog: &mut SchedClassifier = ebpf
        .program_mut(TC_PROGRAM)
        .ok_or(AttachError::Missing(TC_PROGRAM))?
        .try_into()
        .map_err(|source| AttachError::Program { program: TC_PROGRAM, iface: iface.into(), source })?;
    match prog.attach(iface, TcAttachType::Ingress) {
        Ok(id) => Ok((Attached::Tcx, id)),
        Err(_) => {
            // Old kernel (or tcx refused): the classic clsact qdisc; "exists" is fine.
            let _ = qdisc_add_clsact(iface);
            prog.attach_with_options(
                iface,
                TcAttachType::Ingress,
                TcAttachOptions::Netlink(NlOptions::default()),
            )
            .map(|id| (Attached::TcClsact, id))
            .map_err(|source| AttachError::Program {
                program: TC_PROGRAM,
                iface: iface.into(),
                source,
            })
        }
    }
}

/// Detaches a TC link (its interface may already be gone, which detached it in the kernel).
pub fn detach_tc(ebpf: &mut Ebpf, id: SchedClassifierLinkId) {
    if let Some(Ok(prog)) = ebpf.program_mut(TC_PROGRAM).map(<&mut SchedClassifier>::try_from) {
        let _ = prog.detach(id);
    }
}

/// Lets the interface accept packets whose source is one of the node's own addresses. The
/// datapath needs it: a source-NATed flow (hairpin, external traffic to a remote backend)
/// and a NodePort reply rewritten at TC arrive with the node address as source, which the
/// kernel otherwise drops as martian.
/// Nothing to do when `all.accept_local` is already on (the kernel ORs it with the
/// interface's; the DaemonSet's init container sets it, as /proc/sys is read-only in an
/// unprivileged container).
pub fn accept_local(iface: &str) -> std::io::Result<()> {
    let all = std::fs::read_to_string("/proc/sys/net/ipv4/conf/all/accept_local").unwrap_or_default();
    if all.trim() == "1" {
        return Ok(());
    }
    std::fs::write(format!("/proc/sys/net/ipv4/conf/{iface}/accept_local"), "1")
}
