//! The `auto` data plane: every connection starts on the copy plane, and one that
//! crosses its cluster's promotion threshold (`promote_after_bytes`, `promote_after`)
//! moves to the in-kernel splice, through the same hand-off as a connection spliced
//! right after its CONNECT. Short sessions never pay for a splice they would not use.

use std::sync::Arc;

use lb_common::DaemonStat;

use super::{
    Carried, CarryFuture, DataPlane, Outcome, Pair,
    copy::CopyPlane,
    sockmap::{Demote, SockmapPlane},
};
use crate::stats::Stats;

/// Copy first, splice once busy.
pub struct AutoPlane {
    copy: CopyPlane,
    sockmap: Arc<SockmapPlane>,
    stats: Arc<Stats>,
}

impl AutoPlane {
    /// An `auto` plane over a loaded sockmap plane.
    pub fn new(sockmap: Arc<SockmapPlane>, stats: Arc<Stats>) -> Self {
        Self {
            copy: CopyPlane::new(stats.clone()),
            sockmap,
            stats,
        }
    }

    /// Carries `pair` from its start, or (a hot upgrade's) from where `copied` says.
    ///
    /// Each phase's future is boxed while it runs: the pair's future lives as long as
    /// the connection, and carrying both phases inline cost 7.5 KB a connection. An
    /// `async move` block, not an `async fn`, which would store the pair twice.
    #[expect(
        clippy::manual_async_fn,
        reason = "an async fn would store its arguments twice"
    )]
    fn run(
        &self,
        mut pair: Pair,
        copied: Option<super::copy::Stopped>,
    ) -> impl Future<Output = Outcome> {
        async move {
            let copy = match copied {
                None => Box::pin(self.copy.run_promotable(&pair, pair.promote)).await,
                Some(s) => Box::pin(self.copy.resume_copied(&pair, s, pair.promote)).await,
            };
            let promoted = match copy {
                Ok(outcome) => return outcome,
                Err(promoted) => promoted,
            };
            // Every byte read was written: the splice's byte accounting starts from
            // there.
            pair.written_to_server += promoted.copied[0];
            pair.written_to_client += promoted.copied[1];
            pair.boundary = promoted.boundary;
            self.stats.inc(DaemonStat::Promoted);
            if promoted.conversation {
                self.stats.inc(DaemonStat::PromotedConversation);
            }
            let demote = demote(&pair, promoted.conversation);
            Box::pin(self.sockmap.run(pair, Some(demote))).await
        }
    }
}

/// Back to copy if the splice stops paying: throttled, or busier than the rate that
/// defers a promotion (unless promoted as a conversation and still one; a hot upgrade
/// carries that over).
fn demote(pair: &Pair, conversation: bool) -> Demote {
    Demote {
        max_rate: pair.promote.max_rate.unwrap_or(u64::MAX),
        conversation,
    }
}

impl DataPlane for AutoPlane {
    fn name(&self) -> &'static str {
        "auto"
    }
    fn carry(&self, pair: Pair) -> CarryFuture<'_> {
        Box::pin(self.run(pair, None))
    }
    fn resume(&self, pair: Pair, carried: Carried) -> CarryFuture<'_> {
        // Each kind's own future, boxed: one future for all of them would be as
        // large as the largest for every pair.
        match carried {
            Carried::Copy(stopped) => Box::pin(self.run(pair, Some(stopped))),
            Carried::Spliced(stopped) => {
                let demote = demote(&pair, stopped.conversation);
                Box::pin(self.sockmap.resume_spliced(pair, stopped, Some(demote)))
            }
            Carried::Unspliced(u) => Box::pin(self.sockmap.resume_unspliced(pair, u)),
            // Not a data plane's: `conn::adopt` resumes TLS connections itself.
            Carried::Tls(t) => self.copy.resume(pair, Carried::Tls(t)),
        }
    }
}
