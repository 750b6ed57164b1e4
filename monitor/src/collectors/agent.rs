//! Self-description: build info and which programs are attached where.

use std::sync::{Arc, RwLock};

use prometheus_client::{collector::Collector, encoding::DescriptorEncoder};

use super::encode_gauges;

/// One program attachment the agent tried.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attachment {
    pub program: &'static str,
    pub hook: String,
    /// The device for per-device hooks, empty for tracepoints.
    pub device: String,
    pub attached: bool,
}

/// Attachments, shared between the loader and the collector.
#[derive(Clone, Debug, Default)]
pub struct Attachments(Arc<RwLock<Vec<Attachment>>>);

impl Attachments {
    pub fn record(&self, attachment: Attachment) {
        let mut all = self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        all.retain(|a| !(a.program == attachment.program && a.device == attachment.device));
        all.push(attachment);
    }

    /// Forgets every attachment on `device`.
    pub fn forget_device(&self, device: &str) {
        self.0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .retain(|a| a.device != device);
    }

    pub fn snapshot(&self) -> Vec<Attachment> {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

#[derive(Debug)]
pub struct AgentCollector {
    pub attachments: Attachments,
}

impl Collector for AgentCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        encode_gauges(
            &mut encoder,
            "build_info",
            "The agent's version; always 1.",
            [([("version", env!("CARGO_PKG_VERSION").to_owned())], 1i64)],
        )?;
        encode_gauges(
            &mut encoder,
            "program_attached",
            "1 when the eBPF program is attached to its hook, 0 when attaching failed.",
            self.attachments.snapshot().into_iter().map(|a| {
                (
                    [
                        ("program", a.program.to_owned()),
                        ("hook", a.hook),
                        ("device", a.device),
                    ],
                    i64::from(a.attached),
                )
            }),
        )
    }
}
