//! Attaching the loaded programs to interfaces: XDP in native (driver) mode with a loud
//! fallback to generic mode, TC ingress through tcx (kernel >= 6.6) with a fallback to a
//! clsact qdisc + netlink filter. Links are owned by the `Ebpf` object: they go away with it
//! (or with `detach`), never leaving a program behind on an interface.

use aya::{
    Ebpf,
    programs::{
        SchedClassifier, TcAttachType, Xdp, XdpMode,
        tc::{NlOptions, TcAttachOptions, qdisc_add_clsact},
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
    let prog: &mut Xdp =
        ebpf.program_mut(XDP_PROGRAM)
            .ok_or(AttachError::Missing(XDP_PROGRAM))?
            .try_into()
            .map_err(|source| AttachError::Program { program: XDP_PROGRAM, iface: iface.into(), source })?;
    match prog.attach(iface, XdpMode::Driver) {
        Ok(_) => Ok(Attached::XdpNative),
        Err(native) => match prog.attach(iface, XdpMode::Skb) {
            Ok(_) => {
                eprintln!(
                    "warning: {iface}: native XDP unavailable ({native}); using generic XDP (slow path)"
                );
                Ok(Attached::XdpGeneric)
            }
            Err(source) => Err(AttachError::Program { program: XDP_PROGRAM, iface: iface.into(), source }),
        },
    }
}

/// TC ingress on `iface`: tcx, else clsact + netlink.
pub fn attach_tc(ebpf: &mut Ebpf, iface: &str) -> Result<Attached, AttachError> {
    let prog: &mut SchedClassifier = ebpf
        .program_mut(TC_PROGRAM)
        .ok_or(AttachError::Missing(TC_PROGRAM))?
        .try_into()
        .map_err(|source| AttachError::Program { program: TC_PROGRAM, iface: iface.into(), source })?;
    match prog.attach(iface, TcAttachType::Ingress) {
        Ok(_) => Ok(Attached::Tcx),
        Err(_) => {
            // Old kernel (or tcx refused): the classic clsact qdisc; "exists" is fine.
            let _ = qdisc_add_clsact(iface);
            prog.attach_with_options(
                iface,
                TcAttachType::Ingress,
                TcAttachOptions::Netlink(NlOptions::default()),
            )
            .map(|_| Attached::TcClsact)
            .map_err(|source| AttachError::Program {
                program: TC_PROGRAM,
                iface: iface.into(),
                source,
            })
        }
    }
}
