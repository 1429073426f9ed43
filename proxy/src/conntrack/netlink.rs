//! Conntrack over nfnetlink (`NETLINK_NETFILTER`, subsystem `CTNETLINK`): one dump of a
//! family's table, then the matching entries deleted in batches.
//!
//! Safe code only: the socket is `netlink-sys`, the message layouts are
//! `netlink-packet-netfilter`'s. Entries are decoded lazily: of each dumped entry only the two
//! tuples, the id and the zone are read; counters, timestamps and protocol state are skipped.
//! Each entry is deleted by its original tuple, id and zone (as `conntrack -D` does), so an
//! entry that expired and was re-created meanwhile is left alone, and one that is already gone
//! (`ENOENT`) is simply not counted.

use std::collections::BTreeSet;
use std::io;

use lb_core::IpFamily;
use netlink_packet_core::{
    DecodeError, DefaultNla, ErrorBuffer, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NLMSG_DONE,
    NLMSG_ERROR, NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload, NlaBuffer,
    NlasIterator, Parseable,
};
use netlink_packet_netfilter::conntrack::{
    ConntrackAttribute, ConntrackMessage, IPTuple, ProtoTuple, Tuple,
};
use netlink_packet_netfilter::{NetfilterHeader, NetfilterMessage, NetfilterProtoFamily};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};

use super::{Filter, Flow, Matcher, Reconciler, families};

/// `NFNL_SUBSYS_CTNETLINK`: the high byte of a conntrack message type.
const SUBSYS_CTNETLINK: u16 = 1;
/// `IPCTNL_MSG_CT_NEW`: the type of each entry in a dump.
const MSG_CT_NEW: u16 = 0;
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_ID: u16 = 12;
const CTA_ZONE: u16 = 18;
/// The length of `struct nfgenmsg`, before a conntrack message's attributes.
const NFGENMSG_LEN: usize = 4;
/// Larger than any datagram the kernel sends (a dump skb is at most 32 KiB).
const RECV_BUFFER: usize = 64 * 1024;
/// Deletions per `send`. Each is acknowledged separately; this bounds the acknowledgements
/// queued on the socket, so they cannot overflow its receive buffer.
const DELETE_BATCH: usize = 256;
/// Receive buffer requested for the socket (best effort: capped by `net.core.rmem_max`).
const SOCKET_RCVBUF: usize = 4 << 20;

