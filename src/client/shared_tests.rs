//! [`SharedClient`] across threads: a poll blocked with a long timeout ends as soon as
//! another thread gives it work (a send, a close), never by its timeout. The assertions
//! are on events and on what ended the wait (the wake pipe, counted in test builds), not
//! on elapsed time: a poll that missed its wake-up and found the event only when its
//! timeout ran out fails the test instead of passing late. Also the [`Listener`] (the
//! callback style) over a live relay.

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use super::*;
use crate::proto::UserId;

/// Longer than any test should take: reaching it means a wake-up was missed.
const LONG: Duration = Duration::from_secs(60);

/// How many blocked polls the wake pipe ended.
fn wakeups(client: &SharedClient) -> usize {
    client.woken.load(Ordering::SeqCst)
}

/// An address where nothing listens: every connect is refused at once.
fn dead_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr")
}

/// A client whose link stays down: it reconnects only after `LONG`s of backoff.
fn stranded(user: u64) -> Arc<SharedClient> {
    let mut config = ClientConfig::new(UserId(user));
    config.backoff_initial = LONG * 10;
    config.backoff_max = LONG * 10;
    let client = SharedClient::start(dead_addr(), config).expect("wake pipe");
    match client.poll_event(LONG) {
        Polled::Event(Event::Disconnected {
            reason: DisconnectReason::ConnectFailed(_),
            ..
        }) => {}
        other => panic!("expected a refused connect, got {other:?}"),
    }
    Arc::new(client)
}

/// Runs `poll` on a new thread and returns once that thread is blocked in the wait.
fn blocked_poll<T: Send + 'static>(
    client: &Arc<SharedClient>,
    poll: impl FnOnce(&SharedClient) -> T + Send + 'static,
) -> thread::JoinHandle<T> {
    let waiting = client.waiting.load(Ordering::SeqCst);
    let poller = Arc::clone(client);
    let handle = thread::spawn(move || poll(&poller));
    while client.waiting.load(Ordering::SeqCst) == waiting {
        thread::yield_now();
    }
    handle
}

#[test]
fn close_from_another_thread_ends_a_blocked_poll_with_closed() {
    let client = stranded(1);
    let poller = blocked_poll(&client, |c| c.poll_event(LONG));
    client.close();
    assert_eq!(poller.join().expect("poller"), Polled::Event(Event::Closed));
    assert!(wakeups(&client) >= 1, "the close woke the poll");
    // Nothing more will come, and every poll says so at once.
    assert_eq!(client.poll_event(LONG), Polled::Finished);
    assert_eq!(client.send(UserId(2), &b"late"[..]), Err(SendError::Closed));
}

#[test]
fn a_send_from_another_thread_gives_a_blocked_poll_its_deadline() {
    let mut config = ClientConfig::new(UserId(1));
    config.backoff_initial = LONG * 10;
    config.backoff_max = LONG * 10;
    // The message can never be written (the link is down): it fails at its send timeout,
    // a deadline the blocked poll learns only through the wake-up.
    config.send_timeout = Duration::from_millis(50);
    let client = SharedClient::start(dead_addr(), config).expect("wake pipe");
    assert!(matches!(
        client.poll_event(LONG),
        Polled::Event(Event::Disconnected { .. })
    ));
    let client = Arc::new(client);
    let poller = blocked_poll(&client, |c| c.poll_event(LONG));
    let id = client.send(UserId(2), &b"hello"[..]).expect("queued");
    assert_eq!(
        poller.join().expect("poller"),
        Polled::Event(Event::Failed {
            id,
            reason: FailReason::NotSent
        })
    );
    assert!(wakeups(&client) >= 1, "the send woke the poll");
}

#[test]
fn every_poller_learns_the_end_when_one_takes_closed() {
    let client = stranded(1);
    let first = blocked_poll(&client, |c| c.poll_event(LONG));
    let second = blocked_poll(&client, |c| {
        // Whichever thread gets `Closed`, the other learns there is nothing more.
        let polled = c.poll_event(LONG);
        (polled, c.poll_event(LONG))
    });
    client.close();
    let a = first.join().expect("first");
    let (b, b_after) = second.join().expect("second");
    let mut outcomes = [a, b];
    outcomes.sort_by_key(|p| matches!(p, Polled::Finished));
    assert_eq!(
        outcomes,
        [Polled::Event(Event::Closed), Polled::Finished],
        "exactly one poller gets Closed"
    );
    assert_eq!(b_after, Polled::Finished);
    assert!(wakeups(&client) >= 1, "the pollers were woken");
}

/// With a live relay: the relay of `crate::server` on a free port.
#[cfg(feature = "server")]
mod live {
    use super::*;
    use crate::server::Server;

    struct Relay {
        addr: SocketAddr,
        stop: crate::server::ShutdownHandle,
        thread: Option<thread::JoinHandle<()>>,
    }

    impl Relay {
        fn start() -> Relay {
            let any = "127.0.0.1:0".parse().expect("addr");
            let mut server = Server::bind(any, crate::relay::Config::default()).expect("bind");
            let addr = server.local_addr();
            let stop = server.shutdown_handle();
            let thread = thread::spawn(move || server.run().expect("relay loop"));
            Relay {
                addr,
                stop,
                thread: Some(thread),
            }
        }
    }

    impl Drop for Relay {
        fn drop(&mut self) {
            self.stop.shutdown();
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }

    fn login(relay: &Relay, user: u64) -> Arc<SharedClient> {
        let (client, _) = SharedClient::connect(relay.addr, ClientConfig::new(UserId(user)), LONG)
            .expect("login");
        Arc::new(client)
    }

