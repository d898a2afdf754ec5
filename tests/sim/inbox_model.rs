//! A model of the Redis inbox functions (`src/server/cluster_inbox.lua`) for the in-memory
//! cluster tests (`src/relay/tests/cluster.rs`) and the cluster simulation
//! (`tests/sim_cluster.rs`): stores, syncs, acknowledgements and fetches, with the notices a
//! store publishes. Limits, expiry and device eviction are left to the end-to-end tests
//! against the real functions (`tests/e2e_cluster_stored.rs`). Written against the
//! crate's public API only, so both can include it.

use std::collections::{BTreeMap, HashMap, HashSet};

use bytes::Bytes;

use imrelay::relay::{ClusterReply, InboxOp, FETCH_BATCH, NO_ORIGIN, STORED_NOTICE};

/// One stored message: its INBOX_DELIVER frame and the device a copy came from.
struct Entry {
    frame: Bytes,
    origin: u64,
}

#[derive(Default)]
struct UserInbox {
    entries: BTreeMap<u64, Entry>,
    last: u64,
    /// device -> acknowledged up to.
    devices: HashMap<u64, u64>,
}

/// The inboxes, as Redis would hold them.
#[derive(Default)]
pub struct InboxModel {
    users: HashMap<u64, UserInbox>,
    high: u64,
    epoch: Option<u64>,
    dedup: HashMap<(u64, u64), String>,
    /// Every acknowledgement the functions ran: (user, upto).
    pub acks: Vec<(u64, u64)>,
}

/// The answer to one command, and the notices it published: (node, channel, payload).
pub struct ModelReply {
    pub answer: ClusterReply,
    pub notices: Vec<(usize, String, Bytes)>,
}

fn bulk(s: impl Into<Bytes>) -> ClusterReply {
    ClusterReply::Bulk(Some(s.into()))
}

impl InboxModel {
    /// Runs `op` for node `node`; `subscribed` is who gets a PUBLISH.
    pub fn handle(
        &mut self,
        _node: usize,
        op: InboxOp,
        subscribed: &mut HashMap<String, HashSet<usize>>,
    ) -> ModelReply {
        let mut notices = Vec::new();
        let answer = match op {
            InboxOp::Epoch { candidate } => bulk(self.epoch(candidate).to_string()),
            InboxOp::Store(r) => {
                let epoch = self.epoch(r.candidate);
                let copy = r.sender != r.recipient
                    && self
                        .users
                        .get(&r.sender.0)
                        .is_some_and(|u| u.devices.keys().any(|&d| d != r.device));
                let mut results = Vec::new();
                let (mut frames, mut copies) = (Vec::new(), Vec::new());
                // (index in results, DEDUP key) of what was stored: their count is the
                // notice's receivers.
                let mut stored = Vec::new();
                for m in &r.messages {
                    let msg_id = u64::from_be_bytes(m.header[8..16].try_into().unwrap_or_default());
                    let key = m.dedup.then_some((r.sender.0, msg_id));
                    if let Some(value) = key.and_then(|k| self.dedup.get(&k)) {
                        results.push(vec![bulk("dup"), bulk(value.clone())]);
                        continue;
                    }
                    let seq = self.append(r.recipient.0, &m.header, &m.payload, NO_ORIGIN);
                    frames.push(self.frame_of(r.recipient.0, seq));
                    if copy {
                        let cseq = self.append(r.sender.0, &m.header, &m.payload, r.device);
                        copies.push(self.frame_of(r.sender.0, cseq));
                    }
                    if let Some(k) = key {
                        // Until the notice is out: a resend later in this batch is a dup.
                        self.dedup.insert(k, String::new());
                    }
                    stored.push((results.len(), key));
                    results.push(vec![ClusterReply::Integer(seq as i64)]);
                }
                let nodes = notify(r.recipient.0, NO_ORIGIN, &frames, subscribed, &mut notices);
                notify(r.sender.0, r.device, &copies, subscribed, &mut notices);
                for (_, key) in stored {
                    if let Some(k) = key {
                        self.dedup.insert(k, nodes.to_string());
                    }
                }
                for r in &mut results {
                    if r.len() == 2 && r[1] == bulk("") {
                        r[1] = bulk(nodes.to_string());
                    }
                }
                // As the function answers: epoch, nodes, then per message its seq or why not.
                let mut answer = vec![bulk(epoch.to_string()), ClusterReply::Integer(nodes as i64)];
                answer.extend(results.into_iter().map(|mut r| match r.len() {
                    1 => r.remove(0),
                    _ => ClusterReply::Array(r),
                }));
                ClusterReply::Array(answer)
            }
            InboxOp::Sync {
                user,
                device,
                epoch: client_epoch,
                last,
                candidate,
                ..
            } => {
                let epoch = self.epoch(candidate);
                let high = self.high;
                let inbox = self.users.entry(user.0).or_insert_with(|| UserInbox {
                    last: high,
                    ..UserInbox::default()
                });
                let client = if client_epoch == epoch {
                    last.min(inbox.last)
                } else {
                    0
                };
                let known = inbox.devices.contains_key(&device);
                let new_device = !known && client == 0;
                let acked = inbox.devices.get(&device).copied().unwrap_or(0).max(client);
                inbox.devices.insert(device, acked);
                let min = inbox.devices.values().copied().min().unwrap_or(0);
                inbox.entries.retain(|&seq, _| seq > min);
                let first = inbox
                    .entries
                    .keys()
                    .next()
                    .copied()
                    .unwrap_or(inbox.last + 1);
                let after = if new_device { 0 } else { client };
                let mut answer = vec![bulk(epoch.to_string())];
                answer.extend(
                    [first, inbox.last, 0, u64::from(new_device), after]
                        .map(|n| ClusterReply::Integer(n as i64)),
                );
                ClusterReply::Array(answer)
            }
            InboxOp::Ack {
                user, device, upto, ..
            } => {
                self.acks.push((user.0, upto));
                if let Some(inbox) = self.users.get_mut(&user.0) {
                    let acked = inbox.devices.entry(device).or_insert(0);
                    *acked = (*acked).max(upto.min(inbox.last));
                    let min = inbox.devices.values().copied().min().unwrap_or(0);
                    inbox.entries.retain(|&seq, _| seq > min);
                }
                ClusterReply::Integer(1)
            }
            InboxOp::Fetch { user, after } => {
                let entries = self.users.get(&user.0).map_or(Vec::new(), |inbox| {
                    inbox
                        .entries
                        .range(after + 1..)
                        .take(FETCH_BATCH)
                        .map(|(seq, e)| {
                            ClusterReply::Array(vec![
                                bulk(format!("{seq}-0")),
                                ClusterReply::Array(vec![
                                    bulk("f"),
                                    bulk(e.frame.clone()),
                                    bulk("o"),
                                    bulk(Bytes::copy_from_slice(&e.origin.to_be_bytes())),
                                    bulk("t"),
                                    bulk("0"),
                                ]),
                            ])
                        })
                        .collect()
                });
                ClusterReply::Array(entries)
            }
        };
        ModelReply { answer, notices }
    }

