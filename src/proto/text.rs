//! Text mode: telnet-friendly lines translated to and from v1 frames (protocol.md,
//! "Text mode"). A line becomes exactly the frame a binary client would have sent, so the
//! relay's routing, limits and errors are the same for both; frames for a text client are
//! rendered back into one line each. No I/O, no state beyond the caller's message counter.

use std::fmt::Write as _;

use byteorder::{BigEndian, ByteOrder};
use bytes::Bytes;

use super::error::ErrorCode;
use super::frame::{Header, HEADER_LEN};
use super::ids::{MessageId, RoomId, UserId};
use super::opcode::{Flags, Opcode};
use super::Frame;

/// What one input line asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    /// A request, as the frame a binary client would send.
    Frame(Frame),
    /// HELP: the relay answers with [`HELP`].
    Help,
    /// A blank line: nothing to do.
    Blank,
}

/// A line that is not a valid command; answered with `ERR USAGE …`, the connection stays.
#[derive(Debug, PartialEq, Eq)]
pub struct UsageError(pub String);

/// The answer to HELP.
pub const HELP: &str = "\
HELP  commands (case does not matter; ids are numbers):\r
HELP    LOGIN <user>[@dev] [token]  log in as user id <user> (from device <dev>; token if asked)\r
HELP    REFRESH <token>             a new token before the current one expires\r
HELP    SEND <user> <text>          message another user (all of its connections)\r
HELP    JOIN <room> | LEAVE <room> | INFO <room>\r
HELP    ROOM <room> <text>          message everyone in a room you joined\r
HELP    BROADCAST <text>            message everyone (admins only)\r
HELP    STORE <user> <text>         stored message: kept until <user> acknowledges it\r
HELP    SYNC [<epoch> <last>]       receive your stored messages (after <last>)\r
HELP    SACK <seq>                  acknowledge your stored messages up to <seq>\r
HELP    PING [text] | PONG [text] | QUIT | HELP\r
HELP  you see: OK LOGIN, MSG <from> <id> <text>, ROOM <room> <from> <text>,\r
HELP           ACK <id> <n>  (delivered to <n> connections),\r
HELP           SAVED <id> <n>  (STORE kept it; <n> connections have it, 0: recipient offline),\r
HELP           INFO <room> <online> <member 0|1>, MISSED <room> <n>, ERR <CODE> <id> <why>,\r
HELP           INBOX <first> <last> <expired> <epoch>, STORED <from> <seq> <text>,\r
HELP           EXPIRING <exp>, OK REFRESH <exp>\r
";

/// True when a connection's first byte says it speaks text mode (an ASCII letter).
pub fn starts_text(first: u8) -> bool {
    first.is_ascii_alphabetic()
}

/// Parses one line (without its line end). `next_id` numbers the frames it creates: only
/// a line that becomes a frame takes a number (blank lines, HELP and usage errors do not).
pub fn parse_line(line: &[u8], next_id: &mut u64) -> Result<Line, UsageError> {
    let text = std::str::from_utf8(line).map_err(|_| usage("lines must be UTF-8"))?;
    let text = text.trim();
    if text.is_empty() {
        return Ok(Line::Blank);
    }
    let (command, rest) = split_word(text);
    // Frames are built with a placeholder id, numbered once the whole line has parsed.
    let id = || MessageId(0);
    let mut frame = match command.to_ascii_uppercase().as_str() {
        "HELP" => return Ok(Line::Help),
        "LOGIN" => {
            // `LOGIN <user>[@<device>] [<credential>]` (protocol.md, sections 12 and 15.1).
            let (user, credential) = split_word(rest);
            let (user, device) = match user.split_once('@') {
                Some((user, device)) => (user, Some(device)),
                None => (user, None),
            };
            let user = UserId(number(user, "LOGIN <user>[@<device>] [<credential>]")?);
            match device {
                Some(device) if super::device::valid_device(device) => {
                    Frame::login_device(id(), user, device, credential.as_bytes())
                }
                Some(_) => return Err(usage("a device is 1 to 64 bytes, no control characters")),
                None => Frame::login(id(), user, credential.as_bytes()),
            }
        }
        "SEND" => {
            let (user, body) = split_word(rest);
            let form = "SEND <user> <text>";
            let to = UserId(number(user, form)?);
            Frame::send(id(), to, Bytes::copy_from_slice(text_of(body, form)?))
        }
        "ROOM" => {
            let (room, body) = split_word(rest);
            let form = "ROOM <room> <text>";
            let room = RoomId(number(room, form)?);
            Frame::room_send(id(), room, Bytes::copy_from_slice(text_of(body, form)?))
        }
        "JOIN" => Frame::join(id(), RoomId(number(rest, "JOIN <room>")?)),
        "LEAVE" => Frame::leave(id(), RoomId(number(rest, "LEAVE <room>")?)),
        "INFO" => Frame::room_info(id(), RoomId(number(rest, "INFO <room>")?)),
        "BROADCAST" => Frame::broadcast(id(), Bytes::copy_from_slice(rest.as_bytes())),
        "STORE" => {
            let (user, body) = split_word(rest);
            let form = "STORE <user> <text>";
            let to = UserId(number(user, form)?);
            let body = Bytes::copy_from_slice(text_of(body, form)?);
            Frame::send(id(), to, body).with_flags(Flags::STORED)
        }
        "SYNC" => {
            let (epoch, last) = split_word(rest);
            if epoch.is_empty() {
                Frame::inbox_sync(id(), 0, 0)
            } else if last.is_empty() {
                // One number: probably the last seq without the epoch, or the reverse.
                return Err(usage(&format!(
                    "expected SYNC, or SYNC <epoch> <last> (both from your last INBOX line), \
                     got only {epoch:?}"
                )));
            } else {
                let form = "SYNC [<epoch> <last>]";
                Frame::inbox_sync(id(), number(epoch, form)?, number(last, form)?)
            }
        }
        "REFRESH" => Frame::refresh(id(), rest.as_bytes()),
        "SACK" => Frame::inbox_ack(id(), number(rest, "SACK <seq>")?),
        "PING" => Frame::ping(id(), Bytes::copy_from_slice(rest.as_bytes())),
        "PONG" => Frame::pong(id(), Bytes::copy_from_slice(rest.as_bytes())),
        "QUIT" | "BYE" => Frame::bye(id()),
        _ => return Err(usage(&format!("unknown command {command:?}; try HELP"))),
    };
    *next_id += 1;
    frame.msg_id = MessageId(*next_id);
    Ok(Line::Frame(frame))
}

