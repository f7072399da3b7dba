//! Lets every standard gRPC client talk to the unix socket, whatever `:authority` it sends.
//!
//! gRPC C-core (Python grpcio, C++, Ruby), grpc-java and grpcurl send the socket path (e.g.
//! `/var/lib/kubelet/plugins/loopcsi.dev/csi.sock`) as the HTTP/2 `:authority` on unix sockets.
//! The h2 server under tonic parses `:authority` as a URI authority and resets the stream with
//! PROTOCOL_ERROR when it is not one (hyperium/h2#487, open; no h2 option or release accepts it),
//! so those clients could not make a single call. grpc-go (the kubelet, the sidecars,
//! csi-sanity) sends `localhost` and was never affected.
//!
//! [`AuthorityFix`] wraps each accepted connection and rewrites the client-to-server byte stream
//! before h2 reads it: every header block (a HEADERS frame and its CONTINUATION frames) is HPACK
//! decoded with the client's compression context and re-encoded as plain literals that touch no
//! dynamic table, with an `:authority` that is not a valid URI authority replaced by
//! `localhost` (what grpc-go sends). Every other frame, and the whole server-to-client
//! direction, passes through byte for byte. Re-encoding every block, not only the ones that
//! change, keeps h2's decoder state trivially in step: it never sees a dynamic-table entry.
//!
//! The shim understands only framing and HPACK; everything else about the protocol (stream
//! states, flow control, settings, limits) stays h2's job. Input it cannot parse ends the
//! connection, as h2 itself would with a COMPRESSION_ERROR or PROTOCOL_ERROR.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The HTTP/2 client connection preface, passed through unchanged.
const PREFACE_LEN: usize = 24;
const FRAME_HEADER_LEN: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// The smallest SETTINGS_MAX_FRAME_SIZE a server may advertise: re-encoded blocks are cut into
/// frames no larger, so they fit whatever h2 advertised.
const MAX_FRAME: usize = 16_384;
/// The dynamic table size h2 advertises (the HTTP/2 default): a client's size update above it
/// is an error, as h2 would rule.
const HEADER_TABLE_SIZE: usize = 4096;
/// The largest header block (all its frames) accepted, so a client cannot make the shim buffer
/// without bound (a CONTINUATION flood); far above any gRPC request's headers.
const MAX_BLOCK: usize = 1 << 20;
/// The `:authority` sent on in place of one h2 would refuse.
const REPLACEMENT_AUTHORITY: &[u8] = b"localhost";

/// A connection whose incoming header blocks are rewritten as the module doc says.
pub struct AuthorityFix<S> {
    inner: S,
    rewriter: Rewriter,
    /// Rewritten bytes not yet handed to the reader.
    out: Vec<u8>,
    out_pos: usize,
}

