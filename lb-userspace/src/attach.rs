//! Attaching the loaded programs to interfaces: XDP in native (driver) mode with a loud
//! fallback to generic mode, TC ingress through tcx (kernel >= 6.6) with a fallback to a
//! clsact qdisc + netlink filter. Links are owned by the `Ebpf` object: they go away with it
//! (or with `detach`), never leaving a program behind on an interface.

use aya::{
    Ebpf,
    programs::{
        SchedClassifier, TcAttachType, Xdp, XdpMode,
        tc::{NlOptions, SchedClassifierLinkId, TcAttachOptions, qdisc_add_clsact},
        xdp::XdpLinkId,
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
