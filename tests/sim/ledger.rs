//! What every app was promised and what it saw: the invariants of the simulation.
//!
//! Each message carries its ledger number in the first 8 bytes of its payload, so the
//! recipient's `Message` event (and a `SentFromOtherDevice` copy) names it. Incremental
//! checks run as events arrive (and so after every step); [`Ledger::check_final`] runs
//! after the quiet period.
//!
//! **Devices.** Each client is one connection of a device of its user (protocol.md,
//! section 15.1): clients naming the same device id (or none: the default device) are one
//! device. The ledger follows the durable store's records as they reach the disk: a
//! `Cursor` record makes a device *tracked*, `ForgetDevice`/`Forget` untrack it.
//! - A stored message is expected on every device of its recipient that was tracked when
//!   one of its `Append` records reached the disk.
//! - A `SentCopy` (a copy of a message the user sent stored) is expected on every device
//!   of the sender's user tracked when it reached the disk, except the device it was sent
//!   from, and is never shown there (not even to another client of that device).
//! - A message ACKed as stored whose `Append` reached the disk while the sender's user had
//!   another device tracked must have its `SentCopy` on disk.
//!
//! "Shown on a device" means shown to at least one of the device's clients (they share
//! the device's cursor at the relay), unless one of them was told of a `Gap` covering it.
//! At most once, order and durability are checked per client.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use super::adapter::{device_tag, AppEvent, Appended, Record};

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
    /// Devices of the recipient tracked when one of its `Append`s reached the disk: each
    /// must show it (unless told of a gap covering it).
    pub expect: BTreeSet<usize>,
    /// The copy for the sender's other devices (`SentCopy`): its numbers in the sender's
    /// inbox, whether one reached the disk, the devices that must show it, and the times
    /// it was shown to each client.
    pub copy_seqs: Vec<u64>,
    pub copy_durable: bool,
    /// When one of its `Append`s reached the disk, the sender's user had a device tracked
    /// besides the one it was sent from: the relay owes it a copy.
    pub copy_due: bool,
    pub copy_expect: BTreeSet<usize>,
    pub copy_shown: BTreeMap<usize, u32>,
}

/// One device of a user: the clients that log in naming it (or none: the default device).
#[derive(Clone, Debug)]
pub struct Device {
    pub user: u64,
    pub name: Option<String>,
    /// The tag the relay records it by.
    pub tag: u64,
    pub clients: Vec<usize>,
}

#[derive(Default)]
pub struct Ledger {
    pub recs: Vec<Rec>,
    client_user: Vec<u64>,
    /// Per client: its device (an index into `devices`).
    client_device: Vec<usize>,
    devices: Vec<Device>,
    /// (user, tag) → device.
    device_at: BTreeMap<(u64, u64), usize>,
    /// Devices tracked according to the durable store's records so far.
    tracked: BTreeSet<usize>,
    by_client_id: BTreeMap<(usize, u64), u64>,
    by_user_id: BTreeMap<(u64, u64), u64>,
    /// Ledger numbers ever written to the durable store.
    pub durable: BTreeSet<u64>,
    /// Per client: the `Gap` ranges it was told about.
    gaps: Vec<Vec<(u64, u64)>>,
    /// (sending client, receiving client) → last stored message number shown (a message
    /// or a copy: both come from the receiving client's own inbox, in the order the
    /// sending client sent them).
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
    pub copies_stored: u64,
    pub copies_shown: u64,
    pub gaps: u64,
    pub errors: u64,
    pub disconnects: u64,
    pub connects: u64,
}

impl Ledger {
    /// A ledger for clients logging in as (user, device id).
    pub fn new(clients: &[(u64, Option<String>)]) -> Ledger {
        let mut devices: Vec<Device> = Vec::new();
        let mut device_at = BTreeMap::new();
        let mut client_device = Vec::new();
        for (c, (user, name)) in clients.iter().enumerate() {
            let tag = device_tag(name.as_deref());
            let d = *device_at.entry((*user, tag)).or_insert_with(|| {
                devices.push(Device {
                    user: *user,
                    name: name.clone(),
                    tag,
                    clients: Vec::new(),
                });
                devices.len() - 1
            });
            devices[d].clients.push(c);
            client_device.push(d);
        }
        Ledger {
            client_user: clients.iter().map(|(u, _)| *u).collect(),
            client_device,
            devices,
            device_at,
            gaps: vec![Vec::new(); clients.len()],
            ..Ledger::default()
        }
    }

    /// How a device is named in reports.
    fn device_name(&self, d: usize) -> String {
        let dev = &self.devices[d];
        format!(
            "{} of user {} (clients {:?})",
            dev.name
                .as_deref()
                .map_or("the default device".to_string(), |n| format!(
                    "device {n:?}"
                )),
            dev.user,
            dev.clients
        )
    }

