//! What every app was promised and what it saw: the invariants of the simulation.
//!
//! Each message carries its ledger number in the first 8 bytes of its payload, so the
//! recipient's `Message` event names it. Incremental checks run as events arrive (and so
//! after every step); [`Ledger::check_final`] runs after the quiet period.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use super::adapter::{AppEvent, Appended};

/// A violation: which invariant, and the details.
pub type Violation = String;

/// How the adapter names `FailReason::Unconfirmed` in [`Outcome::Failed`].
pub const UNCONFIRMED: &str = "unconfirmed";

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Delivered,
    Stored,
    Failed(String),
}

#[derive(Clone, Debug)]
pub struct Rec {
    pub no: u64,
    /// Sending client (index).
    pub sender: usize,
    pub from: u64,
    pub to: u64,
    pub id: u64,
    pub stored: bool,
    /// Sent in the final probe, after the quiet period: must succeed.
    pub probe: bool,
    pub outcome: Option<Outcome>,
    /// Times shown to each client's app.
    pub shown: BTreeMap<usize, u32>,
    /// The (recipient, seq) numbers it got in the durable store.
    pub seqs: Vec<u64>,
}

#[derive(Default)]
pub struct Ledger {
    pub recs: Vec<Rec>,
    client_user: Vec<u64>,
    by_client_id: BTreeMap<(usize, u64), u64>,
    by_user_id: BTreeMap<(u64, u64), u64>,
    /// Ledger numbers ever written to the durable store.
    pub durable: BTreeSet<u64>,
    /// Per client: the `Gap` ranges it was told about.
    gaps: Vec<Vec<(u64, u64)>>,
    /// (sending client, receiving client) → last stored message number shown.
    last_stored: BTreeMap<(usize, usize), u64>,
    /// Stored messages shown after a later one of the same sender while their own outcome
    /// was not known yet, with the violation to report unless the sender's SDK ends up
    /// saying `Failed(unconfirmed)`: a message that timed out in flight may still reach
    /// the relay (its bytes were in the network) after the ones sent after it, and the
    /// app was told it could not be confirmed (protocol.md, section 13).
    late_in_doubt: Vec<(u64, Violation)>,
    pub counts: Counts,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Counts {
    pub sent_direct: u64,
    pub sent_stored: u64,
    pub refused_at_send: u64,
    pub delivered: u64,
    pub stored: u64,
    pub failed: u64,
    pub shown: u64,
    pub gaps: u64,
    pub errors: u64,
    pub disconnects: u64,
    pub connects: u64,
}

impl Ledger {
    pub fn new(client_user: Vec<u64>) -> Ledger {
        let n = client_user.len();
        Ledger {
            client_user,
            gaps: vec![Vec::new(); n],
            ..Ledger::default()
        }
    }

    /// The payload of message `no`: its number, then `filler` bytes.
    pub fn payload(no: u64, filler: usize, fill: u8) -> Vec<u8> {
        let mut p = no.to_be_bytes().to_vec();
        p.resize(8 + filler, fill);
        p
    }

    pub fn next_no(&self) -> u64 {
        self.recs.len() as u64 + 1
    }

    pub fn record_send(
        &mut self,
        sender: usize,
        to: u64,
        id: u64,
        stored: bool,
        probe: bool,
    ) -> u64 {
        let no = self.next_no();
        let from = self.client_user[sender];
        self.recs.push(Rec {
            no,
            sender,
            from,
            to,
            id,
            stored,
            probe,
            outcome: None,
            shown: BTreeMap::new(),
            seqs: Vec::new(),
        });
        self.by_client_id.insert((sender, id), no);
        self.by_user_id.insert((from, id), no);
        if stored {
            self.counts.sent_stored += 1;
        } else {
            self.counts.sent_direct += 1;
        }
        no
    }

    fn rec(&mut self, no: u64) -> &mut Rec {
        &mut self.recs[(no - 1) as usize]
    }

