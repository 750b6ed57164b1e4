//! Attaching the object's programs: the raw tracepoints once, the classifiers to each
//! device. Every attempt is recorded, attached or not, for `program_attached` and
//! `/readyz`.

use std::sync::{Arc, PoisonError, RwLock};

use anyhow::{Context as _, Result, anyhow};
use aya::{
    Btf, Ebpf, Endianness,
    programs::{
        BtfTracePoint, Link as _, LinkOrder, RawTracePoint, SchedClassifier, TcAttachType,
        tc::{self, NlOptions, SchedClassifierLinkId, TcAttachOptions, TcError},
    },
};
use log::{debug, error, info, warn};

use crate::kernel::{self, KernelFacts};

/// Where the classifiers sit under clsact (kernels before 6.6): priority 1, ahead of a
/// CNI's, and a handle no other tool picks by chance ("ENI" in ASCII), by which a filter
/// a killed agent left is found and replaced, and nothing else is.
const FILTER_PRIORITY: u16 = 1;
const FILTER_HANDLE: tc::TcHandle = tc::TcHandle::new(0x45, 0x4e49);

/// One program attachment the agent tried.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attachment {
    pub program: &'static str,
    pub hook: String,
    /// The device for per-device hooks, empty for tracepoints.
    pub device: String,
    pub attached: bool,
}

/// Attachments, shared between the loader and what reports them.
#[derive(Clone, Debug, Default)]
pub struct Attachments(Arc<RwLock<Vec<Attachment>>>);

impl Attachments {
    pub fn record(&self, attachment: Attachment) {
        let mut all = self.0.write().unwrap_or_else(PoisonError::into_inner);
        all.retain(|a| !(a.program == attachment.program && a.device == attachment.device));
        all.push(attachment);
    }

    /// Forgets every attachment on `device`.
    pub fn forget_device(&self, device: &str) {
        self.0
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|a| a.device != device);
    }

    pub fn snapshot(&self) -> Vec<Attachment> {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The hooks not attached, as `/readyz` names them.
    pub fn missing(&self) -> Vec<String> {
        self.snapshot()
            .into_iter()
            .filter(|a| !a.attached)
            .map(|a| {
                if a.device.is_empty() {
                    a.hook
                } else {
                    format!("{} on {}", a.hook, a.device)
                }
            })
            .collect()
    }

    fn note<T>(&self, program: &'static str, hook: &str, device: &str, result: &Result<T>) {
        let on = if device.is_empty() {
            String::new()
        } else {
            format!(" on {device}")
        };
        match result {
            Ok(_) => info!("attached {hook}{on}"),
            Err(e) => error!("not attaching {hook}{on}: {e:#}"),
        }
        self.record(Attachment {
            program,
            hook: hook.to_owned(),
            device: device.to_owned(),
            attached: result.is_ok(),
        });
    }
}

/// The programs attached to a device's two directions.
pub const CLASSIFIERS: [(&str, TcAttachType, &str); 2] = [
    ("tc_ingress", TcAttachType::Ingress, "tc/ingress"),
    ("tc_egress", TcAttachType::Egress, "tc/egress"),
];
const KFREE_SKB: &str = "kfree_skb";
const UDP_FAIL: &str = "udp_fail_queue_rcv_skb";

