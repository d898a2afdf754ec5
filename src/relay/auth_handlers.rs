//! Login tokens (protocol.md section 16): the check at LOGIN and REFRESH, what a token
//! permits (JOIN, ROOM_SEND, BROADCAST), and its expiry on a live connection
//! (TOKEN_EXPIRING, then TOKEN_EXPIRED). Nothing here runs when `Config::auth` is `None`.
//!
//! The token code ([`crate::auth`]) never reads a clock: the relay hands it its own Unix
//! time, derived from the `now` every `handle_*` call receives.

use std::time::{Duration, Instant};

use super::session::Session;
use super::{arm, Relay};
use crate::auth::{AuthError, Grants, LEEWAY_SECS};
use crate::proto::frame::write_frame;
use crate::proto::{ErrorCode, Flags, Header, MessageId, Opcode, RawFrame, UserId};
use crate::ConnId;

/// LOGIN and REFRESH tokens refused in a row before the connection is closed: a token
/// check costs a signature verification, and guessing is not a way in.
pub const MAX_AUTH_FAILURES: u8 = 5;

/// What a token permits, asked of a session.
#[derive(Clone, Copy, Debug)]
pub(super) enum Permission {
    Join(u64),
    SendToRoom(u64),
    Broadcast,
}

impl Relay {
    /// The relay's Unix time in whole seconds at `now`.
    pub(super) fn unix_secs(&self, now: Instant) -> u64 {
        self.unix_ms(now) / 1000
    }

    /// The instant the relay's clock reads `unix_secs` (the start of the relay's clock if
    /// that is earlier).
    fn instant_at_unix(&self, unix_secs: u64) -> Instant {
        let (base, base_ms) = self.clock_base;
        base + Duration::from_millis(unix_secs.saturating_mul(1000).saturating_sub(base_ms))
    }

    /// When the session's token next needs the timer: the TOKEN_EXPIRING notice, then the
    /// expiry. `None` without a token.
    pub(super) fn token_due(&self, s: &Session) -> Option<Instant> {
        let exp = s.grants.as_deref()?.expires_at;
        let notice = self.config.auth.as_ref()?.notice.as_secs();
        Some(if s.expiry_noticed {
            self.instant_at_unix(exp.saturating_add(LEEWAY_SECS))
        } else {
            self.instant_at_unix(exp.saturating_sub(notice))
        })
    }

    /// The token of a LOGIN for `h.target`: `Ok(None)` when the relay checks no tokens,
    /// `Ok(Some(grants))` when it passed, `Err(())` when it was refused (and answered).
    pub(super) fn login_grants(
        &mut self,
        id: ConnId,
        h: &Header,
        token: &[u8],
        now: Instant,
    ) -> Result<Option<Box<Grants>>, ()> {
        let Some(auth) = self.config.auth.as_ref() else {
            return Ok(None);
        };
        match auth.verifier.verify(token, h.target.0, self.unix_secs(now)) {
            Ok(grants) => Ok(Some(Box::new(grants))),
            Err(e) => {
                self.refuse_token(id, h.msg_id, h.target, "LOGIN", e, now);
                Err(())
            }
        }
    }

    /// Answers a refused token with AUTH_FAILED, or closes after [`MAX_AUTH_FAILURES`].
    fn refuse_token(
        &mut self,
        id: ConnId,
        msg_id: MessageId,
        target: UserId,
        what: &str,
        e: AuthError,
        now: Instant,
    ) {
        self.refuse_login(id, msg_id, target, &format!("{what}: {}", e.reason()), now);
    }

    /// AUTH_FAILED with `reason`, or a close after [`MAX_AUTH_FAILURES`] in a row (a
    /// refused token, or a LOGIN naming another device than its token pins).
    pub(super) fn refuse_login(
        &mut self,
        id: ConnId,
        msg_id: MessageId,
        target: UserId,
        reason: &str,
        now: Instant,
    ) {
        let Some(s) = self.sessions.get_mut(id.0) else {
            return;
        };
        s.auth_failures = s.auth_failures.saturating_add(1);
        self.metrics.auth_failures += 1;
        if s.auth_failures >= MAX_AUTH_FAILURES {
            let reason = format!("{reason}; {MAX_AUTH_FAILURES} tokens in a row were refused");
            self.fail(id, ErrorCode::AuthFailed, &reason, now);
        } else {
            self.reply_error(id, msg_id, target, ErrorCode::AuthFailed, reason);
        }
    }