    /// A record reached the durable store (a successful write, or a torn one).
    pub fn on_persisted(&mut self, a: Appended) -> Result<(), Violation> {
        let Some(&no) = self.by_user_id.get(&(a.source, a.msg_id)) else {
            return Err(format!(
                "store: an Append nobody sent (from {} id {:#x} to {} seq {})",
                a.source, a.msg_id, a.user, a.seq
            ));
        };
        let rec = self.rec(no);
        if rec.to != a.user || !rec.stored {
            return Err(format!(
                "store: message #{no} (to {}, stored {}) was stored for user {}",
                rec.to, rec.stored, a.user
            ));
        }
        if !rec.seqs.contains(&a.seq) {
            rec.seqs.push(a.seq);
        }
        self.durable.insert(no);
        Ok(())
    }

    pub fn on_event(&mut self, client: usize, ev: AppEvent) -> Result<(), Violation> {
        match ev {
            AppEvent::Connected => self.counts.connects += 1,
            AppEvent::Disconnected(_) => self.counts.disconnects += 1,
            AppEvent::Other(_) => {}
            AppEvent::Error {
                code,
                reason,
                protocol_violation,
            } => {
                self.counts.errors += 1;
                if protocol_violation {
                    return Err(format!(
                        "protocol error: client {client} got ERROR {code} ({reason}) answering none of its messages"
                    ));
                }
            }
            AppEvent::Gap { from, to } => {
                self.counts.gaps += 1;
                if from > to || from == 0 {
                    return Err(format!("client {client}: malformed Gap {from}..={to}"));
                }
                self.gaps[client].push((from, to));
            }
            AppEvent::Delivered { id } => {
                self.counts.delivered += 1;
                self.outcome(client, id, Outcome::Delivered)?;
            }
            AppEvent::Stored { id } => {
                self.counts.stored += 1;
                self.outcome(client, id, Outcome::Stored)?;
            }
            AppEvent::Failed { id, reason } => {
                self.counts.failed += 1;
                self.outcome(client, id, Outcome::Failed(reason))?;
            }
            AppEvent::Message { from, id, payload } => {
                self.counts.shown += 1;
                self.shown(client, from, id, &payload)?;
            }
        }
        Ok(())
    }

    fn outcome(&mut self, client: usize, id: u64, outcome: Outcome) -> Result<(), Violation> {
        let Some(&no) = self.by_client_id.get(&(client, id)) else {
            return Err(format!(
                "outcome: client {client} got {outcome:?} for id {id:#x}, which it never sent"
            ));
        };
        let durable = self.durable.contains(&no);
        let rec = self.rec(no);
        if let Some(first) = &rec.outcome {
            return Err(format!(
                "exactly one outcome: message #{no} (client {client} id {id:#x}) got {outcome:?} after {first:?}"
            ));
        }
        match (&outcome, rec.stored) {
            (Outcome::Delivered, true) => {
                return Err(format!("outcome: stored message #{no} reported Delivered"))
            }
            (Outcome::Stored, false) => {
                return Err(format!("outcome: direct message #{no} reported Stored"))
            }
            (Outcome::Stored, true) if !durable => {
                return Err(format!(
                    "durability: message #{no} (client {client} → user {}) reported Stored but it is not in the durable store",
                    rec.to
                ))
            }
            _ => {}
        }
        rec.outcome = Some(outcome);
        Ok(())
    }