/// Renders one encoded frame for a text client as one line (several for HELP-like text
/// never happen here). `None` for a frame that is not complete.
pub fn render(frame: &[u8]) -> Option<Bytes> {
    if frame.len() < HEADER_LEN {
        return None;
    }
    let h = Header::read(frame);
    let payload = frame.get(HEADER_LEN..h.len as usize)?;
    let mut out = String::with_capacity(payload.len() + 32);
    let id = h.msg_id.0;
    let _ = match Opcode::from_u8(h.opcode)? {
        Opcode::LoginOk => write!(out, "OK LOGIN {}", h.target.0),
        Opcode::Deliver => write!(out, "MSG {} {id} {}", h.source.0, shown(payload)),
        Opcode::RoomDeliver => {
            write!(out, "ROOM {} {} {}", h.target.0, h.source.0, shown(payload))
        }
        Opcode::Ack => write!(out, "ACK {id} {}", u32_at(payload)),
        Opcode::Error => {
            let code = (payload.len() >= 2).then(|| BigEndian::read_u16(payload));
            let name = code
                .and_then(ErrorCode::from_u16)
                .map_or("UNKNOWN", ErrorCode::name);
            let reason = payload
                .get(2..)
                .map(String::from_utf8_lossy)
                .unwrap_or_default();
            write!(out, "ERR {name} {id} {reason}")
        }
        Opcode::Ping => write!(out, "PING {id} (answer PONG)"),
        Opcode::Pong if payload.is_empty() => write!(out, "PONG"),
        Opcode::Pong => write!(out, "PONG {}", shown(payload)),
        Opcode::Bye => write!(out, "BYE"),
        Opcode::RoomState => {
            let member = payload.get(4).copied().unwrap_or(0);
            write!(out, "INFO {} {} {member}", h.target.0, u32_at(payload))
        }
        Opcode::RoomMissed => {
            let n = if payload.len() == 8 {
                BigEndian::read_u64(payload)
            } else {
                0
            };
            write!(out, "MISSED {} {n}", h.target.0)
        }
        Opcode::InboxState => {
            let at = |i: usize| payload.get(i..i + 8).map_or(0, BigEndian::read_u64);
            write!(out, "INBOX {} {} {} {}", at(8), at(16), at(24), at(0))
        }
        Opcode::InboxDeliver => {
            let seq = payload.get(..8).map_or(0, BigEndian::read_u64);
            let body = payload.get(16..).unwrap_or_default();
            write!(out, "STORED {} {seq} {}", h.source.0, shown(body))
        }
        Opcode::TokenExpiring => write!(out, "EXPIRING {}", u64_at(payload)),
        Opcode::RefreshOk => write!(out, "OK REFRESH {}", u64_at(payload)),
        // Requests never travel relay → client.
        Opcode::InboxSync | Opcode::InboxAck | Opcode::Refresh => return None,
        Opcode::Login
        | Opcode::Send
        | Opcode::Join
        | Opcode::Leave
        | Opcode::RoomSend
        | Opcode::RoomInfo
        | Opcode::Broadcast => return None,
    };
    out.push_str("\r\n");
    Some(Bytes::from(out))
}

