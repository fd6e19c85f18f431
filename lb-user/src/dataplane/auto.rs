//! The `auto` data plane: every connection starts on the copy plane, and one that
//! crosses its cluster's promotion threshold (`promote_after_bytes`, `promote_after`)
//! moves to the in-kernel splice, through the same hand-off as a connection spliced
//! right after its CONNECT. Short sessions never pay for a splice they would not use.

use std::sync::Arc;

use lb_common::DaemonStat;

use super::{CarryFuture, DataPlane, Outcome, Pair, copy::CopyPlane, sockmap::SockmapPlane};
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

    async fn run(&self, mut pair: Pair) -> Outcome {
        // Each phase's future is boxed while it runs: the pair's future lives as long
        // as the connection, and carrying both phases inline cost 7.5 KB a connection.
        let promoted = match Box::pin(self.copy.run_promotable(&pair, pair.promote)).await {
            Ok(outcome) => return outcome,
            Err(promoted) => promoted,
        };
        // Every byte read was written: the splice's byte accounting starts from there.
        pair.written_to_server += promoted.copied[0];
        pair.written_to_client += promoted.copied[1];
        pair.boundary = promoted.boundary;
        self.stats.inc(DaemonStat::Promoted);
        // Back to copy if the splice stops paying: throttled, or busier than the
        // rate that defers a promotion.
        let demote_above = pair.promote.max_rate.or(Some(u64::MAX));
        Box::pin(self.sockmap.run(pair, demote_above)).await
    }
}

impl DataPlane for AutoPlane {
    fn name(&self) -> &'static str {
        "auto"
    }
    fn carry(&self, pair: Pair) -> CarryFuture<'_> {
        Box::pin(self.run(pair))
    }
}
