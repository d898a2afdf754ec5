//! A person at `telnet`: text-mode lines in, lines out (protocol.md section 12).

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};

/// One text-mode connection.
pub struct Telnet {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Telnet {
    pub fn connect(addr: SocketAddr) -> Telnet {
        let stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(super::SAFETY_TIMEOUT))
            .unwrap();
        Telnet {
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
        }
    }

    /// Sends `line` and a CRLF.
    pub fn type_line(&mut self, line: &str) {
        self.writer
            .write_all(format!("{line}\r\n").as_bytes())
            .unwrap();
    }

    /// The next line, without its line end.
    pub fn read_line(&mut self) -> String {
        let mut line = String::new();
        self.reader
            .read_line(&mut line)
            .expect("a line from the relay");
        line.trim_end().to_string()
    }
}
