//! Attaching the loaded programs to interfaces: XDP in native (driver) mode with a loud
//! fallback to generic mode, TC ingress through tcx (kernel >= 6.6) with a fallback to a
//! clsact qdisc + netlink filter.
//!
//! `attach_*_link` return links owned by the `Ebpf` object (gone with it). The agent uses
//! `attach_pinned`, and every mode it can end up in outlives the agent, so the datapath keeps
//! running while the agent restarts and the next agent swaps its program in place:
//! * bpf_link XDP and tcx: the link is pinned under `<pin dir>/links/`, and a restarted agent
//!   swaps its program into the same link (`bpf_link_update`). Removing the pin (or the
//!   whole pin dir) detaches it.
//! * netlink XDP (kernels before 5.9, or `--netlink-attach xdp`): the attachment belongs to
//!   the interface; the next agent replaces our program in place (`xdp_netlink`).
//! * a clsact filter (kernels before 6.6, or `--netlink-attach tc`): at priority
//!   `CLSACT_PRIORITY` and the hook's handle (`Hook::clsact_handle`), which the next agent
//!   replaces in place; the link aya hands back is forgotten, so dropping it does not detach.
//!
//! TC has four hooks: `lb_tc_pod` on pod interfaces (`Hook::Tc`), with host routing
//! `lb_tc_uplink` on the XDP interfaces (`Hook::Uplink`), with `--node-hook tc`
//! `lb_tc_node` (`lb_tc_pod` plus the too-big answer) on the node interfaces instead of XDP
//! (`Hook::NodeTc`), all three at ingress, and `lb_tc_egress` at the egress of both kinds
//! (`Hook::Egress`); all take the same paths.
//!
//! An agent that finds our program attached in another mode than it would choose keeps
//! traffic flowing: a netlink XDP program of ours is replaced in place (the mode stays), and
//! a tcx link or clsact filter of ours is removed once the new attachment is in.

use std::{
    os::fd::{AsFd as _, AsRawFd as _},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    programs::{
        SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        tc::{
            NlOptions, SchedClassifierLink, SchedClassifierLinkId, TcAttachOptions, TcHandle,
            qdisc_add_clsact,
        },
        xdp::{XdpLink, XdpLinkId},
    },
};

use crate::{
    loader::{EGRESS_PROGRAM, NODE_TC_PROGRAM, TC_PROGRAM, UPLINK_PROGRAM, XDP_PROGRAM},
    xdp_netlink,
};

/// Where our clsact filters sit ("LB"), so that the next agent finds and replaces them.
pub const CLSACT_PRIORITY: u16 = 0x4c42;

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("attaching {program} to {iface}: {source}")]
    Program { program: &'static str, iface: String, source: aya::programs::ProgramError },
    #[error("attaching {XDP_PROGRAM} to {iface} through netlink: {source}")]
    Netlink { iface: String, source: std::io::Error },
    #[error(
        "{iface} already has another XDP program ({name}, id {id}); not replacing it (remove it with `ip link set dev {iface} xdp off`)"
    )]
    Foreign { iface: String, name: String, id: u32 },
    #[error("keeping {program}'s link on {iface}: {reason}")]
    Link { program: &'static str, iface: String, reason: String },
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
    /// Through netlink (no bpf_link), native or generic.
    XdpNetlink,
    XdpNetlinkGeneric,
    Tcx,
    TcClsact,
    /// Took over what a previous agent attached (its mode is unchanged).
    Replaced,
}

impl Attached {
    /// The mode as `lb status` names it.
    pub fn mode(self) -> &'static str {
        match self {
            Attached::XdpNative => "native (bpf_link)",
            Attached::XdpGeneric => "generic (bpf_link; slow fallback)",
            Attached::XdpNetlink => "native (netlink)",
            Attached::XdpNetlinkGeneric => "generic (netlink; slow fallback)",
            Attached::Tcx => "tcx",
            Attached::TcClsact => "clsact",
            Attached::Replaced => "taken over (mode kept)",
        }
    }
}