impl<S> AuthorityFix<S> {
    pub fn new(inner: S) -> Self {
        AuthorityFix {
            inner,
            rewriter: Rewriter::new(),
            out: Vec::new(),
            out_pos: 0,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityFix<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.out_pos < this.out.len() {
                let n = buf.remaining().min(this.out.len() - this.out_pos);
                buf.put_slice(&this.out[this.out_pos..this.out_pos + n]);
                this.out_pos += n;
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [0u8; 16 * 1024];
            let mut raw = ReadBuf::new(&mut chunk);
            match Pin::new(&mut this.inner).poll_read(cx, &mut raw) {
                Poll::Ready(Ok(())) => {}
                other => return other,
            }
            if raw.filled().is_empty() {
                return Poll::Ready(Ok(())); // end of stream
            }
            this.out.clear();
            this.out_pos = 0;
            this.rewriter
                .feed(raw.filled(), &mut this.out)
                .map_err(|why| io::Error::new(io::ErrorKind::InvalidData, why))?;
            // A partial frame header or header block yields nothing yet: read on.
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityFix<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for AuthorityFix<tokio::net::UnixStream> {
    type ConnectInfo = <tokio::net::UnixStream as tonic::transport::server::Connected>::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// Where the rewriter is in the client's byte stream.
enum State {
    /// Inside the connection preface, with this many bytes of it still to pass.
    Preface(usize),
    /// Collecting a frame header.
    FrameHeader,
    /// Passing this many more payload bytes of a frame that is not a header block.
    Pass(usize),
    /// Collecting the payload of a HEADERS or CONTINUATION frame.
    Block {
        kind: u8,
        flags: u8,
        stream: u32,
        len: usize,
    },
}

/// A header block begun by a HEADERS frame, waiting for its END_HEADERS.
struct OpenBlock {
    stream: u32,
    end_stream: bool,
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
}

/// The byte-stream state machine of the module doc, free of I/O so it can be fed any split.
pub struct Rewriter {
    state: State,
    /// Bytes of the current frame header or HEADERS/CONTINUATION payload collected so far.
    pending: Vec<u8>,
    open: Option<OpenBlock>,
    decoder: loona_hpack::Decoder<'static>,
}

impl Default for Rewriter {
    fn default() -> Self {
        Self::new()
    }
}

impl Rewriter {
    pub fn new() -> Self {
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(HEADER_TABLE_SIZE);
        Rewriter {
            state: State::Preface(PREFACE_LEN),
            pending: Vec::new(),
            open: None,
            decoder,
        }
    }

    /// Consumes `input` (any slice of the client's stream) and appends what h2 should read.
    pub fn feed(&mut self, mut input: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
        while !input.is_empty() {
            match self.state {
                State::Preface(left) | State::Pass(left) => {
                    let n = left.min(input.len());
                    out.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    self.state = match self.state {
                        State::Preface(_) if left > n => State::Preface(left - n),
                        State::Pass(_) if left > n => State::Pass(left - n),
                        _ => State::FrameHeader,
                    };
                }
                State::FrameHeader => {
                    let n = (FRAME_HEADER_LEN - self.pending.len()).min(input.len());
                    self.pending.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    if self.pending.len() == FRAME_HEADER_LEN {
                        let header = std::mem::take(&mut self.pending);
                        self.frame_header(&header, out)?;
                    }
                }
                State::Block { len, .. } => {
                    let n = (len - self.pending.len()).min(input.len());
                    self.pending.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    if self.pending.len() == len {
                        self.block_frame(out)?;
                    }
                }
            }
        }
        Ok(())
    }

    fn frame_header(&mut self, header: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
        let len =
            usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2]);
        let (kind, flags) = (header[3], header[4]);
        let stream = u32::from_be_bytes([header[5], header[6], header[7], header[8]]) & 0x7fff_ffff;
        let in_block = self.open.is_some();
        if kind == HEADERS || kind == CONTINUATION {
            if (kind == CONTINUATION) != in_block {
                return Err(format!(
                    "frame type {kind} on stream {stream} out of header-block order"
                ));
            }
            if len > MAX_BLOCK {
                return Err(format!("a {len}-byte header frame is too large"));
            }
            self.state = State::Block {
                kind,
                flags,
                stream,
                len,
            };
            if len == 0 {
                self.block_frame(out)?;
            }
            return Ok(());
        }
        if in_block {
            return Err(format!(
                "frame type {kind} inside a header block (RFC 9113 §6.10 allows only CONTINUATION)"
            ));
        }
        out.extend_from_slice(header);
        self.state = if len == 0 {
            State::FrameHeader
        } else {
            State::Pass(len)
        };
        Ok(())
    }

    /// A whole HEADERS or CONTINUATION payload is in `pending`.
    fn block_frame(&mut self, out: &mut Vec<u8>) -> Result<(), String> {
        let State::Block {
            kind,
            flags,
            stream,
            ..
        } = self.state
        else {
            return Err("header frame state lost".into());
        };
        self.state = State::FrameHeader;
        let payload = std::mem::take(&mut self.pending);
        if kind == HEADERS {
            let mut body = payload.as_slice();
            if flags & PADDED != 0 {
                let (&pad, rest) = body
                    .split_first()
                    .ok_or("a padded HEADERS frame without its pad length")?;
                body = rest
                    .get(..rest.len().saturating_sub(usize::from(pad)))
                    .filter(|_| usize::from(pad) <= rest.len())
                    .ok_or("HEADERS padding longer than the frame")?;
            }
            let priority = if flags & PRIORITY != 0 {
                let (fields, rest) = body
                    .split_first_chunk::<5>()
                    .ok_or("a HEADERS frame too short for its PRIORITY fields")?;
                body = rest;
                Some(*fields)
            } else {
                None
            };
            self.open = Some(OpenBlock {
                stream,
                end_stream: flags & END_STREAM != 0,
                priority,
                fragment: body.to_vec(),
            });
        } else {
            let open = self
                .open
                .as_mut()
                .ok_or("CONTINUATION without a header block")?;
            if open.stream != stream {
                return Err(format!(
                    "CONTINUATION on stream {stream} inside stream {}'s header block",
                    open.stream
                ));
            }
            if open.fragment.len() + payload.len() > MAX_BLOCK {
                return Err(format!("a header block over {MAX_BLOCK} bytes"));
            }
            open.fragment.extend_from_slice(&payload);
        }
        if flags & END_HEADERS != 0 {
            let open = self.open.take().ok_or("header block state lost")?;
            self.emit(open, out)?;
        }
        Ok(())
    }

    /// Decodes a complete header block and writes it out again as HEADERS (+ CONTINUATION).
    fn emit(&mut self, open: OpenBlock, out: &mut Vec<u8>) -> Result<(), String> {
        let mut block = Vec::with_capacity(open.fragment.len() + 64);
        let mut bad_authority = None;
        self.decoder
            .decode_with_cb(&open.fragment, |name, value| {
                let value: &[u8] = if &*name == b":authority" && !valid_authority(&value) {
                    bad_authority = Some(String::from_utf8_lossy(&value).into_owned());
                    REPLACEMENT_AUTHORITY
                } else {
                    &value
                };
                encode_literal(&name, value, &mut block);
            })
            .map_err(|e| format!("HPACK decoding failed on stream {}: {e:?}", open.stream))?;
        if let Some(authority) = bad_authority {
            tracing::trace!(stream = open.stream, authority, "rewrote :authority");
        }
        let mut rest = block.as_slice();
        let mut first = true;
        loop {
            let room = if first && open.priority.is_some() {
                MAX_FRAME - 5
            } else {
                MAX_FRAME
            };
            let (chunk, tail) = rest.split_at(room.min(rest.len()));
            rest = tail;
            let last = rest.is_empty();
            let mut flags = if last { END_HEADERS } else { 0 };
            let (kind, prefix) = if first {
                if open.end_stream {
                    flags |= END_STREAM;
                }
                if open.priority.is_some() {
                    flags |= PRIORITY;
                }
                (HEADERS, open.priority.as_ref().map_or(&[][..], |p| &p[..]))
            } else {
                (CONTINUATION, &[][..])
            };
            let len = prefix.len() + chunk.len();
            out.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags]);
            out.extend_from_slice(&open.stream.to_be_bytes());
            out.extend_from_slice(prefix);
            out.extend_from_slice(chunk);
            first = false;
            if last {
                return Ok(());
            }
        }
    }
}

/// Whether h2 would take `value` as `:authority` (it parses it as a URI authority).
fn valid_authority(value: &[u8]) -> bool {
    tonic::codegen::http::uri::Authority::try_from(value).is_ok()
}

/// HPACK "literal header field without indexing — new name" (RFC 7541 §6.2.2), strings
/// without Huffman coding: changes no dynamic table on either side.
pub fn encode_literal(name: &[u8], value: &[u8], out: &mut Vec<u8>) {
    out.push(0);
    for string in [name, value] {
        out.extend(loona_hpack::encoder::encode_integer(string.len(), 7));
        out.extend_from_slice(string);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// Feeds `input` one byte at a time (the worst split) and returns the output.
    fn rewrite_bytewise(input: &[u8]) -> Vec<u8> {
        let mut rewriter = Rewriter::new();
        let mut out = Vec::new();
        for byte in input {
            rewriter.feed(std::slice::from_ref(byte), &mut out).unwrap();
        }
        out
    }

    /// The header list of every header block in `stream` (after the preface), and the frames'
    /// (type, flags, stream) in order.
    type HeaderList = Vec<(Vec<u8>, Vec<u8>)>;

    fn read_back(stream: &[u8]) -> (Vec<HeaderList>, Vec<(u8, u8, u32)>) {
        let mut decoder = loona_hpack::Decoder::new();
        let mut rest = &stream[PREFACE_LEN..];
        let (mut blocks, mut frames, mut block) = (Vec::new(), Vec::new(), Vec::new());
        while !rest.is_empty() {
            let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
            let (kind, flags) = (rest[3], rest[4]);
            let id = u32::from_be_bytes([rest[5], rest[6], rest[7], rest[8]]);
            let payload = &rest[9..9 + len];
            frames.push((kind, flags, id));
            if kind == HEADERS || kind == CONTINUATION {
                let skip = if flags & PRIORITY != 0 { 5 } else { 0 };
                block.extend_from_slice(&payload[skip..]);
                if flags & END_HEADERS != 0 {
                    blocks.push(decoder.decode(&block).unwrap());
                    block.clear();
                }
            }
            rest = &rest[9 + len..];
        }
        (blocks, frames)
    }

    #[test]
    fn a_path_authority_becomes_localhost_and_the_dynamic_table_is_followed() {
        fn request(authority: &[u8]) -> Vec<(&[u8], &[u8])> {
            vec![
                (b":method", b"POST"),
                (b":scheme", b"http"),
                (b":path", b"/csi.v1.Identity/Probe"),
                (b":authority", authority),
                (b"content-type", b"application/grpc"),
            ]
        }
        let mut encoder = loona_hpack::Encoder::new();
        let mut input = PREFACE.to_vec();
        input.extend(frame(0x4, 0, 0, &[])); // SETTINGS
        let first = encoder.encode(request(b"/run/loopcsi/csi.sock"));
        // The second block refers to the first one's entries through the dynamic table.
        let second = encoder.encode(request(b"/run/loopcsi/csi.sock"));
        input.extend(frame(HEADERS, END_HEADERS, 1, &first));
        input.extend(frame(0x0, END_STREAM, 1, b"\0\0\0\0\0"));
        // The same block split over CONTINUATION frames, padded and with priority fields.
        let (a, b) = second.split_at(second.len() / 2);
        let mut payload = vec![3u8];
        payload.extend_from_slice(&[0, 0, 0, 0, 16]);
        payload.extend_from_slice(a);
        payload.extend_from_slice(&[0, 0, 0]);
        input.extend(frame(HEADERS, PADDED | PRIORITY | END_STREAM, 3, &payload));
        input.extend(frame(CONTINUATION, END_HEADERS, 3, b));

        let out = rewrite_bytewise(&input);
        assert_eq!(&out[..PREFACE_LEN], PREFACE);
        let (blocks, frames) = read_back(&out);
        assert_eq!(
            frames,
            vec![
                (0x4, 0, 0),
                (HEADERS, END_HEADERS, 1),
                (0x0, END_STREAM, 1),
                (HEADERS, PRIORITY | END_STREAM | END_HEADERS, 3)
            ]
        );
        for block in &blocks {
            let expected: HeaderList = request(b"localhost")
                .into_iter()
                .map(|(n, v)| (n.to_vec(), v.to_vec()))
                .collect();
            assert_eq!(block, &expected);
        }
    }

    #[test]
    fn valid_authorities_pass_unchanged_and_big_blocks_are_split() {
        let mut encoder = loona_hpack::Encoder::new();
        let big = vec![b'x'; 40_000];
        let headers: Vec<(&[u8], &[u8])> = vec![
            (b":method", b"POST"),
            (b":authority", b"localhost:50051"),
            (b"x-big", &big),
        ];
        let block = encoder.encode(headers.clone());
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, END_HEADERS, 1, &block));
        let out = rewrite_bytewise(&input);
        let (blocks, frames) = read_back(&out);
        assert_eq!(blocks.len(), 1);
        assert_eq!(blocks[0][1].1, b"localhost:50051");
        assert_eq!(blocks[0][2].1, big);
        assert_eq!(frames.len(), 3, "40 kB of headers in 16 kB frames");
        assert_eq!(frames[2], (CONTINUATION, END_HEADERS, 1));
    }

    #[test]
    fn broken_framing_is_an_error_not_a_panic() {
        let mut cases = Vec::new();
        // A DATA frame inside a header block.
        let mut c = PREFACE.to_vec();
        c.extend(frame(HEADERS, 0, 1, &[0x82]));
        c.extend(frame(0x0, 0, 1, b"x"));
        cases.push(c);
        // CONTINUATION with no HEADERS before it.
        let mut c = PREFACE.to_vec();
        c.extend(frame(CONTINUATION, END_HEADERS, 1, &[0x82]));
        cases.push(c);
        // Padding longer than the frame.
        let mut c = PREFACE.to_vec();
        c.extend(frame(HEADERS, PADDED | END_HEADERS, 1, &[9, 0x82]));
        cases.push(c);
        // An index past both tables.
        let mut c = PREFACE.to_vec();
        c.extend(frame(HEADERS, END_HEADERS, 1, &[0xff, 0x7f]));
        cases.push(c);
        for case in cases {
            let mut out = Vec::new();
            assert!(Rewriter::new().feed(&case, &mut out).is_err());
        }
    }
}
