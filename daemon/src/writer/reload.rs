//! Policy reloads: `reload`, SIGHUP and the policy at start, each a `policy_applied` event
//! when the policy differs from the one the log ends with.

use super::{error_line, read_ledger, write_ledger, Batch, Writer};
use bursar_core::ledger::{Answer, Ledger};
use bursar_core::policy::LoadedPolicy;
use bursar_schemas::event::{Actor, EventBody, PolicyApplied};
use bursar_schemas::policy::ResolvedPolicy;
use bursar_schemas::wire::{ErrorCode, ReloadAnswer, WireError};
use serde_json::Value;

/// A policy for a writer to apply: what `policy_applied` logs besides its version. In cluster
/// mode the node asked to `reload` reads its file and carries this to every partition's writer
/// (SPEC §13: "`reload` on any node applies cluster-wide").
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PolicyToApply {
    /// The resolved policy, prices included.
    pub resolved: ResolvedPolicy,
    /// Where it came from (the file's path on the node that read it).
    pub source: String,
    /// BLAKE3 hex of the file's text.
    pub source_hash: String,
}

impl From<LoadedPolicy> for PolicyToApply {
    fn from(p: LoadedPolicy) -> Self {
        PolicyToApply {
            resolved: p.resolved,
            source: p.source,
            source_hash: p.source_hash,
        }
    }
}

impl Writer {
    /// Append `policy_applied` when `p` differs from the policy the log ends with.
    pub(super) fn apply_policy_if_changed(&mut self, p: &PolicyToApply) -> Result<(), String> {
        let (same, version) = {
            let l = read_ledger(&self.shared);
            (l.policy() == Some(&p.resolved), l.policy_version())
        };
        if same {
            return Ok(());
        }
        let body = policy_body(p, version + 1);
        let mut batch = Batch::default();
        {
            let shared = self.shared.clone();
            let mut l = write_ledger(&shared);
            self.stage(&mut l, &mut batch, self.own, body);
        }
        let fault = self.fault();
        self.commit(&mut batch, fault)
            .map_err(|e| format!("cannot write the policy to the log: {e}"))
    }

    /// A `reload` job: the answer line (the policy, when new, is staged into `batch`).
    pub(super) fn reload(
        &mut self,
        l: &mut Ledger,
        batch: &mut Batch,
        policy: Option<Box<PolicyToApply>>,
        actor: Actor,
        req: Option<Value>,
        poisoned: bool,
    ) -> String {
        if poisoned {
            return error_line(ErrorCode::Unavailable, self.refusal.clone(), req);
        }
        let loaded = match policy {
            Some(p) => Ok(*p),
            None => (self.reload)().map(PolicyToApply::from),
        };
        match loaded {
            Ok(p) if l.policy() == Some(&p.resolved) => {
                tracing::info!("reload: policy unchanged (version {})", l.policy_version());
                serde_json::to_string(&ReloadAnswer {
                    ok: true,
                    policy_version: l.policy_version(),
                    req,
                })
                .unwrap_or_default()
            }
            Ok(p) => {
                let version = l.policy_version() + 1;
                self.stage(l, batch, actor, policy_body(&p, version));
                tracing::info!("policy version {version} applied from {}", p.source);
                serde_json::to_string(&ReloadAnswer {
                    ok: true,
                    policy_version: version,
                    req,
                })
                .unwrap_or_default()
            }
            Err(msg) => {
                tracing::error!("reload refused, keeping the running policy: {msg}");
                Answer::Error(WireError::new(ErrorCode::BadRequest, msg)).to_line(req)
            }
        }
    }
}

fn policy_body(p: &PolicyToApply, version: u64) -> EventBody {
    EventBody::PolicyApplied(PolicyApplied {
        policy_version: version,
        source: p.source.clone(),
        source_hash: p.source_hash.clone(),
        policy: p.resolved.clone(),
    })
}