/// Which hook, for pin names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    Xdp,
    /// `lb_tc_pod` on pod interfaces.
    Tc,
    /// `lb_tc_uplink` on the XDP interfaces (host routing of what XDP translated).
    Uplink,
    /// `lb_tc_node` on the node interfaces in place of XDP (`--node-hook tc`).
    NodeTc,
    /// `lb_tc_egress` at TC egress of pod and node interfaces (replies of the node's own
    /// stack).
    Egress,
}

impl Hook {
    fn name(self) -> &'static str {
        match self {
            Hook::Xdp => "xdp",
            Hook::Tc => "tc",
            Hook::Uplink => "uplink",
            Hook::NodeTc => "nodetc",
            Hook::Egress => "egress",
        }
    }

    /// The program a TC hook runs.
    fn tc_program(self) -> &'static str {
        match self {
            Hook::Uplink => UPLINK_PROGRAM,
            Hook::NodeTc => NODE_TC_PROGRAM,
            Hook::Egress => EGRESS_PROGRAM,
            Hook::Tc | Hook::Xdp => TC_PROGRAM,
        }
    }

    fn tc_direction(self) -> TcAttachType {
        if self == Hook::Egress { TcAttachType::Egress } else { TcAttachType::Ingress }
    }

    /// Each TC hook's clsact filter has a handle of its own: an interface may carry both.
    fn clsact_handle(self) -> TcHandle {
        TcHandle::new(
            0,
            match self {
                Hook::Uplink => 2,
                Hook::NodeTc => 3,
                Hook::Egress => 4,
                Hook::Xdp | Hook::Tc => 1,
            },
        )
    }
}

/// The attach modes of kernels without bpf_link XDP or tcx, forced on a newer kernel to test
/// them (`--netlink-attach`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Legacy {
    pub netlink_xdp: bool,
    pub clsact: bool,
}

/// Where the link of `hook` on `iface` is pinned.
pub fn link_pin_path(pin_dir: &Path, hook: Hook, iface: &str) -> PathBuf {
    pin_dir.join("links").join(format!("{}-{iface}", hook.name()))
}

/// What keeps an attachment, and how to end it. None of them ends with the agent.
#[derive(Debug)]
pub enum Holder {
    /// A bpf_link pinned in bpffs.
    Pinned(PathBuf),
    /// Our program attached through netlink, with its mode flags.
    NetlinkXdp { ifindex: u32, flags: u32 },
    /// Our clsact filter of `hook` on `iface`.
    Clsact { iface: String, hook: Hook },
}

impl Holder {
    /// Ends the attachment: unpins (detaching the program), or removes our netlink program or
    /// filter (the interface may be gone already, which removed them).
    pub fn release(self) {
        match self {
            Holder::Pinned(path) => {
                let _ = std::fs::remove_file(path);
            }
            Holder::NetlinkXdp { ifindex, flags } => {
                if ours(ifindex).is_some() {
                    let _ = xdp_netlink::set(ifindex, None, flags);
                }
            }
            Holder::Clsact { iface, hook } => remove_clsact(&iface, hook),
        }
    }
}

/// Attaches `hook`'s program to `iface` in a mode that outlives the agent, taking over what
/// an earlier agent attached there.
pub fn attach_pinned(
    ebpf: &mut Ebpf,
    hook: Hook,
    iface: &str,
    pin_dir: &Path,
    legacy: Legacy,
) -> Result<(Attached, Holder), AttachError> {
    let path = link_pin_path(pin_dir, hook, iface);
    let _ = std::fs::create_dir_all(path.parent().unwrap_or(pin_dir));
    match hook {
        Hook::Xdp => {
            if legacy.netlink_xdp {
                // A bpf_link and a netlink program cannot share an interface: the link goes
                // first (a switch of mode is the one case with a gap).
                drop(take_over(&path));
            } else if let Some(done) = xdp_link_pinned(ebpf, iface, &path)? {
                return Ok(done);
            }
            xdp_netlink_attach(ebpf, iface)
        }
        Hook::Tc | Hook::Uplink | Hook::NodeTc | Hook::Egress => {
            if !legacy.clsact
                && let Some(done) = tcx_pinned(ebpf, hook, iface, &path)?
            {
                remove_clsact(iface, hook);
                return Ok(done);
            }
            let done = clsact_attach(ebpf, hook, iface)?;
            // A tcx link of ours from before goes once the filter is in.
            drop(take_over(&path));
            Ok(done)
        }
    }
}

