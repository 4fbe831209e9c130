//! The ADS stream's codec: a `DeltaDiscoveryResponse` is decoded and validated resource by
//! resource, straight from the gRPC message's bytes, into the plain types the state takes.
//!
//! Decoding the whole response first (prost's generated `decode`) made every resource's
//! protobuf (name, `Any` type URL, body) live at once: for a 100,000-workload push, millions of
//! small allocations freed among the validated resources' long-lived ones, so most of those
//! heap pages kept a few live objects and glibc could not give them back. Here each resource's
//! protobuf is decoded, validated and dropped before the next one, and the next one reuses its
//! memory. The outer message is walked field by field (Envoy's `discovery.proto` numbers:
//! `resources` 2, `type_url` 4, `nonce` 5, `removed_resources` 6; every other field skipped, as
//! an unknown one would be), and a resource that does not decode is rejected alone, like one
//! that does not validate: the rest of the push is applied.

use ambit_proto::{
    envoy::service::discovery::v3::{DeltaDiscoveryRequest, Resource},
    istio::{security::Authorization, workload::Address},
    prost::{
        Message,
        bytes::{Buf as _, Bytes},
        decode_length_delimiter,
        encoding::{DecodeContext, WireType, check_wire_type, decode_key, skip_field, string},
    },
};
use tonic::{
    Status,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
};

use super::{
    ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, AddressResource, Error, address_from_proto,
    policy_from_proto,
};
use crate::policy::Policy;

/// One response, validated: what the client applies and answers.
#[derive(Debug)]
pub struct Push {
    pub type_url: String,
    pub nonce: String,
    pub removed: Vec<String>,
    /// Resources in the response, valid or not.
    pub upserts: usize,
    pub resources: Resources,
    /// Why the refused resources were (or why the whole response was, for a type not
    /// subscribed to).
    pub rejected: Rejected,
}

/// How many resources of a response were refused, and why the first [`Rejected::NAMED`] were:
/// a push of 100,000 bad resources keeps 20 reasons, not 100,000.
#[derive(Debug, Default)]
pub struct Rejected {
    pub named: Vec<String>,
    pub count: usize,
}

impl Rejected {
    /// Reasons kept per response (what a NACK and `ambitctl status` name).
    pub const NAMED: usize = 20;