    /// REFRESH: a new token for the logged-in user, checked as at LOGIN; its grants and
    /// expiry replace the old ones from now on.
    pub(super) fn on_refresh(&mut self, id: ConnId, frame: &RawFrame, now: Instant) {
        let h = *frame.header();
        let Some(user) = self.check_targetless_request(id, &h, Flags::EMPTY, "REFRESH") else {
            return;
        };
        let exp = match self.config.auth.as_ref() {
            // Nothing expires: the answer says so with exp 0.
            None => 0,
            Some(auth) => {
                match auth
                    .verifier
                    .verify(frame.payload(), user.0, self.unix_secs(now))
                {
                    Ok(grants) => {
                        let exp = grants.expires_at;
                        let Some(s) = self.sessions.get_mut(id.0) else {
                            return;
                        };
                        s.grants = Some(Box::new(grants));
                        s.expiry_noticed = false;
                        s.auth_failures = 0;
                        self.arm_token_due(id);
                        exp
                    }
                    Err(e) => {
                        self.refuse_token(id, h.msg_id, user, "REFRESH", e, now);
                        return;
                    }
                }
            }
        };
        self.metrics.refreshes += 1;
        write_frame(
            self.scratch(),
            Opcode::RefreshOk,
            Flags::EMPTY,
            h.msg_id,
            user,
            UserId::NONE,
            &exp.to_be_bytes(),
        );
        self.queue_scratch(id);
    }

    /// Arms the session's timer for its token if that comes before what is armed now (a
    /// later deadline re-arms itself when the earlier one fires).
    pub(super) fn arm_token_due(&mut self, id: ConnId) {
        let Some(s) = self.sessions.get(id.0) else {
            return;
        };
        let Some(due) = self.token_due(s) else {
            return;
        };
        if let Some(s) = self.sessions.get_mut(id.0) {
            if due < s.deadline {
                arm(&mut self.timers, s, id, due);
            }
        }
    }

    /// The token part of an active session's timer: closes it when the token expired
    /// (true: nothing else to do for it), or sends TOKEN_EXPIRING once when it is near.
    pub(super) fn token_timer(&mut self, id: ConnId, now: Instant) -> bool {
        let unix_now = self.unix_secs(now);
        let notice = self.config.auth.as_ref().map_or(0, |a| a.notice.as_secs());
        let Some(s) = self.sessions.get_mut(id.0) else {
            return true;
        };
        let Some(grants) = s.grants.as_deref() else {
            return false;
        };
        let exp = grants.expires_at;
        if unix_now >= exp.saturating_add(LEEWAY_SECS) {
            let reason = format!("the login token expired at {exp} and was not refreshed");
            self.metrics.tokens_expired += 1;
            self.fail(id, ErrorCode::TokenExpired, &reason, now);
            return true;
        }
        if !s.expiry_noticed && unix_now.saturating_add(notice) >= exp {
            s.expiry_noticed = true;
            let user = s.user().unwrap_or(UserId::NONE);
            write_frame(
                self.scratch(),
                Opcode::TokenExpiring,
                Flags::EMPTY,
                MessageId(0),
                user,
                UserId::NONE,
                &exp.to_be_bytes(),
            );
            self.queue_scratch(id);
        }
        false
    }

    /// Whether the session may do `what`. Without token checks every JOIN and ROOM_SEND
    /// is allowed and BROADCAST is for the configured admins.
    pub(super) fn permits(&self, id: ConnId, what: Permission) -> bool {
        let Some(s) = self.sessions.get(id.0) else {
            return false;
        };
        match (&s.grants, what) {
            (Some(g), Permission::Join(room)) => g.can_join(room),
            (Some(g), Permission::SendToRoom(room)) => g.can_send(room),
            (Some(g), Permission::Broadcast) => g.admin,
            (None, Permission::Broadcast) => s
                .user()
                .is_some_and(|user| self.config.admins.contains(&user)),
            (None, _) => self.config.auth.is_none(),
        }
    }
}