fn program_err(
    program: &'static str,
    iface: &str,
) -> impl FnOnce(aya::programs::ProgramError) -> AttachError {
    let iface = iface.to_string();
    move |source| AttachError::Program { program, iface, source }
}

fn link_err<E: std::fmt::Display>(program: &'static str, iface: &str) -> impl FnOnce(E) -> AttachError {
    let iface = iface.to_string();
    move |e| AttachError::Link { program, iface, reason: e.to_string() }
}

/// XDP through a pinned bpf_link; `None` when this kernel (or the interface's current
/// attachment, a netlink program) leaves only the netlink path.
fn xdp_link_pinned(
    ebpf: &mut Ebpf,
    iface: &str,
    path: &Path,
) -> Result<Option<(Attached, Holder)>, AttachError> {
    let replaced = take_over(path).and_then(|fd| XdpLink::try_from(fd).ok()).and_then(|link| {
        let prog: &mut Xdp = ebpf.program_mut(XDP_PROGRAM)?.try_into().ok()?;
        prog.attach_to_link(link).ok()
    });
    let (how, id) = match replaced {
        Some(id) => (Attached::Replaced, id),
        None => match attach_xdp_link(ebpf, iface) {
            Ok(attached) => attached,
            // EBUSY from a netlink program of ours, or no bpf_link XDP at all.
            Err(_) if ours_on(iface).is_some() => return Ok(None),
            Err(e) => return Err(e),
        },
    };
    let prog: &mut Xdp = xdp_program(ebpf, iface)?;
    let link = prog.take_link(id).map_err(program_err(XDP_PROGRAM, iface))?;
    match FdLink::try_from(link) {
        Ok(fd) => {
            fd.pin(path).map_err(link_err(XDP_PROGRAM, iface))?;
            Ok(Some((how, Holder::Pinned(path.to_path_buf()))))
        }
        // aya fell back to netlink (no bpf_link XDP here): the conversion dropped, so
        // detached, it. Our own netlink path keeps it attached across restarts.
        Err(_) => Ok(None),
    }
}

fn xdp_program<'a>(ebpf: &'a mut Ebpf, iface: &str) -> Result<&'a mut Xdp, AttachError> {
    ebpf.program_mut(XDP_PROGRAM)
        .ok_or(AttachError::Missing(XDP_PROGRAM))?
        .try_into()
        .map_err(program_err(XDP_PROGRAM, iface))
}

/// The ifindex of `iface` and, if our XDP program is attached there through netlink, its
/// mode flags.
fn ours_on(iface: &str) -> Option<(u32, u32)> {
    let ifindex = crate::links::interfaces().get(iface).copied()?;
    ours(ifindex).map(|flags| (ifindex, flags))
}

/// The mode flags of our XDP program on `ifindex`, if it is ours that is attached.
fn ours(ifindex: u32) -> Option<u32> {
    let a = xdp_netlink::attached(ifindex).ok()??;
    let flags = if a.mode == xdp_netlink::XDP_ATTACHED_SKB {
        xdp_netlink::XDP_FLAGS_SKB_MODE
    } else {
        xdp_netlink::XDP_FLAGS_DRV_MODE
    };
    (xdp_netlink::program_name(a.prog_id)?.as_str() == XDP_PROGRAM).then_some(flags)
}

