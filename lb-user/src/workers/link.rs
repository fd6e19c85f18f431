//! The link between the supervisor and one of its workers (a [`Channel`] pair made
//! at the fork): how a hot upgrade of `[global] workers` reaches each worker. The
//! supervisor sends [`Message::HandOver`] with the channel to the worker's successor;
//! the worker hands everything over as a lone daemon does and answers
//! [`Message::HandedOver`].

use tokio::sync::{mpsc, oneshot};
use tracing::warn;

use crate::upgrade::{Message, Request, channel::Channel};

/// The worker's side: follows the supervisor's requests on `link`, on a thread of its
/// own, passing each to the daemon's upgrade requests.
pub fn follow(link: Channel, requests: mpsc::Sender<Request>) {
    std::thread::spawn(move || {
        loop {
            match link.recv(None) {
                Ok((Message::HandOver, _, fds)) => {
                    let outcome = match <[_; 1]>::try_from(fds) {
                        Ok([fd]) => hand_over(Channel::from_fd(fd), &requests, &link),
                        Err(_) => Err("a hand-over without its channel".to_owned()),
                    };
                    if let Err(e) = outcome {
                        let _ = link.send(&Message::HandedOver { outcome: Err(e) }, &[], &[]);
                    }
                }
                Ok((other, _, _)) => warn!(?other, "unexpected message from the supervisor"),
                // The supervisor went away (it stops its workers first).
                Err(_) => return,
            }
        }
    });
}

/// Asks the daemon to hand over to the successor on `successor` and sends the
/// outcome on `link` before the daemon may exit.
fn hand_over(
    successor: Channel,
    requests: &mpsc::Sender<Request>,
    link: &Channel,
) -> Result<(), String> {
    let (reply, outcome) = oneshot::channel();
    let (answered, answered_rx) = oneshot::channel();
    let request = Request {
        binary: None,
        reply: Some(reply),
        answered: Some(answered_rx),
        successor: Some(successor),
    };
    requests
        .try_send(request)
        .map_err(|_| crate::upgrade::UpgradeError::Busy.to_string())?;
    let outcome = outcome
        .blocking_recv()
        .unwrap_or_else(|_| Err("the worker gave no answer".to_owned()));
    let sent = link.send(&Message::HandedOver { outcome }, &[], &[]);
    let _ = answered.send(());
    sent.map_err(|e| e.to_string())
}