    fn add(&mut self, why: String) {
        if self.named.len() < Self::NAMED {
            self.named.push(why);
        }
        self.count += 1;
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

/// The valid resources of one response, by type.
#[derive(Debug)]
pub enum Resources {
    Addresses(Vec<(String, AddressResource)>),
    Policies(Vec<(String, Policy)>),
    /// A type the client did not subscribe to: nothing is applied.
    Unsubscribed,
}

impl Push {
    /// Walks one encoded `DeltaDiscoveryResponse`. Fails only when the response itself is not
    /// a valid protobuf (its own fields); a resource that is not is rejected alone.
    pub fn decode(mut msg: &[u8]) -> Result<Push, String> {
        let mut type_url = String::new();
        let mut nonce = String::new();
        let mut removed = Vec::new();
        let mut resources: Vec<&[u8]> = Vec::new();
        let ctx = DecodeContext::default;
        while !msg.is_empty() {
            let (tag, wire_type) = decode_key(&mut msg).map_err(|e| e.to_string())?;
            let decoded = match tag {
                2 => check_wire_type(WireType::LengthDelimited, wire_type)
                    .map_err(|e| e.to_string())
                    .and_then(|()| {
                        resources.push(length_delimited(&mut msg)?);
                        Ok(())
                    }),
                4 => string::merge(wire_type, &mut type_url, &mut msg, ctx())
                    .map_err(|e| e.to_string()),
                5 => {
                    string::merge(wire_type, &mut nonce, &mut msg, ctx()).map_err(|e| e.to_string())
                }
                6 => string::merge_repeated(wire_type, &mut removed, &mut msg, ctx())
                    .map_err(|e| e.to_string()),
                _ => skip_field(wire_type, tag, &mut msg, ctx()).map_err(|e| e.to_string()),
            };
            decoded.map_err(|e| format!("field {tag}: {e}"))?;
        }
        let upserts = resources.len();
        let mut rejected = Rejected::default();
        let resources = match type_url.as_str() {
            ADDRESS_TYPE_URL => {
                let each = validate_each(ADDRESS_TYPE_URL, &resources, &mut rejected, {
                    |name: &str, a: Address| address_from_proto(name, a)
                });
                Resources::Addresses(each)
            }
            AUTHORIZATION_TYPE_URL => {
                let each = validate_each(AUTHORIZATION_TYPE_URL, &resources, &mut rejected, {
                    |name: &str, a: Authorization| policy_from_proto(name, a)
                });
                Resources::Policies(each)
            }
            other => {
                rejected.add(format!(
                    "type {other:?} was not subscribed to (only {ADDRESS_TYPE_URL} and {AUTHORIZATION_TYPE_URL})"
                ));
                Resources::Unsubscribed
            }
        };
        Ok(Push {
            type_url,
            nonce,
            removed,
            upserts,
            resources,
            rejected,
        })
    }
}

/// Decodes and validates each resource in turn; the refused ones are named in `rejected`.
fn validate_each<T: Message + Default, U>(
    type_url: &str,
    resources: &[&[u8]],
    rejected: &mut Rejected,
    convert: impl Fn(&str, T) -> Result<U, Error>,
) -> Vec<(String, U)> {
    let mut ok = Vec::with_capacity(resources.len());
    for (i, bytes) in resources.iter().enumerate() {
        let r = match Resource::decode(*bytes) {
            Ok(r) => r,
            Err(e) => {
                rejected.add(format!(
                    "resource #{i} of the response: does not decode: {e}"
                ));
                continue;
            }
        };
        let decoded = match &r.resource {
            None => Err(format!("resource {}: it has no body", r.name)),
            Some(any) if !any.type_url.is_empty() && any.type_url != type_url => Err(format!(
                "resource {}: its body is a {}, not a {type_url}",
                r.name, any.type_url
            )),
            Some(any) => T::decode(any.value.as_slice())
                .map_err(|e| format!("resource {}: does not decode: {e}", r.name)),
        };
        match decoded.and_then(|t| convert(&r.name, t).map_err(|e| e.to_string())) {
            Ok(u) => ok.push((r.name, u)),
            Err(e) => rejected.add(e),
        }
    }
    ok
}

/// The next length-delimited field's bytes.
fn length_delimited<'a>(msg: &mut &'a [u8]) -> Result<&'a [u8], String> {
    let len = decode_length_delimiter(&mut *msg).map_err(|e| e.to_string())?;
    if len > msg.len() {
        return Err(format!(
            "a resource of {len} bytes where {} are left",
            msg.len()
        ));
    }
    let (field, rest) = msg.split_at(len);
    *msg = rest;
    Ok(field)
}

/// The ADS stream's codec: requests are encoded as usual, responses become [`Push`]es.
#[derive(Debug, Default)]
pub struct AdsCodec;

impl Codec for AdsCodec {
    type Encode = DeltaDiscoveryRequest;
    type Decode = Push;
    type Encoder = RequestEncoder;
    type Decoder = PushDecoder;

    fn encoder(&mut self) -> RequestEncoder {
        RequestEncoder
    }

    fn decoder(&mut self) -> PushDecoder {
        PushDecoder
    }
}

#[derive(Debug)]
pub struct RequestEncoder;

impl Encoder for RequestEncoder {
    type Item = DeltaDiscoveryRequest;
    type Error = Status;

    fn encode(
        &mut self,
        item: DeltaDiscoveryRequest,
        dst: &mut EncodeBuf<'_>,
    ) -> Result<(), Status> {
        item.encode(dst)
            .map_err(|e| Status::internal(format!("cannot encode an xDS request: {e}")))
    }
}

#[derive(Debug)]
pub struct PushDecoder;

impl Decoder for PushDecoder {
    type Item = Push;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Push>, Status> {
        // tonic holds the whole message in one buffer: this takes a view of it, no copy.
        let whole: Bytes = src.copy_to_bytes(src.remaining());
        Push::decode(&whole)
            .map(Some)
            .map_err(|e| Status::internal(format!("the xDS response does not decode: {e}")))
    }
}
