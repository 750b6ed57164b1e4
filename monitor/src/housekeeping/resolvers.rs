//! The resolver labels in force: the model's policy, with the names it gives kept in
//! the pinned `DNS_RESOLVERS` map so that a restarted agent labels as this one did.

use std::{
    net::IpAddr,
    sync::{Mutex, PoisonError},
};

use crate::{
    loader::maps::ResolverNames,
    model::dns::{AmazonResolvers, ResolverLabels},
};

pub struct Resolvers {
    labels: Mutex<ResolverLabels>,
    kept: Mutex<ResolverNames>,
}

impl Resolvers {
    /// Continues from the names `kept` holds.
    pub fn new(amazon: AmazonResolvers, kept: ResolverNames) -> Self {
        Self {
            labels: Mutex::new(ResolverLabels::new(amazon, kept.named())),
            kept: Mutex::new(kept),
        }
    }

    /// The `resolver` label of `ip`.
    pub fn label(&self, ip: IpAddr) -> String {
        let label = self
            .labels
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .label(ip);
        if label.newly_named {
            self.kept
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .keep(ip);
        }
        label.text
    }

    /// Every resolver labelled by its address, with its kind.
    pub fn info(&self) -> Vec<(String, &'static str)> {
        self.labels
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .info()
    }
}