/// The classifiers attached to one device.
pub type ClassifierLinks = Vec<(&'static str, SchedClassifierLinkId)>;

/// The object's programs (its maps taken out): attached through here only.
pub struct Programs {
    ebpf: Ebpf,
    attachments: Attachments,
    /// Whether the classifiers loaded; attaching them is refused (and recorded) if not.
    classifiers_loaded: bool,
}

impl Programs {
    pub(super) fn new(ebpf: Ebpf, attachments: Attachments) -> Self {
        Self {
            ebpf,
            attachments,
            classifiers_loaded: false,
        }
    }

    pub fn attachments(&self) -> &Attachments {
        &self.attachments
    }

    /// Attaches the raw tracepoints. A failure is logged once and recorded, not fatal: the
    /// agent keeps serving what it can, and `program_attached` says what is missing.
    pub fn attach_tracepoints(&mut self, facts: &KernelFacts) {
        let result = match &facts.kfree_skb {
            Err(e) => Err(anyhow!("{e}")),
            Ok(args) => {
                if !args.has_reason {
                    warn!(
                        "kfree_skb passes no drop reason on this kernel (before 5.17); drops are exported with reason=\"unknown\""
                    );
                }
                self.attach_btf_tracepoint(KFREE_SKB)
            }
        };
        self.attachments
            .note(KFREE_SKB, "raw_tp/kfree_skb", "", &result);

        let result = match &facts.udp_fail {
            Err(e) => Err(anyhow!("{e}")),
            Ok(()) => self.attach_raw_tracepoint(UDP_FAIL),
        };
        self.attachments
            .note(UDP_FAIL, "raw_tp/udp_fail_queue_rcv_skb", "", &result);
    }

    /// Attaches program `name` to the raw tracepoint of the same name, typed by the
    /// kernel's BTF (its pointer arguments are then read without helper calls).
    fn attach_btf_tracepoint(&mut self, name: &str) -> Result<()> {
        let btf = Btf::parse_file(kernel::BTF_PATH, Endianness::default())
            .with_context(|| format!("reading {}", kernel::BTF_PATH))?;
        let prog: &mut BtfTracePoint = self.program_mut(name)?.try_into()?;
        prog.load(name, &btf)
            .with_context(|| format!("loading {name}"))?;
        prog.attach()
            .with_context(|| format!("attaching {name} to raw tracepoint {name}"))?;
        Ok(())
    }

    /// Attaches program `name` to the raw tracepoint of the same name.
    fn attach_raw_tracepoint(&mut self, name: &str) -> Result<()> {
        let prog: &mut RawTracePoint = self.program_mut(name)?.try_into()?;
        prog.load().with_context(|| format!("loading {name}"))?;
        prog.attach(name)
            .with_context(|| format!("attaching {name} to raw tracepoint {name}"))?;
        Ok(())
    }

    fn program_mut(&mut self, name: &str) -> Result<&mut aya::programs::Program> {
        self.ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("program {name} missing from the object"))
    }

    /// Loads both classifiers, each on a thread of its own; done once, before any device
    /// is attached. The verifier takes seconds over each, and while a restarted agent's
    /// are loading no classifier watches (TCX links go with the process that made them):
    /// two at once halve that gap where the node has two CPUs.
    pub fn load_classifiers(&mut self) -> Result<()> {
        let mut progs = Vec::with_capacity(CLASSIFIERS.len());
        for (name, prog) in self.ebpf.programs_mut() {
            if CLASSIFIERS.iter().any(|(n, _, _)| *n == name) {
                let prog: &mut SchedClassifier = prog.try_into()?;
                progs.push((name, prog));
            }
        }
        for (name, _, _) in CLASSIFIERS {
            if !progs.iter().any(|(n, _)| *n == name) {
                return Err(anyhow!("program {name} missing from the object"));
            }
        }
        let loaded: Vec<Result<()>> = std::thread::scope(|scope| {
            let threads: Vec<_> = progs
                .into_iter()
                .map(|(name, prog)| {
                    scope.spawn(move || {
                        prog.load().with_context(|| format!("loading {name}"))?;
                        // What the verifier walked (4.15+ reports it): against its limit
                        // of a million, the margin the programs have on this kernel.
                        if let Some(n) = prog
                            .info()
                            .ok()
                            .and_then(|i| i.verified_instruction_count())
                        {
                            info!("loaded {name}: the verifier walked {n} instructions");
                        }
                        Ok(())
                    })
                })
                .collect();
            threads
                .into_iter()
                .map(|t| {
                    t.join()
                        .unwrap_or_else(|_| Err(anyhow!("a loading thread panicked")))
                })
                .collect()
        });
        let mut failed = loaded.into_iter().filter_map(Result::err);
        if let Some(first) = failed.next() {
            // The caller says the first; the others are said here.
            for e in failed {
                error!("{e:#}");
            }
            return Err(first);
        }
        self.classifiers_loaded = true;
        Ok(())
    }

    /// A loaded classifier, for `BPF_PROG_TEST_RUN`.
    pub fn classifier(&self, name: &str) -> Result<&SchedClassifier> {
        let prog = self
            .ebpf
            .program(name)
            .ok_or_else(|| anyhow!("program {name} missing from the object"))?;
        Ok(prog.try_into()?)
    }

    /// Attaches both classifiers to `device`: TCX where the kernel has it (6.6+), first in
    /// order, so that a CNI's program never redirects a packet before we see it; else
    /// `cls_bpf` under clsact. Both programs return "next" (`TC_ACT_UNSPEC`), so no verdict
    /// of ours changes a packet's path.
    pub fn attach_classifiers(&mut self, device: &str) -> ClassifierLinks {
        let mut links = Vec::new();
        self.attach_missing(device, &mut links);
        links
    }

    /// Whether the classifiers loaded: without them no attach can succeed, and none is
    /// tried again.
    pub fn classifiers_loaded(&self) -> bool {
        self.classifiers_loaded
    }

    /// Attaches to `device` each classifier `links` lacks, adding it there; whether it
    /// now has them all.
    pub fn attach_missing(&mut self, device: &str, links: &mut ClassifierLinks) -> bool {
        for (name, attach_type, hook) in CLASSIFIERS {
            if links.iter().any(|(n, _)| *n == name) {
                continue;
            }
            let result = if self.classifiers_loaded {
                self.attach_classifier(name, device, attach_type)
            } else {
                Err(anyhow!("{name} did not load"))
            };
            self.attachments.note(name, hook, device, &result);
            if let Ok(id) = result {
                links.push((name, id));
            }
        }
        links.len() == CLASSIFIERS.len()
    }

    fn attach_classifier(
        &mut self,
        name: &str,
        device: &str,
        attach_type: TcAttachType,
    ) -> Result<SchedClassifierLinkId> {
        let prog: &mut SchedClassifier = self.program_mut(name)?.try_into()?;
        let tcx = match prog.attach_with_options(
            device,
            attach_type,
            TcAttachOptions::TcxOrder(LinkOrder::first()),
        ) {
            Ok(id) => return Ok(id),
            Err(e) => e,
        };
        // No TCX (before 6.6): the clsact qdisc, added when absent and never removed (a
        // CNI may hang its own filters there), and cls_bpf filters, which outlive a killed
        // agent: ours sit at a priority and handle of our own, and one a killed agent left
        // there is replaced rather than stacked; another tool's filter, whatever its
        // program is named, is never touched.
        match tc::qdisc_add_clsact(device) {
            Ok(()) => info!("added the clsact qdisc to {device}"),
            Err(TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => {
                return Err(anyhow!(e)).with_context(|| {
                    format!("adding clsact to {device} (TCX refused too: {tcx})")
                });
            }
        }
        match tc::SchedClassifierLink::attached(
            device,
            attach_type,
            FILTER_PRIORITY,
            FILTER_HANDLE,
            None,
        )
        .map_err(anyhow::Error::from)
        .and_then(|left| left.detach().map_err(anyhow::Error::from))
        {
            Ok(()) => info!("removed the {name} filter a previous agent left on {device}"),
            Err(e) => debug!("no {name} filter left on {device}: {e:#}"),
        }
        prog.attach_with_options(
            device,
            attach_type,
            TcAttachOptions::Netlink(NlOptions {
                priority: FILTER_PRIORITY,
                handle: FILTER_HANDLE,
                ..NlOptions::default()
            }),
        )
        .with_context(|| format!("attaching {name} to {device} with cls_bpf (TCX refused: {tcx})"))
    }

    /// Detaches what [`Self::attach_classifiers`] attached to `device` and forgets its
    /// attachments. A device that is gone took its links with it, so failures are
    /// expected and ignored.
    pub fn detach_classifiers(&mut self, device: &str, links: ClassifierLinks) {
        for (name, id) in links {
            if let Some(prog) = self.ebpf.program_mut(name)
                && let Ok(prog) = <&mut SchedClassifier>::try_from(prog)
            {
                let _ = prog.detach(id);
            }
        }
        self.attachments.forget_device(device);
    }
}