/// XDP through netlink: our program replaced in place if it is there, else attached native
/// first, generic if the driver cannot. A foreign program is left alone.
fn xdp_netlink_attach(ebpf: &mut Ebpf, iface: &str) -> Result<(Attached, Holder), AttachError> {
    let nl_err = |source| AttachError::Netlink { iface: iface.to_string(), source };
    let ifindex = crate::links::interfaces()
        .get(iface)
        .copied()
        .ok_or_else(|| nl_err(std::io::Error::from_raw_os_error(libc::ENODEV)))?;
    let prog = xdp_program(ebpf, iface)?;
    let fd = prog.fd().map_err(program_err(XDP_PROGRAM, iface))?.as_fd().as_raw_fd();
    if let Some(flags) = ours(ifindex) {
        xdp_netlink::set(ifindex, Some(fd), flags).map_err(nl_err)?;
        return Ok((Attached::Replaced, Holder::NetlinkXdp { ifindex, flags }));
    }
    if let Some(a) = xdp_netlink::attached(ifindex).map_err(nl_err)? {
        let name = xdp_netlink::program_name(a.prog_id).unwrap_or_else(|| "?".into());
        return Err(AttachError::Foreign { iface: iface.to_string(), name, id: a.prog_id });
    }
    let native = xdp_netlink::XDP_FLAGS_DRV_MODE;
    match xdp_netlink::set(ifindex, Some(fd), native | xdp_netlink::XDP_FLAGS_UPDATE_IF_NOEXIST) {
        Ok(()) => Ok((Attached::XdpNetlink, Holder::NetlinkXdp { ifindex, flags: native })),
        Err(e) => {
            crate::logging::line(&format!(
                "warning: {iface}: native XDP unavailable ({e}); using generic XDP (slow path)"
            ));
            let generic = xdp_netlink::XDP_FLAGS_SKB_MODE;
            xdp_netlink::set(ifindex, Some(fd), generic | xdp_netlink::XDP_FLAGS_UPDATE_IF_NOEXIST)
                .map_err(nl_err)?;
            Ok((Attached::XdpNetlinkGeneric, Holder::NetlinkXdp { ifindex, flags: generic }))
        }
    }
}

/// TC through a pinned tcx link; `None` when this kernel has no tcx.
fn tcx_pinned(
    ebpf: &mut Ebpf,
    hook: Hook,
    iface: &str,
    path: &Path,
) -> Result<Option<(Attached, Holder)>, AttachError> {
    let program = hook.tc_program();
    let replaced = take_over(path).and_then(|fd| SchedClassifierLink::try_from(fd).ok()).and_then(|link| {
        let prog: &mut SchedClassifier = ebpf.program_mut(program)?.try_into().ok()?;
        prog.attach_to_link(link).ok()
    });
    let prog = tc_program(ebpf, program, iface)?;
    let (how, id) = match replaced {
        Some(id) => (Attached::Replaced, id),
        None => match prog.attach(iface, hook.tc_direction()) {
            Ok(id) => (Attached::Tcx, id),
            Err(_) => return Ok(None),
        },
    };
    let link = prog.take_link(id).map_err(program_err(program, iface))?;
    let fd = FdLink::try_from(link).map_err(link_err(program, iface))?;
    fd.pin(path).map_err(link_err(program, iface))?;
    Ok(Some((how, Holder::Pinned(path.to_path_buf()))))
}

fn tc_program<'a>(
    ebpf: &'a mut Ebpf,
    program: &'static str,
    iface: &str,
) -> Result<&'a mut SchedClassifier, AttachError> {
    ebpf.program_mut(program)
        .ok_or(AttachError::Missing(program))?
        .try_into()
        .map_err(program_err(program, iface))
}

