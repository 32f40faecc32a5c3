//! Output capture shared by the remote backends: the head-and-tail cap every provider applies to a command's
//! output (the same shape as the local backend's), and a scanner that finds the in-band markers the SSH
//! backend's wrapper script writes around a command.

use std::collections::VecDeque;

/// Keeps the first and the last `cap / 2` bytes of a stream: the start of an output says what ran, the end
/// usually says how it failed. The middle is counted and dropped.
#[derive(Debug)]
pub(crate) struct CapBuffer {
    head_cap: usize,
    tail_cap: usize,
    head: Vec<u8>,
    tail: VecDeque<u8>,
    dropped: usize,
}

impl CapBuffer {
    pub(crate) fn new(cap: usize) -> CapBuffer {
        let head_cap = cap / 2;
        CapBuffer {
            head_cap,
            tail_cap: cap - head_cap,
            head: Vec::new(),
            tail: VecDeque::new(),
            dropped: 0,
        }
    }

    pub(crate) fn push(&mut self, mut bytes: &[u8]) {
        let to_head = self
            .head_cap
            .saturating_sub(self.head.len())
            .min(bytes.len());
        self.head.extend_from_slice(&bytes[..to_head]);
        bytes = &bytes[to_head..];
        self.tail.extend(bytes);
        if self.tail.len() > self.tail_cap {
            let excess = self.tail.len() - self.tail_cap;
            self.tail.drain(..excess);
            self.dropped += excess;
        }
    }

    /// The kept bytes (with a note where the middle was cut) and whether anything was cut.
    pub(crate) fn finish(self) -> (Vec<u8>, bool) {
        let mut out = self.head;
        if self.dropped > 0 {
            out.extend_from_slice(format!("\n[… {} bytes cut …]\n", self.dropped).as_bytes());
        }
        out.extend(self.tail);
        (out, self.dropped > 0)
    }
}

/// Caps a whole output at once (for backends that receive it in one piece).
pub(crate) fn cap_text(text: &str, cap: usize) -> (String, bool) {
    let mut buffer = CapBuffer::new(cap);
    buffer.push(text.as_bytes());
    let (bytes, cut) = buffer.finish();
    (String::from_utf8_lossy(&bytes).into_owned(), cut)
}

/// What the marker scanner found in a stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Marker {
    /// The wrapper started the command.
    Started,
    /// The command ended with this shell status.
    Exited(i32),
}

/// Finds `<tag>:<word>\n` lines in a stream and removes them, passing everything else through. The tag carries a
/// random nonce, so a command cannot forge a marker by accident. The exit marker is written with a newline before
/// it (so it starts a line even after output without one); that newline is removed with it.
#[derive(Debug)]
pub(crate) struct MarkerScanner {
    tag: Vec<u8>,
    pending: Vec<u8>,
}

/// Longest word after the tag (`start`, or a status).
const MAX_WORD: usize = 12;

impl MarkerScanner {
    pub(crate) fn new(tag: &str) -> MarkerScanner {
        MarkerScanner {
            tag: tag.as_bytes().to_vec(),
            pending: Vec::new(),
        }
    }

    /// Feeds bytes; returns the bytes that are certainly not part of a marker, and the markers found.
    pub(crate) fn feed(&mut self, bytes: &[u8]) -> (Vec<u8>, Vec<Marker>) {
        self.pending.extend_from_slice(bytes);
        let mut out = Vec::new();
        let mut markers = Vec::new();
        loop {
            match find(&self.pending, &self.tag) {
                Some(at) => {
                    let word_start = at + self.tag.len();
                    let Some(end) = self.pending[word_start..]
                        .iter()
                        .take(MAX_WORD + 2)
                        .position(|&b| b == b'\n')
                    else {
                        if self.pending.len() - word_start > MAX_WORD + 1 {
                            // Not a marker after all: pass the tag through and keep scanning after it.
                            out.extend(self.pending.drain(..word_start));
                            continue;
                        }
                        break;
                    };
                    let marker = if end == 0 || self.pending[word_start] != b':' {
                        None
                    } else {
                        let word = &self.pending[word_start + 1..word_start + end];
                        if word == b"start" {
                            Some(Marker::Started)
                        } else {
                            std::str::from_utf8(word)
                                .ok()
                                .and_then(|w| w.parse().ok())
                                .map(Marker::Exited)
                        }
                    };
                    match marker {
                        Some(marker) => {
                            let mut keep = at;
                            if matches!(marker, Marker::Exited(_))
                                && keep > 0
                                && self.pending[keep - 1] == b'\n'
                            {
                                keep -= 1;
                            }
                            out.extend_from_slice(&self.pending[..keep]);
                            self.pending.drain(..word_start + end + 1);
                            markers.push(marker);
                        }
                        None => {
                            out.extend(self.pending.drain(..word_start));
                        }
                    }
                }
                None => {
                    // Hold back what could be the start of a tag (and the newline before it).
                    let hold = (self.tag.len() + 1).min(self.pending.len());
                    let emit = self.pending.len() - hold;
                    out.extend(self.pending.drain(..emit));
                    break;
                }
            }
        }
        (out, markers)
    }

    /// The bytes held back at the end of the stream.
    pub(crate) fn finish(self) -> Vec<u8> {
        self.pending
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || haystack.len() < needle.len() {
        return None;
    }
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_keeps_head_and_tail() {
        let mut b = CapBuffer::new(10);
        b.push(b"0123456789abcdefghij");
        let (out, cut) = b.finish();
        assert!(cut);
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("01234\n[… 10 bytes cut …]\n"));
        assert!(text.ends_with("fghij"));
        assert_eq!(cap_text("short", 10), ("short".to_string(), false));
    }

    fn scan_in_pieces(input: &[u8], piece: usize) -> (Vec<u8>, Vec<Marker>) {
        let mut s = MarkerScanner::new("\x1fTAG");
        let mut out = Vec::new();
        let mut markers = Vec::new();
        for chunk in input.chunks(piece) {
            let (o, m) = s.feed(chunk);
            out.extend(o);
            markers.extend(m);
        }
        out.extend(s.finish());
        (out, markers)
    }

    #[test]
    fn markers_are_found_across_chunk_boundaries_and_removed() {
        let input = b"\x1fTAG:start\nerr line\nno newline\n\x1fTAG:42\nlate child output";
        for piece in 1..input.len() {
            let (out, markers) = scan_in_pieces(input, piece);
            assert_eq!(
                String::from_utf8_lossy(&out),
                "err line\nno newlinelate child output",
                "piece {piece}"
            );
            assert_eq!(markers, vec![Marker::Started, Marker::Exited(42)]);
        }
    }

    #[test]
    fn lookalikes_pass_through() {
        let input = b"\x1fTAG:bogus\n\x1fTAGX\nplain \x1fTAG:1234567890123456789 end";
        let (out, markers) = scan_in_pieces(input, 3);
        assert_eq!(out, input.to_vec());
        assert!(markers.is_empty());
    }
}