/// A failed conntrack step. Every variant names the step and the address family.
#[derive(Debug, thiserror::Error)]
pub enum ConntrackError {
    /// The netlink socket could not be opened, bound or connected.
    #[error("opening a netfilter netlink socket for conntrack")]
    Open(#[source] io::Error),
    /// The dump request could not be sent.
    #[error("requesting the {family} conntrack table dump")]
    DumpRequest {
        /// Address family.
        family: IpFamily,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Reading the dump failed.
    #[error("reading the {family} conntrack table dump")]
    DumpRead {
        /// Address family.
        family: IpFamily,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The kernel answered the dump request with an error (e.g. `EPERM` without
    /// `CAP_NET_ADMIN`).
    #[error("the kernel refused the {family} conntrack table dump")]
    DumpRefused {
        /// Address family.
        family: IpFamily,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },
    /// A message of the dump could not be decoded.
    #[error("decoding the {family} conntrack table dump")]
    DumpDecode {
        /// Address family.
        family: IpFamily,
        /// Cause.
        #[source]
        source: DecodeError,
    },
    /// A batch of deletions could not be sent.
    #[error("sending {count} {family} conntrack deletions")]
    DeleteSend {
        /// Address family.
        family: IpFamily,
        /// Deletions in the batch.
        count: usize,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Reading the acknowledgements of deletions failed.
    #[error("reading the acknowledgements of {family} conntrack deletions")]
    DeleteRead {
        /// Address family.
        family: IpFamily,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// An acknowledgement could not be decoded.
    #[error("decoding the acknowledgements of {family} conntrack deletions")]
    DeleteDecode {
        /// Address family.
        family: IpFamily,
        /// Cause.
        #[source]
        source: DecodeError,
    },
    /// The kernel refused to delete an entry (other than because it was already gone). The
    /// other deletions of the run were still attempted.
    #[error("the kernel refused to delete the conntrack entry {flow}")]
    DeleteRefused {
        /// The entry.
        flow: String,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },
}

/// One dumped entry chosen for deletion: what identifies it to the kernel, and what it is.
#[derive(Debug)]
struct Doomed {
    orig: Vec<Tuple>,
    /// `CTA_ID` and `CTA_ZONE`, passed back as dumped.
    identity: Vec<DefaultNla>,
    flow: Flow,
}

/// A conntrack netlink socket in the network namespace of the thread that opened it.
#[derive(Debug)]
pub struct Conntrack {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl Conntrack {
    /// Opens a socket in the current network namespace.
    pub fn open() -> Result<Self, ConntrackError> {
        let mut socket = Socket::new(NETLINK_NETFILTER).map_err(ConntrackError::Open)?;
        socket.bind_auto().map_err(ConntrackError::Open)?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(ConntrackError::Open)?;
        // Best effort: a larger buffer only saves round trips, and small acknowledgements
        // without the request echoed back are all this socket needs.
        let _ = socket.set_rx_buf_sz(SOCKET_RCVBUF);
        let _ = socket.set_cap_ack(true);
        Ok(Self {
            socket,
            seq: 0,
            buf: Vec::with_capacity(RECV_BUFFER),
        })
    }

    /// Deletes every entry that one of `filters` matches; returns how many were deleted.
    ///
    /// One dump per address family the filters can touch, then the matching entries deleted in
    /// batches of `DELETE_BATCH`. Entries that disappear in between are skipped. If the
    /// kernel refuses some deletion, the others are still attempted and the first refusal is
    /// returned.
    pub fn delete_matching(&mut self, filters: &BTreeSet<Filter>) -> Result<usize, ConntrackError> {
        self.delete_stale(filters, &Reconciler::default())
    }

    /// Deletes every entry that one of `filters` matches or that `reconciler` finds stale, in
    /// one dump per family either may touch; returns how many were deleted. Otherwise as
    /// [`Conntrack::delete_matching`].
    pub fn delete_stale(
        &mut self,
        filters: &BTreeSet<Filter>,
        reconciler: &Reconciler,
    ) -> Result<usize, ConntrackError> {
        let matcher = Matcher::new(filters);
        let selects = |f: &Flow| matcher.matches(f) || reconciler.is_stale(f);
        let mut deleted = 0;
        let mut refused = None;
        let mut all = families(filters);
        all.extend(reconciler.families());
        for family in all {
            let doomed = self.dump(family, &selects)?;
            for batch in doomed.chunks(DELETE_BATCH) {
                let (n, err) = self.delete_batch(family, batch)?;
                deleted += n;
                refused = refused.or(err);
            }
        }
        match refused {
            Some(e) => Err(e),
            None => Ok(deleted),
        }
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Serialises one conntrack request with `flags` and appends it to `out`.
    fn push_request(
        out: &mut Vec<u8>,
        family: IpFamily,
        flags: u16,
        seq: u32,
        message: ConntrackMessage,
    ) {
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        header.sequence_number = seq;
        let mut msg = NetlinkMessage::new(
            header,
            NetlinkPayload::from(NetfilterMessage::new(
                NetfilterHeader::new(proto_family(family), 0, 0),
                message,
            )),
        );
        msg.finalize();
        let start = out.len();
        out.resize(start + msg.buffer_len(), 0);
        msg.serialize(&mut out[start..]);
    }

    /// Receives one datagram into `self.buf`.
    fn recv(&mut self) -> io::Result<()> {
        self.buf.clear();
        self.buf.reserve(RECV_BUFFER);
        self.socket.recv(&mut self.buf, 0).map(|_| ())
    }

    /// Dumps the `family` table and returns the entries `matcher` selects.
    fn dump(
        &mut self,
        family: IpFamily,
        selects: &dyn Fn(&Flow) -> bool,
    ) -> Result<Vec<Doomed>, ConntrackError> {
        let seq = self.next_seq();
        let mut req = Vec::new();
        Self::push_request(
            &mut req,
            family,
            NLM_F_REQUEST | NLM_F_DUMP,
            seq,
            ConntrackMessage::Get(Vec::new()),
        );
        self.socket
            .send(&req, 0)
            .map_err(|source| ConntrackError::DumpRequest { family, source })?;
        let decode = |source| ConntrackError::DumpDecode { family, source };
        let mut doomed = Vec::new();
        loop {
            self.recv()
                .map_err(|source| ConntrackError::DumpRead { family, source })?;
            for msg in messages(&self.buf) {
                let msg = msg.map_err(decode)?;
                if msg.sequence_number() != seq {
                    continue;
                }
                match msg.message_type() {
                    NLMSG_DONE => return Ok(doomed),
                    NLMSG_ERROR => {
                        if let Some(code) = error_code(msg.payload()).map_err(decode)? {
                            return Err(ConntrackError::DumpRefused {
                                family,
                                source: io::Error::from_raw_os_error(code),
                            });
                        }
                    }
                    t if t == (SUBSYS_CTNETLINK << 8) | MSG_CT_NEW => {
                        let d = entry(msg.payload()).map_err(decode)?;
                        doomed.extend(d.filter(|d| selects(&d.flow)));
                    }
                    _ => {}
                }
            }
        }
    }

    /// Sends one batch of deletions and collects their acknowledgements: the number deleted,
    /// and the first refusal other than `ENOENT`.
    fn delete_batch(
        &mut self,
        family: IpFamily,
        batch: &[Doomed],
    ) -> Result<(usize, Option<ConntrackError>), ConntrackError> {
        let first = self.seq.wrapping_add(1);
        let mut req = Vec::new();
        for d in batch {
            let seq = self.next_seq();
            let mut attrs = vec![ConntrackAttribute::CtaTupleOrig(d.orig.clone())];
            attrs.extend(d.identity.iter().cloned().map(ConntrackAttribute::Other));
            Self::push_request(
                &mut req,
                family,
                NLM_F_REQUEST | NLM_F_ACK,
                seq,
                ConntrackMessage::Delete(attrs),
            );
        }
        self.socket
            .send(&req, 0)
            .map_err(|source| ConntrackError::DeleteSend {
                family,
                count: batch.len(),
                source,
            })?;
        let decode = |source| ConntrackError::DeleteDecode { family, source };
        let mut pending = batch.len();
        let mut deleted = 0;
        let mut refused = None;
        while pending > 0 {
            self.recv()
                .map_err(|source| ConntrackError::DeleteRead { family, source })?;
            for msg in messages(&self.buf) {
                let msg = msg.map_err(decode)?;
                let index = msg.sequence_number().wrapping_sub(first) as usize;
                if msg.message_type() != NLMSG_ERROR || index >= batch.len() {
                    continue;
                }
                pending -= 1;
                match error_code(msg.payload()).map_err(decode)? {
                    None => deleted += 1,
                    Some(libc::ENOENT) => {}
                    Some(code) => {
                        refused.get_or_insert(ConntrackError::DeleteRefused {
                            flow: batch[index].flow.to_string(),
                            source: io::Error::from_raw_os_error(code),
                        });
                    }
                }
            }
        }
        Ok((deleted, refused))
    }
}

fn proto_family(family: IpFamily) -> NetfilterProtoFamily {
    match family {
        IpFamily::V4 => NetfilterProtoFamily::IPv4,
        IpFamily::V6 => NetfilterProtoFamily::IPv6,
    }
}

/// The netlink messages in one datagram.
fn messages(buf: &[u8]) -> impl Iterator<Item = Result<NetlinkBuffer<&[u8]>, DecodeError>> {
    let mut offset = 0;
    std::iter::from_fn(move || {
        if offset >= buf.len() {
            return None;
        }
        let msg = match NetlinkBuffer::new_checked(&buf[offset..]) {
            Ok(m) => m,
            Err(e) => {
                offset = buf.len();
                return Some(Err(e));
            }
        };
        let len = msg.length() as usize;
        offset += len.max(1).next_multiple_of(4);
        Some(Ok(msg))
    })
}

/// The errno of an `NLMSG_ERROR` payload (positive), or `None` for an acknowledgement.
fn error_code(payload: &[u8]) -> Result<Option<i32>, DecodeError> {
    Ok(ErrorBuffer::new_checked(payload)?.code().map(|c| -c.get()))
}

/// Decodes one dumped entry (the payload of an `IPCTNL_MSG_CT_NEW`). `None` for an entry
/// without the fields filters need.
fn entry(payload: &[u8]) -> Result<Option<Doomed>, DecodeError> {
    let attrs = payload
        .get(NFGENMSG_LEN..)
        .ok_or_else(|| DecodeError::from("conntrack message shorter than its nfgenmsg header"))?;
    let mut orig = None;
    let mut reply = None;
    let mut identity = Vec::new();
    for nla in NlasIterator::new(attrs) {
        let nla = nla?;
        match nla.kind() {
            CTA_TUPLE_ORIG => orig = Some(tuples(&nla)?),
            CTA_TUPLE_REPLY => reply = Some(tuples(&nla)?),
            CTA_ID | CTA_ZONE => identity.push(DefaultNla::parse(&nla)?),
            _ => {}
        }
    }
    let (Some(orig), Some(reply)) = (orig, reply) else {
        return Ok(None);
    };
    let o = Fields::of(&orig);
    let r = Fields::of(&reply);
    let (Some(protocol), Some(orig_src), Some(orig_dst), Some(reply_src)) =
        (o.protocol, o.src, o.dst, r.src)
    else {
        return Ok(None);
    };
    Ok(Some(Doomed {
        flow: Flow {
            protocol,
            orig_src,
            orig_src_port: o.src_port,
            orig_dst,
            orig_dst_port: o.dst_port,
            reply_src,
        },
        orig,
        identity,
    }))
}

fn tuples(nla: &NlaBuffer<&[u8]>) -> Result<Vec<Tuple>, DecodeError> {
    NlasIterator::new(nla.value())
        .map(|t| Tuple::parse(&t?))
        .collect()
}

/// The addresses, protocol and ports of one tuple.
#[derive(Default)]
struct Fields {
    protocol: Option<u8>,
    src: Option<std::net::IpAddr>,
    dst: Option<std::net::IpAddr>,
    src_port: Option<u16>,
    dst_port: Option<u16>,
}

impl Fields {
    fn of(tuple: &[Tuple]) -> Self {
        let mut f = Fields::default();
        for t in tuple {
            match t {
                Tuple::Ip(ips) => {
                    for ip in ips {
                        match ip {
                            IPTuple::SourceAddress(a) => f.src = Some(*a),
                            IPTuple::DestinationAddress(a) => f.dst = Some(*a),
                            _ => {}
                        }
                    }
                }
                Tuple::Proto(protos) => {
                    for p in protos {
                        match p {
                            ProtoTuple::Protocol(p) => f.protocol = Some(u8::from(*p)),
                            ProtoTuple::SourcePort(p) => f.src_port = Some(*p),
                            ProtoTuple::DestinationPort(p) => f.dst_port = Some(*p),
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        f
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_netfilter::conntrack::Protocol as L4;

    fn tuple(src: &str, dst: &str, sport: u16, dport: u16) -> Vec<Tuple> {
        vec![
            Tuple::Ip(vec![
                IPTuple::SourceAddress(src.parse().unwrap()),
                IPTuple::DestinationAddress(dst.parse().unwrap()),
            ]),
            Tuple::Proto(vec![
                ProtoTuple::Protocol(L4::Udp),
                ProtoTuple::SourcePort(sport),
                ProtoTuple::DestinationPort(dport),
            ]),
        ]
    }

    /// A dump datagram as the kernel sends it: two entries, then `NLMSG_DONE`.
    fn dump_datagram(seq: u32) -> Vec<u8> {
        let mut out = Vec::new();
        let dnated = ConntrackMessage::New(vec![
            ConntrackAttribute::CtaTupleOrig(tuple("10.100.0.2", "10.96.0.53", 40000, 53)),
            ConntrackAttribute::CtaTupleReply(tuple("10.244.1.10", "10.244.1.1", 5353, 40000)),
            ConntrackAttribute::CtaTimeout(30),
            ConntrackAttribute::Other(DefaultNla::new(CTA_ID, 7u32.to_be_bytes().to_vec())),
        ]);
        let unmapped = ConntrackMessage::New(vec![
            ConntrackAttribute::CtaTupleOrig(tuple("10.100.0.2", "10.96.0.54", 40001, 53)),
            ConntrackAttribute::CtaTupleReply(tuple("10.96.0.54", "10.100.0.2", 53, 40001)),
        ]);
        Conntrack::push_request(&mut out, IpFamily::V4, NLM_F_MULTIPART_FLAG, seq, dnated);
        Conntrack::push_request(&mut out, IpFamily::V4, NLM_F_MULTIPART_FLAG, seq, unmapped);
        let mut done = NetlinkMessage::<NetfilterMessage>::new(
            NetlinkHeader::default(),
            NetlinkPayload::Done(Default::default()),
        );
        done.header.sequence_number = seq;
        done.finalize();
        let start = out.len();
        out.resize(start + done.buffer_len(), 0);
        done.serialize(&mut out[start..]);
        out
    }

    const NLM_F_MULTIPART_FLAG: u16 = netlink_packet_core::NLM_F_MULTIPART;

    #[test]
    fn dumped_entries_decode_into_flows_with_their_identity() {
        let buf = dump_datagram(9);
        let msgs: Vec<_> = messages(&buf).collect::<Result<_, _>>().unwrap();
        assert_eq!(msgs.len(), 3);
        assert_eq!(msgs[2].message_type(), NLMSG_DONE);
        let d = entry(msgs[0].payload()).unwrap().unwrap();
        assert_eq!(
            d.flow.to_string(),
            "proto 17 10.100.0.2:40000 -> 10.96.0.53:53 (reply from 10.244.1.10)"
        );
        assert_eq!(d.identity.len(), 1, "CTA_ID kept for the delete");
        let u = entry(msgs[1].payload()).unwrap().unwrap();
        assert_eq!(u.flow.reply_src, u.flow.orig_dst, "un-DNATed entry");
    }

    #[test]
    fn a_delete_request_carries_the_original_tuple_and_the_id() {
        let buf = dump_datagram(1);
        let msgs: Vec<_> = messages(&buf).collect::<Result<_, _>>().unwrap();
        let d = entry(msgs[0].payload()).unwrap().unwrap();
        let mut attrs = vec![ConntrackAttribute::CtaTupleOrig(d.orig.clone())];
        attrs.extend(d.identity.iter().cloned().map(ConntrackAttribute::Other));
        let mut out = Vec::new();
        Conntrack::push_request(
            &mut out,
            IpFamily::V4,
            NLM_F_REQUEST | NLM_F_ACK,
            5,
            ConntrackMessage::Delete(attrs),
        );
        let parsed = NetlinkMessage::<NetfilterMessage>::deserialize(&out).unwrap();
        assert_eq!(parsed.header.message_type, (SUBSYS_CTNETLINK << 8) | 2);
        assert_eq!(parsed.header.flags, NLM_F_REQUEST | NLM_F_ACK);
        let NetlinkPayload::InnerMessage(m) = parsed.payload else {
            panic!("not a netfilter message: {parsed:?}")
        };
        assert_eq!(m.header.family, NetfilterProtoFamily::IPv4);
        let netlink_packet_netfilter::NetfilterMessageInner::Conntrack(ConntrackMessage::Delete(a)) =
            m.inner
        else {
            panic!("not a conntrack delete: {m:?}")
        };
        assert_eq!(
            a[0],
            ConntrackAttribute::CtaTupleOrig(tuple("10.100.0.2", "10.96.0.53", 40000, 53))
        );
        assert_eq!(
            a[1],
            ConntrackAttribute::Other(DefaultNla::new(CTA_ID, 7u32.to_be_bytes().to_vec()))
        );
    }

    #[test]
    fn error_payloads_read_as_positive_errno_and_acks_as_none() {
        let mut ack = vec![0u8; 20];
        assert_eq!(error_code(&ack).unwrap(), None);
        ack[..4].copy_from_slice(&(-libc::ENOENT).to_ne_bytes());
        assert_eq!(error_code(&ack).unwrap(), Some(libc::ENOENT));
    }
}