/// The u64 a payload of exactly 8 bytes holds, else 0.
fn u64_at(payload: &[u8]) -> u64 {
    if payload.len() == 8 {
        BigEndian::read_u64(payload)
    } else {
        0
    }
}

/// The line a text client gets instead of `ACK <id> <n>` for a stored SEND (STORE): the
/// message is kept, and `<n>` of the recipient's connections have it queued (0: it waits
/// for the recipient's SYNC). The relay writes it where it knows the ACK is for a stored
/// message; the ACK frame itself does not say so.
pub fn render_saved(id: MessageId, count: u32) -> Bytes {
    Bytes::from(format!("SAVED {} {count}\r\n", id.0))
}

/// An `ERR USAGE` line for a line that did not parse.
pub fn render_usage(error: &UsageError) -> Bytes {
    Bytes::from(format!("ERR USAGE 0 {}\r\n", error.0))
}

fn usage(why: &str) -> UsageError {
    UsageError(why.to_string())
}

fn split_word(s: &str) -> (&str, &str) {
    let s = s.trim_start();
    match s.find(char::is_whitespace) {
        Some(at) => (&s[..at], s[at..].trim_start()),
        None => (s, ""),
    }
}

fn number(word: &str, form: &str) -> Result<u64, UsageError> {
    word.trim()
        .parse()
        .map_err(|_| usage(&format!("expected {form}, got {:?}", word.trim())))
}

/// The text of a SEND, ROOM or STORE line: an empty message is more likely a slip
/// (`SEND 1002` then Enter) than something meant, so it is a usage error.
fn text_of<'a>(body: &'a str, form: &str) -> Result<&'a [u8], UsageError> {
    if body.is_empty() {
        return Err(usage(&format!("expected {form}: the text is missing")));
    }
    Ok(body.as_bytes())
}

fn u32_at(payload: &[u8]) -> u32 {
    if payload.len() >= 4 {
        BigEndian::read_u32(payload)
    } else {
        0
    }
}

