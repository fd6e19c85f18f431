//! The `auto` data plane: every connection starts on the copy plane, and one that
//! crosses its cluster's promotion threshold (`promote_after_bytes`, `promote_after`)
//! moves to the in-kernel splice, through the same hand-off as a connection spliced
//! right after its CONNECT. Short sessions never pay for a splice they would not use.
//! A promotion whose hand-off drain does not go quiet leaves the pair on the copy
//! plane until it crosses a threshold again.

use std::sync::Arc;

use lb_common::DaemonStat;

use super::{
    Carried, CarryFuture, DataPlane, Outcome, Pair,
    copy::CopyPlane,
    sockmap::{Declined, Demote, SockmapPlane},
};
use crate::{config::Promote, stats::Stats};

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
            let mut copied = copied;
            let mut declined = 0;
            loop {
                let promote = backed_off(pair.promote, declined);
                let copy = match copied.take() {
                    None => Box::pin(self.copy.run_promotable(&pair, promote)).await,
                    Some(s) => Box::pin(self.copy.resume_copied(&pair, s, promote)).await,
                };
                let promoted = match copy {
                    Ok(outcome) => return outcome,
                    Err(promoted) => promoted,
                };
                // Every byte read was written: the splice's byte accounting starts
                // from there.
                pair.written_to_server += promoted.copied[0];
                pair.written_to_client += promoted.copied[1];
                pair.boundary = promoted.boundary;
                self.stats.inc(DaemonStat::Promoted);
                if promoted.conversation {
                    self.stats.inc(DaemonStat::PromotedConversation);
                }
                match self.sockmap.drain_both(&mut pair) {
                    Ok(()) => {
                        let demote = demote(&pair, promoted.conversation);
                        return Box::pin(self.sockmap.run(pair, Some(demote), true)).await;
                    }
                    // Not the moment (`splice_fallback_to_copy`): copied on, with the
                    // bytes the drain read, and promoted again once it crosses its
                    // thresholds again, counted from here and doubled (see
                    // `backed_off`).
                    Err(Declined::Busy(pending)) => {
                        declined += 1;
                        copied = Some(super::copy::Stopped {
                            pending,
                            ..Default::default()
                        });
                    }
                    Err(Declined::Failed(outcome)) => return outcome,
                }
            }
        }
    }
}

/// Most times a pair's thresholds double after hand-offs that did not go quiet.
const MAX_BACKOFF: u32 = 8;

/// `promote` after `declined` hand-offs that did not go quiet: each doubles the
/// thresholds (up to [`MAX_BACKOFF`] times), so that a sender that never pauses is
/// not drained again every `promote_after_bytes` (a drain copies up to 8 MiB without
/// yielding). The rates and the conversation rule stay.
fn backed_off(promote: Promote, declined: u32) -> Promote {
    let shift = declined.min(MAX_BACKOFF);
    Promote {
        after_bytes: promote.after_bytes.map(|b| b.saturating_mul(1 << shift)),
        after: promote.after.map(|d| d.saturating_mul(1 << shift)),
        ..promote
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Each declined hand-off doubles the thresholds, up to 2^MAX_BACKOFF; the rest
    /// of the rule stays.
    #[test]
    fn declined_hand_offs_double_the_thresholds() {
        let promote = Promote {
            after_bytes: Some(1 << 20),
            after: Some(Duration::from_secs(10)),
            max_rate: Some(1000),
            min_rate: Some(1),
            conversations: true,
        };
        assert_eq!(backed_off(promote, 0), promote);
        let twice = backed_off(promote, 2);
        assert_eq!(twice.after_bytes, Some(4 << 20));
        assert_eq!(twice.after, Some(Duration::from_secs(40)));
        assert_eq!(
            (twice.max_rate, twice.min_rate, twice.conversations),
            (Some(1000), Some(1), true)
        );
        assert_eq!(backed_off(promote, 30), backed_off(promote, MAX_BACKOFF));
        assert_eq!(backed_off(promote, 30).after_bytes, Some(256 << 20));
        let off = Promote::default();
        assert_eq!(backed_off(off, 3), off);
    }
}