    fn epoch(&mut self, candidate: u64) -> u64 {
        *self.epoch.get_or_insert(candidate)
    }

    /// Appends a message to `user`'s inbox; returns its seq.
    fn append(&mut self, user: u64, header: &[u8], payload: &[u8], origin: u64) -> u64 {
        let high = self.high;
        let inbox = self.users.entry(user).or_insert_with(|| UserInbox {
            last: high,
            ..UserInbox::default()
        });
        inbox.last += 1;
        let seq = inbox.last;
        self.high = self.high.max(seq);
        let mut frame = header.to_vec();
        frame.extend_from_slice(&seq.to_be_bytes());
        frame.extend_from_slice(&1_700_000_000_000u64.to_be_bytes());
        frame.extend_from_slice(payload);
        inbox.entries.insert(
            seq,
            Entry {
                frame: Bytes::from(frame),
                origin,
            },
        );
        seq
    }

    fn frame_of(&self, user: u64, seq: u64) -> Bytes {
        self.users[&user].entries[&seq].frame.clone()
    }
}

/// Publishes one notice of `frames` (a store's, in order) on `user`'s channel; returns
/// how many nodes got it (none when there is nothing to publish).
fn notify(
    user: u64,
    origin: u64,
    frames: &[Bytes],
    subscribed: &HashMap<String, HashSet<usize>>,
    notices: &mut Vec<(usize, String, Bytes)>,
) -> usize {
    if frames.is_empty() {
        return 0;
    }
    let channel = format!("imrelay:u:{user}");
    let mut notice = STORED_NOTICE.to_be_bytes().to_vec();
    notice.extend_from_slice(&origin.to_be_bytes());
    for frame in frames {
        notice.extend_from_slice(frame);
    }
    let notice = Bytes::from(notice);
    let to: Vec<usize> = subscribed
        .get(&channel)
        .map(|s| s.iter().copied().collect())
        .unwrap_or_default();
    for &j in &to {
        notices.push((j, channel.clone(), notice.clone()));
    }
    to.len()
}