/// A payload as text: itself if it is printable UTF-8, else `0x` and hex.
fn shown(payload: &[u8]) -> String {
    match std::str::from_utf8(payload) {
        Ok(s) if !s.chars().any(char::is_control) => s.to_string(),
        _ => {
            let mut hex = String::from("0x");
            for b in payload {
                let _ = write!(hex, "{b:02x}");
            }
            hex
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::frame::{write_ack, write_error};
    use bytes::BytesMut;

    #[test]
    fn a_login_may_name_its_device() {
        let mut id = 0;
        assert_eq!(
            parse_line(b"login 1001@tablet secret", &mut id),
            Ok(Line::Frame(Frame::login_device(
                MessageId(1),
                UserId(1001),
                "tablet",
                b"secret"
            )))
        );
        assert!(parse_line(b"login 1001@ secret", &mut id).is_err());
    }

    #[test]
    fn lines_become_the_frames_a_binary_client_sends() {
        let mut id = 0;
        assert_eq!(
            parse_line(b"login 1001 secret", &mut id),
            Ok(Line::Frame(Frame::login(
                MessageId(1),
                UserId(1001),
                b"secret"
            )))
        );
        assert_eq!(
            parse_line(b"SEND 1002 hi bob, how  are you", &mut id),
            Ok(Line::Frame(Frame::send(
                MessageId(2),
                UserId(1002),
                Bytes::from_static(b"hi bob, how  are you")
            )))
        );
        assert_eq!(
            parse_line(b"ROOM 42 666", &mut id),
            Ok(Line::Frame(Frame::room_send(
                MessageId(3),
                RoomId(42),
                Bytes::from_static(b"666")
            )))
        );
        assert_eq!(parse_line(b"  ", &mut id), Ok(Line::Blank));
        assert_eq!(parse_line(b"help", &mut id), Ok(Line::Help));
        assert!(parse_line(b"SEND bob hi", &mut id).is_err());
        assert!(parse_line(b"FLY 1", &mut id).is_err());
        assert!(parse_line(&[0xff, 0xfe], &mut id).is_err());
        assert_eq!(id, 3, "only frames take ids");
    }

    #[test]
    fn a_line_that_makes_no_frame_takes_no_number() {
        let mut id = 0;
        for bad in [
            &b"LOGIN alice"[..],
            b"JOIN",
            b"LEAVE x",
            b"INFO -1",
            b"SYNC 1",
            b"SYNC x 2",
            b"SACK",
            b"STORE bob hi",
            b"ROOM lobby hi",
            b"FLY 1",
        ] {
            assert!(parse_line(bad, &mut id).is_err(), "{bad:?}");
        }
        assert_eq!(parse_line(b"HELP", &mut id), Ok(Line::Help));
        assert_eq!(parse_line(b"", &mut id), Ok(Line::Blank));
        assert_eq!(id, 0, "no number taken");
        assert_eq!(
            parse_line(b"join 7", &mut id),
            Ok(Line::Frame(Frame::join(MessageId(1), RoomId(7))))
        );
    }

    #[test]
    fn a_message_line_without_text_is_a_usage_error() {
        let mut id = 0;
        for (line, want) in [
            (
                &b"send 1002"[..],
                "expected SEND <user> <text>: the text is missing",
            ),
            (
                b"SEND 1002   ",
                "expected SEND <user> <text>: the text is missing",
            ),
            (
                b"room 42",
                "expected ROOM <room> <text>: the text is missing",
            ),
            (
                b"store 1002",
                "expected STORE <user> <text>: the text is missing",
            ),
        ] {
            assert_eq!(parse_line(line, &mut id), Err(usage(want)), "{line:?}");
        }
        assert_eq!(id, 0, "no number taken");
        assert!(matches!(
            parse_line(b"send 1002 0", &mut id),
            Ok(Line::Frame(_))
        ));
    }

    #[test]
    fn a_sync_with_one_number_says_what_it_got_and_what_it_wants() {
        let mut id = 0;
        let UsageError(why) = parse_line(b"sync 1", &mut id).unwrap_err();
        assert!(why.contains("got only \"1\""), "{why}");
        assert!(why.contains("SYNC <epoch> <last>"), "{why}");
        assert_eq!(
            parse_line(b"sync 5 1", &mut id),
            Ok(Line::Frame(Frame::inbox_sync(MessageId(1), 5, 1)))
        );
    }

    #[test]
    fn a_stored_ack_has_a_line_of_its_own() {
        assert_eq!(
            render_saved(MessageId(7), 0),
            Bytes::from_static(b"SAVED 7 0\r\n")
        );
        assert!(HELP.contains("SAVED <id> <n>"));
    }

    #[test]
    fn only_printable_utf8_is_shown_as_text() {
        let line = |payload: &'static [u8]| {
            let frame = Frame::new(
                Opcode::Deliver,
                MessageId(7),
                UserId(2),
                Bytes::from_static(payload),
            )
            .with_source(UserId(1))
            .to_bytes();
            String::from_utf8(render(&frame).unwrap().to_vec()).unwrap()
        };
        assert_eq!(
            line("caf\u{e9} \u{1f600}".as_bytes()),
            "MSG 1 7 caf\u{e9} \u{1f600}\r\n"
        );
        assert_eq!(
            line(b"a\tb"),
            "MSG 1 7 0x610962\r\n",
            "a tab is a control character"
        );
        assert_eq!(line(b"a\nb"), "MSG 1 7 0x610a62\r\n");
        assert_eq!(
            line("\u{85}".as_bytes()),
            "MSG 1 7 0xc285\r\n",
            "C1 controls too"
        );
        assert_eq!(line(b"\xff"), "MSG 1 7 0xff\r\n", "not UTF-8");
        assert_eq!(line(b""), "MSG 1 7 \r\n");
    }

    #[test]
    fn frames_render_as_one_readable_line() {
        let deliver = Frame::new(
            Opcode::Deliver,
            MessageId(7),
            UserId(2),
            Bytes::from_static(b"hi"),
        )
        .with_source(UserId(1))
        .to_bytes();
        assert_eq!(
            render(&deliver).unwrap(),
            Bytes::from_static(b"MSG 1 7 hi\r\n")
        );
        let binary = Frame::new(
            Opcode::Deliver,
            MessageId(8),
            UserId(2),
            Bytes::from_static(&[0, 1]),
        )
        .with_source(UserId(1))
        .to_bytes();
        assert_eq!(
            render(&binary).unwrap(),
            Bytes::from_static(b"MSG 1 8 0x0001\r\n")
        );
        let mut buf = BytesMut::new();
        write_ack(&mut buf, MessageId(3), UserId(2), 2);
        assert_eq!(render(&buf).unwrap(), Bytes::from_static(b"ACK 3 2\r\n"));
        let mut buf = BytesMut::new();
        write_error(
            &mut buf,
            MessageId(4),
            UserId(9),
            ErrorCode::RecipientOffline,
            "user 9 is not connected",
        );
        assert_eq!(
            render(&buf).unwrap(),
            Bytes::from_static(b"ERR RECIPIENT_OFFLINE 4 user 9 is not connected\r\n")
        );
    }
}