/// Our clsact filter of `hook` on `iface`: an earlier agent's replaced in place, else a new
/// one.
fn clsact_attach(ebpf: &mut Ebpf, hook: Hook, iface: &str) -> Result<(Attached, Holder), AttachError> {
    // "Exists" is fine.
    let _ = qdisc_add_clsact(iface);
    let (program, handle) = (hook.tc_program(), hook.clsact_handle());
    let prog = tc_program(ebpf, program, iface)?;
    let ours = SchedClassifierLink::attached(iface, hook.tc_direction(), CLSACT_PRIORITY, handle, None)
        .map_err(link_err(program, iface))?;
    let (how, id) = match prog.attach_to_link(ours) {
        Ok(id) => (Attached::Replaced, id),
        Err(_) => {
            let options = NlOptions { priority: CLSACT_PRIORITY, handle, classid: None };
            let id = prog
                .attach_with_options(iface, hook.tc_direction(), TcAttachOptions::Netlink(options))
                .map_err(program_err(program, iface))?;
            (Attached::TcClsact, id)
        }
    };
    // Dropping the link would remove the filter: it is to stay when the agent exits.
    let link = prog.take_link(id).map_err(program_err(program, iface))?;
    std::mem::forget(link);
    Ok((how, Holder::Clsact { iface: iface.to_string(), hook }))
}

/// Removes our clsact filter of `hook` from `iface`, if there is one.
fn remove_clsact(iface: &str, hook: Hook) {
    if let Ok(link) =
        SchedClassifierLink::attached(iface, hook.tc_direction(), CLSACT_PRIORITY, hook.clsact_handle(), None)
    {
        // Dropping it detaches it (an error when there is none, ignored).
        drop(link);
    }
}

/// What `cleanup` removed.
#[derive(Debug, Default)]
pub struct Cleaned {
    /// Pinned links (bpf_link XDP, tcx), by pin name.
    pub links: Vec<String>,
    /// Interfaces our netlink XDP program was detached from.
    pub netlink_xdp: Vec<String>,
    /// Interfaces our clsact filter was removed from.
    pub clsact: Vec<String>,
    /// Whether the pin dir was there (and is gone).
    pub pin_dir: bool,
}

/// `lb agent --cleanup`: detaches every program of ours from this network namespace's
/// interfaces (pinned links, netlink XDP, our clsact filter) and removes the pin dir with its
/// maps. The caller holds the pin dir's lock, so no agent is running on it. Finding nothing
/// to do is fine.
pub fn cleanup(pin_dir: &Path) -> std::io::Result<Cleaned> {
    let mut out = Cleaned::default();
    if let Ok(dir) = std::fs::read_dir(pin_dir.join("links")) {
        for entry in dir.flatten() {
            // Unpinning the last reference detaches the link.
            std::fs::remove_file(entry.path())?;
            out.links.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    for (name, ifindex) in crate::links::interfaces() {
        if let Some(flags) = ours(ifindex)
            && xdp_netlink::set(ifindex, None, flags).is_ok()
        {
            out.netlink_xdp.push(name.clone());
        }
        // Every filter running one of our programs, by its name (an error when there is none).
        let detached = [
            (TcAttachType::Ingress, TC_PROGRAM),
            (TcAttachType::Ingress, UPLINK_PROGRAM),
            (TcAttachType::Ingress, NODE_TC_PROGRAM),
            (TcAttachType::Egress, EGRESS_PROGRAM),
        ]
        .map(|(at, p)| aya::programs::tc::qdisc_detach_program(&name, at, p).is_ok());
        if detached.contains(&true) {
            out.clsact.push(name);
        }
    }
    if pin_dir.exists() {
        std::fs::remove_dir_all(pin_dir)?;
        out.pin_dir = true;
    }
    Ok(out)
}

/// Takes `hook` off `iface` wherever an earlier agent left it (its link pin, its netlink XDP
/// program or clsact filter): the uplink program once host routing is turned off, the node
/// interface's XDP or TC program once `--node-hook` changed.
pub fn detach(hook: Hook, iface: &str, pin_dir: &Path) {
    drop(take_over(&link_pin_path(pin_dir, hook, iface)));
    if hook != Hook::Xdp {
        remove_clsact(iface, hook);
    } else if let Some(ifindex) = crate::links::interfaces().get(iface).copied()
        && let Some(flags) = ours(ifindex)
    {
        let _ = xdp_netlink::set(ifindex, None, flags);
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
                crate::logging::line(&format!(
                    "warning: {iface}: native XDP unavailable ({native}); using generic XDP (slow path)"
                ));
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