    /// The tracked devices of `user`.
    fn tracked_of(&self, user: u64) -> impl Iterator<Item = usize> + '_ {
        self.tracked
            .iter()
            .copied()
            .filter(move |&d| self.devices[d].user == user)
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
            expect: BTreeSet::new(),
            copy_seqs: Vec::new(),
            copy_durable: false,
            copy_due: false,
            copy_expect: BTreeSet::new(),
            copy_shown: BTreeMap::new(),
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
    pub fn on_persisted(&mut self, r: Record) -> Result<(), Violation> {
        match r {
            Record::Append(a) => self.on_append(a),
            Record::Copy { a, origin } => self.on_copy(a, origin),
            Record::Cursor { user, device } => {
                let Some(&d) = self.device_at.get(&(user, device)) else {
                    return Err(format!(
                        "store: a cursor for device tag {device:#x} of user {user}, which no client logs in as"
                    ));
                };
                self.tracked.insert(d);
                Ok(())
            }
            Record::ForgetDevice { user, device } => {
                if let Some(d) = self.device_at.get(&(user, device)) {
                    self.tracked.remove(d);
                }
                Ok(())
            }
            Record::Forget { user } => {
                let devices = &self.devices;
                self.tracked.retain(|&d| devices[d].user != user);
                Ok(())
            }
        }
    }

    fn on_append(&mut self, a: Appended) -> Result<(), Violation> {
        let Some(&no) = self.by_user_id.get(&(a.source, a.msg_id)) else {
            return Err(format!(
                "store: an Append nobody sent (from {} id {:#x} to {} seq {})",
                a.source, a.msg_id, a.user, a.seq
            ));
        };
        let tracked: Vec<usize> = self.tracked_of(a.user).collect();
        // The sender's user has another device tracked: the relay keeps a copy too.
        let (from, sender) = {
            let rec = &self.recs[(no - 1) as usize];
            (rec.from, rec.sender)
        };
        let from_device = self.client_device[sender];
        let copy_due = from != a.user && self.tracked_of(from).any(|d| d != from_device);
        let rec = self.rec(no);
        rec.copy_due |= copy_due;
        if rec.to != a.user || !rec.stored {
            return Err(format!(
                "store: message #{no} (to {}, stored {}) was stored for user {}",
                rec.to, rec.stored, a.user
            ));
        }
        if !rec.seqs.contains(&a.seq) {
            rec.seqs.push(a.seq);
        }
        rec.expect.extend(tracked);
        self.durable.insert(no);
        Ok(())
    }