    #[test]
    fn a_poll_blocked_on_a_live_link_returns_with_the_answer_to_another_threads_send() {
        let relay = Relay::start();
        let bob = login(&relay, 2);
        let alice = login(&relay, 1);
        let poller = blocked_poll(&alice, |c| c.poll_event(LONG));
        let id = alice.send(UserId(2), &b"hi bob"[..]).expect("send");
        assert_eq!(
            poller.join().expect("poller"),
            Polled::Event(Event::Delivered { id, devices: 1 })
        );
        match bob.poll_event(LONG) {
            Polled::Event(Event::Message { from, payload, .. }) => {
                assert_eq!((from, &payload[..]), (UserId(1), &b"hi bob"[..]));
            }
            other => panic!("bob got {other:?}"),
        }
        assert_eq!(alice.close_and_drain(LONG).last(), Some(&Event::Closed));
    }

    #[test]
    fn a_sending_thread_and_a_polling_thread_account_for_every_message() {
        const COUNT: usize = 2000;
        let relay = Relay::start();
        let bob = login(&relay, 2);
        let alice = login(&relay, 1);
        let poller = {
            let alice = Arc::clone(&alice);
            thread::spawn(move || {
                let mut answered = Vec::new();
                while answered.len() < COUNT {
                    match alice.poll_event(LONG) {
                        Polled::Event(Event::Delivered { id, .. }) => answered.push(id),
                        Polled::Event(Event::Failed { id, reason }) => panic!("{id}: {reason}"),
                        Polled::Event(_) => {}
                        other => panic!("alice's poll: {other:?}"),
                    }
                }
                alice.close();
                while alice.poll_event(LONG) != Polled::Event(Event::Closed) {}
                assert_eq!(alice.poll_event(LONG), Polled::Finished);
                answered
            })
        };
        let receiver = {
            let bob = Arc::clone(&bob);
            thread::spawn(move || {
                let mut got = vec![0u32; COUNT];
                let mut taken = 0;
                while taken < COUNT {
                    match bob.poll_event(LONG) {
                        Polled::Event(Event::Message { payload, .. }) => {
                            let text = std::str::from_utf8(&payload).expect("utf-8");
                            got[text.parse::<usize>().expect("an index")] += 1;
                            taken += 1;
                        }
                        Polled::Event(_) => {}
                        other => panic!("bob's poll: {other:?}"),
                    }
                }
                got
            })
        };
        let mut sent = Vec::new();
        let mut i = 0;
        while i < COUNT {
            match alice.send(UserId(2), i.to_string().into_bytes()) {
                Ok(id) => {
                    sent.push(id);
                    i += 1;
                }
                // The outbox holds 1024: let the poller take some answers.
                Err(SendError::OutboxFull) => thread::yield_now(),
                Err(e) => panic!("send {i}: {e}"),
            }
        }
        let mut answered = poller.join().expect("alice's poller");
        answered.sort();
        sent.sort();
        assert_eq!(answered, sent, "every send answered exactly once");
        assert!(receiver.join().expect("bob").iter().all(|&n| n == 1));
        assert_eq!(bob.close_and_drain(LONG).last(), Some(&Event::Closed));
    }

    #[test]
    fn a_listener_gets_every_event_on_its_own_thread_closed_last() {
        const COUNT: usize = 200;
        let relay = Relay::start();
        let bob = login(&relay, 2);
        let alice = login(&relay, 1);
        let (tx, rx) = std::sync::mpsc::channel();
        let echo = Arc::clone(&bob);
        let listener = Listener::start(Arc::clone(&bob), move |event| {
            // Calling the client from inside the listener: its lock is not held.
            if let Event::Message { from, payload, .. } = &event {
                echo.send(*from, payload.clone()).expect("echo");
            }
            tx.send((thread::current().id(), event))
                .expect("the test waits");
        })
        .expect("network thread");
        let network = listener.thread_id().expect("running");
        for i in 0..COUNT {
            alice
                .send(UserId(2), i.to_string().into_bytes())
                .expect("send");
        }
        let (mut delivered, mut echoes) = (0, Vec::new());
        while delivered < COUNT || echoes.len() < COUNT {
            match alice.poll_event(LONG) {
                Polled::Event(Event::Delivered { .. }) => delivered += 1,
                Polled::Event(Event::Message { payload, .. }) => echoes.push(payload),
                Polled::Event(_) => {}
                other => panic!("alice's poll: {other:?}"),
            }
        }
        echoes.sort_by_key(|p| {
            std::str::from_utf8(p)
                .ok()
                .and_then(|t| t.parse::<usize>().ok())
        });
        let expected: Vec<_> = (0..COUNT).map(|i| i.to_string().into_bytes()).collect();
        assert_eq!(echoes, expected, "each message echoed exactly once");

        listener.stop().expect("the listener did not panic");
        // Every call happened before stop returned, on the network thread, Closed last.
        let calls: Vec<_> = rx.try_iter().collect();
        assert!(calls.iter().all(|(id, _)| *id == network));
        let events: Vec<_> = calls.into_iter().map(|(_, e)| e).collect();
        assert_eq!(events.last(), Some(&Event::Closed));
        let count = |f: fn(&Event) -> bool| events.iter().filter(|e| f(e)).count();
        assert_eq!(count(|e| matches!(e, Event::Message { .. })), COUNT);
        assert_eq!(count(|e| matches!(e, Event::Delivered { .. })), COUNT);
        assert_eq!(count(|e| *e == Event::Closed), 1);
        assert_eq!(bob.poll_event(LONG), Polled::Finished);
    }
}