    fn shown(
        &mut self,
        client: usize,
        from: u64,
        id: u64,
        payload: &[u8],
    ) -> Result<(), Violation> {
        if payload.len() < 8 {
            return Err(format!(
                "client {client}: a message with a {}-byte payload",
                payload.len()
            ));
        }
        let no = u64::from_be_bytes(payload[..8].try_into().unwrap());
        if no == 0 || no > self.recs.len() as u64 {
            return Err(format!("client {client}: a message nobody sent (#{no})"));
        }
        let me = self.client_user[client];
        let durable = self.durable.contains(&no);
        let rec = self.rec(no);
        if rec.from != from || rec.id != id || rec.to != me {
            return Err(format!(
                "routing: client {client} (user {me}) shown #{no} as from {from} id {id:#x}; it was from {} id {:#x} to {}",
                rec.from, rec.id, rec.to
            ));
        }
        let n = rec.shown.entry(client).or_insert(0);
        *n += 1;
        if *n > 1 {
            let kind = if rec.stored { "stored" } else { "direct" };
            return Err(format!(
                "at most once: {kind} message #{no} (client {} → user {}) shown {} times to client {client}",
                rec.sender, rec.to, n
            ));
        }
        if rec.stored {
            if !durable {
                return Err(format!(
                    "durability: stored message #{no} shown to client {client} before it was in the durable store"
                ));
            }
            let sender = rec.sender;
            let last = *self.last_stored.entry((sender, client)).or_insert(0);
            if last > no {
                let seqs = self.rec(no).seqs.clone();
                let last_seqs = self.rec(last).seqs.clone();
                let kind = if seqs.len() > 1 {
                    "order (a resend stored again after a relay restart)"
                } else {
                    "order"
                };
                let violation = format!(
                    "{kind}: client {client} shown stored #{no} (seqs {seqs:?}) from client {sender} after #{last} (seqs {last_seqs:?})"
                );
                match &self.rec(no).outcome {
                    Some(Outcome::Failed(reason)) if reason == UNCONFIRMED => {}
                    None => self.late_in_doubt.push((no, violation)),
                    Some(_) => return Err(violation),
                }
                return Ok(());
            }
            self.last_stored.insert((sender, client), no);
        }
        Ok(())
    }

    fn gapped(&self, rec: &Rec, clients: &[usize]) -> bool {
        clients.iter().any(|&c| {
            self.gaps[c]
                .iter()
                .any(|&(a, b)| rec.seqs.iter().any(|s| (a..=b).contains(s)))
        })
    }

    /// After the quiet period and the probe: everything answered, everything stored
    /// shown, the probe through.
    pub fn check_final(&self, pending: &[usize], all_ready: bool) -> Result<(), Violation> {
        let mut problems = String::new();
        for (no, violation) in &self.late_in_doubt {
            let outcome = &self.recs[(*no - 1) as usize].outcome;
            if !matches!(outcome, Some(Outcome::Failed(r)) if r == UNCONFIRMED) {
                let _ = write!(problems, "{violation}; ");
            }
        }
        for (c, &p) in pending.iter().enumerate() {
            if p != 0 {
                let _ = write!(problems, "client {c} still has {p} pending; ");
            }
        }
        for rec in &self.recs {
            let recipients: Vec<usize> = (0..self.client_user.len())
                .filter(|&c| self.client_user[c] == rec.to)
                .collect();
            let shown: u32 = recipients
                .iter()
                .map(|c| rec.shown.get(c).copied().unwrap_or(0))
                .sum();
            let tag = format!(
                "#{} ({} client {} → user {}, id {:#x}, outcome {:?}, seqs {:?})",
                rec.no,
                if rec.stored { "stored" } else { "direct" },
                rec.sender,
                rec.to,
                rec.id,
                rec.outcome,
                rec.seqs
            );
            if rec.outcome.is_none() {
                let _ = write!(problems, "exactly one outcome: {tag} has none; ");
            }
            if rec.stored && shown == 0 && !self.gapped(rec, &recipients) {
                if rec.outcome == Some(Outcome::Stored) {
                    let _ = write!(
                        problems,
                        "stored message lost: {tag} was ACKed as stored and never shown; "
                    );
                } else if self.durable.contains(&rec.no) {
                    let _ = write!(
                        problems,
                        "durable message lost: {tag} is in the store and was never shown; "
                    );
                }
            }
            if rec.probe && all_ready {
                let want = if rec.stored {
                    Outcome::Stored
                } else {
                    Outcome::Delivered
                };
                if rec.outcome.as_ref() != Some(&want) {
                    let _ = write!(problems, "liveness: probe {tag} did not end {want:?}; ");
                }
                let missing: Vec<usize> = recipients
                    .iter()
                    .copied()
                    .filter(|c| !rec.shown.contains_key(c))
                    .collect();
                if !rec.stored && !missing.is_empty() || rec.stored && shown == 0 {
                    let _ = write!(
                        problems,
                        "liveness: probe {tag} not shown to clients {missing:?}; "
                    );
                }
            }
            if problems.len() > 2000 {
                break;
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }
}