    fn on_copy(&mut self, a: Appended, origin: u64) -> Result<(), Violation> {
        let Some(&no) = self.by_user_id.get(&(a.source, a.msg_id)) else {
            return Err(format!(
                "store: a SentCopy nobody sent (from {} id {:#x} to {}, in the inbox of {} seq {})",
                a.source, a.msg_id, a.target, a.user, a.seq
            ));
        };
        let from_device = self.client_device[self.recs[(no - 1) as usize].sender];
        let from_tag = self.devices[from_device].tag;
        let tracked: Vec<usize> = self
            .tracked_of(a.user)
            .filter(|&d| d != from_device)
            .collect();
        let rec = self.rec(no);
        if a.user != rec.from || a.source != rec.from || a.target != rec.to || !rec.stored {
            return Err(format!(
                "store: message #{no} (from {} to {}, stored {}) was kept as a copy in the inbox of {} (source {} target {})",
                rec.from, rec.to, rec.stored, a.user, a.source, a.target
            ));
        }
        if rec.to == rec.from {
            return Err(format!(
                "store: message #{no} to its own sender (user {}) was kept as a copy too",
                rec.to
            ));
        }
        if origin != from_tag {
            return Err(format!(
                "store: the copy of #{no} names origin device {origin:#x}; it was sent from {from_tag:#x} (client {})",
                rec.sender
            ));
        }
        if !rec.copy_seqs.contains(&a.seq) {
            rec.copy_seqs.push(a.seq);
        }
        rec.copy_expect.extend(tracked);
        if !rec.copy_durable {
            rec.copy_durable = true;
            self.counts.copies_stored += 1;
        }
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
            AppEvent::SentFromOtherDevice { to, id, payload } => {
                self.counts.copies_shown += 1;
                self.shown_copy(client, to, id, &payload)?;
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

    /// The ledger number a shown payload carries.
    fn payload_no(&self, client: usize, payload: &[u8]) -> Result<u64, Violation> {
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
        Ok(no)
    }

    /// A `Message` event.
    fn shown(
        &mut self,
        client: usize,
        from: u64,
        id: u64,
        payload: &[u8],
    ) -> Result<(), Violation> {
        let no = self.payload_no(client, payload)?;
        let me = self.client_user[client];
        let rec = self.rec(no);
        if rec.from != from || rec.id != id || rec.to != me {
            return Err(format!(
                "routing: client {client} (user {me}) shown #{no} as from {from} id {id:#x}; it was from {} id {:#x} to {}",
                rec.from, rec.id, rec.to
            ));
        }
        self.show(client, no, false)
    }

    /// A `SentFromOtherDevice` event: a copy of a stored message the client's user sent
    /// from another device.
    fn shown_copy(
        &mut self,
        client: usize,
        to: u64,
        id: u64,
        payload: &[u8],
    ) -> Result<(), Violation> {
        let no = self.payload_no(client, payload)?;
        let me = self.client_user[client];
        let mine = self.client_device[client];
        let rec = &self.recs[(no - 1) as usize];
        if rec.from != me || rec.to != to || rec.id != id || rec.to == me {
            return Err(format!(
                "routing: client {client} (user {me}) shown #{no} as a copy of its user's message to {to} id {id:#x}; it was from {} id {:#x} to {}",
                rec.from, rec.id, rec.to
            ));
        }
        if !rec.stored {
            return Err(format!(
                "copy: client {client} shown a copy of direct message #{no} (direct messages are not copied)"
            ));
        }
        if self.client_device[rec.sender] == mine {
            return Err(format!(
                "own copy: client {client} ({}) shown a copy of #{no}, which client {} sent from that same device",
                self.device_name(mine),
                rec.sender
            ));
        }
        self.show(client, no, true)
    }

    /// What is checked per client of every message or copy shown: at most once, durable
    /// first, in the sender's order.
    fn show(&mut self, client: usize, no: u64, copy: bool) -> Result<(), Violation> {
        let durable = if copy {
            self.rec(no).copy_durable
        } else {
            self.durable.contains(&no)
        };
        let what = if copy { "the copy of " } else { "" };
        let rec = self.rec(no);
        let shown = if copy {
            &mut rec.copy_shown
        } else {
            &mut rec.shown
        };
        let n = shown.entry(client).or_insert(0);
        *n += 1;
        if *n > 1 {
            let kind = if rec.stored { "stored" } else { "direct" };
            return Err(format!(
                "at most once: {what}{kind} message #{no} (client {} → user {}) shown {} times to client {client}",
                rec.sender, rec.to, n
            ));
        }
        if rec.stored {
            if !durable {
                return Err(format!(
                    "durability: {what}stored message #{no} shown to client {client} before it was in the durable store"
                ));
            }
            let sender = rec.sender;
            let last = *self.last_stored.entry((sender, client)).or_insert(0);
            if last > no {
                // Numbers in the receiving client's inbox (a copy's are its `copy_seqs`).
                let me = self.client_user[client];
                let seqs_of = |r: &Rec| {
                    if r.from == me && r.to != me {
                        r.copy_seqs.clone()
                    } else {
                        r.seqs.clone()
                    }
                };
                let seqs = seqs_of(&self.recs[(no - 1) as usize]);
                let last_seqs = seqs_of(&self.recs[(last - 1) as usize]);
                let kind = if seqs.len() > 1 {
                    "order (a resend stored again after a relay restart)"
                } else {
                    "order"
                };
                let violation = format!(
                    "{kind}: client {client} shown {what}stored #{no} (seqs {seqs:?}) from client {sender} after #{last} (seqs {last_seqs:?})"
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

    /// True when one of `clients` was told of a gap covering one of `seqs`.
    fn gapped(&self, seqs: &[u64], clients: &[usize]) -> bool {
        clients.iter().any(|&c| {
            self.gaps[c]
                .iter()
                .any(|&(a, b)| seqs.iter().any(|s| (a..=b).contains(s)))
        })
    }

    /// The devices of `expect` none of whose clients was shown the message (`shown`)
    /// or told of a gap covering it (`seqs`), as report text.
    fn missing_on(
        &self,
        expect: &BTreeSet<usize>,
        shown: &BTreeMap<usize, u32>,
        seqs: &[u64],
    ) -> Vec<String> {
        expect
            .iter()
            .filter(|&&d| {
                let clients = &self.devices[d].clients;
                !clients.iter().any(|c| shown.contains_key(c)) && !self.gapped(seqs, clients)
            })
            .map(|&d| self.device_name(d))
            .collect()
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
            if rec.stored && shown == 0 && !self.gapped(&rec.seqs, &recipients) {
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
            if rec.stored && self.durable.contains(&rec.no) {
                let missing = self.missing_on(&rec.expect, &rec.shown, &rec.seqs);
                if !missing.is_empty() {
                    let kind = if rec.outcome == Some(Outcome::Stored) {
                        "stored"
                    } else {
                        "durable"
                    };
                    let _ = write!(
                        problems,
                        "{kind} message lost on a device: {tag} never shown on {}, tracked when it was stored; ",
                        missing.join(", ")
                    );
                }
            }
            if rec.copy_due && !rec.copy_durable && rec.outcome == Some(Outcome::Stored) {
                let _ = write!(
                    problems,
                    "copy missing: {tag} was ACKed as stored while its sender's user had another device tracked, and no copy of it reached the durable store; "
                );
            }
            if rec.copy_durable {
                let missing = self.missing_on(&rec.copy_expect, &rec.copy_shown, &rec.copy_seqs);
                if !missing.is_empty() {
                    let _ = write!(
                        problems,
                        "copy lost: the copy of {tag} (seqs {:?} in the sender's inbox) never shown on {}, tracked when it was stored; ",
                        rec.copy_seqs,
                        missing.join(", ")
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
