//! CONNECT: validation, the session claim, CONNACK.

use jetmq_codec::{
    ConnAck, ConnAckProperties, Connect, LastWill, Packet, ProtocolVersion, ReasonCode,
};

use crate::authn::{Credentials, Refusal};
use crate::node::ConnContext;
use crate::session::{now_ms, Owner, SessionRecord, StoreError, StoredProperties, StoredWill};
use crate::telemetry::PreviousOwner;
use crate::topic;
use crate::transport::PeerInfo;

/// What the handshake settled.
pub(super) struct Admission {
    pub client_id: String,
    pub assigned_client_id: bool,
    pub keep_alive: u16,
    pub server_keep_alive: Option<u16>,
    pub expiry_secs: u32,
    pub expiry_capped: bool,
    /// The authenticated username authorization sees (may differ from CONNECT's: a client
    /// certificate's name or a JWT claim), None for anonymous clients.
    pub username: Option<String>,
    /// Unix seconds after which the credentials (a JWT) are no longer valid.
    pub expires_at: Option<u64>,
}

/// Checks a CONNECT and authenticates the client (see [`crate::authn`]); `peer` is what the
/// transport learned about it (a verified certificate's name, its per-user read budget).
/// `Err` carries the CONNACK reason to refuse it with.
pub(super) async fn admit(
    context: &ConnContext,
    connect: &Connect,
    peer: &PeerInfo,
) -> Result<Admission, ReasonCode> {
    let limits = &context.config.limits;
    let v5 = connect.protocol.is_v5();
    let mut client_id = connect.client_id.clone();
    let mut assigned = false;
    if client_id.is_empty() {
        if !v5 && !connect.clean_start {
            // 3.1.1: a server-chosen id cannot be resumed, so a persistent session needs one.
            return Err(ReasonCode::CLIENT_IDENTIFIER_NOT_VALID);
        }
        client_id = format!("jetmq-{}-{:016x}", context.config.node_id, rand_u64());
        assigned = true;
    }
    if client_id.len() > limits.max_client_id_length {
        return Err(ReasonCode::CLIENT_IDENTIFIER_NOT_VALID);
    }
    let mut keep_alive = connect.keep_alive;
    let mut server_keep_alive = None;
    if keep_alive > limits.max_keepalive {
        if v5 {
            keep_alive = limits.max_keepalive;
            server_keep_alive = Some(keep_alive);
        } else {
            // 3.1.1 cannot tell the client to use less; refuse like mosquitto does.
            return Err(ReasonCode::CLIENT_IDENTIFIER_NOT_VALID);
        }
    }
    let requested_expiry = if v5 {
        connect.properties.session_expiry_interval.unwrap_or(0)
    } else if connect.clean_start {
        0
    } else {
        limits.max_session_expiry
    };
    let expiry_secs = requested_expiry.min(limits.max_session_expiry);
    if let Some(will) = &connect.will {
        if topic::validate_topic_name(
            &will.topic,
            limits.max_topic_levels,
            limits.max_topic_length,
        )
        .is_err()
        {
            return Err(ReasonCode::TOPIC_NAME_INVALID);
        }
        if will.payload.len() > limits.max_packet_size as usize {
            return Err(ReasonCode::PACKET_TOO_LARGE);
        }
    }
    if connect.properties.authentication_method.is_some() {
        return Err(ReasonCode::BAD_AUTHENTICATION_METHOD);
    }
    let identity = context
        .authn
        .authenticate(Credentials {
            username: connect.username.as_deref(),
            password: connect.password.as_deref(),
            cert_username: peer.cert_username.as_deref(),
        })
        .await
        .map_err(|refusal| match refusal {
            // 3.1.1 return codes 4 and 5 (the codec maps them), 3 for busy.
            Refusal::BadCredentials => ReasonCode::BAD_USER_NAME_OR_PASSWORD,
            Refusal::NotAuthorized => ReasonCode::NOT_AUTHORIZED,
            Refusal::Busy => ReasonCode::SERVER_BUSY,
        })?;
    let unusable = context
        .config
        .acl
        .unsafe_placeholders(crate::auth::Principal {
            username: identity.username.as_deref(),
            client_id: &client_id,
        });
    if !unusable.is_empty() {
        // Not refused: the ACL fails closed for this client (see crate::auth).
        tracing::warn!(
            %client_id,
            username = identity.username.as_deref(),
            unusable = ?unusable,
            "identity is missing, empty or holds + # / or NUL: ACL allow rules with its placeholder do not apply, deny rules with it cover every topic"
        );
    }
    if let Some(username) = &identity.username {
        // Publish limits across all of this user's connections on the node.
        peer.attach_user(username);
    }
    Ok(Admission {
        client_id,
        assigned_client_id: assigned,
        keep_alive,
        server_keep_alive,
        expiry_secs,
        expiry_capped: v5 && expiry_secs != requested_expiry,
        username: identity.username,
        expires_at: identity.expires_at,
    })
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    hasher.finish()
}

pub(super) fn stored_will(will: &LastWill) -> StoredWill {
    StoredWill {
        topic: will.topic.clone(),
        payload: will.payload.to_vec(),
        qos: will.qos as u8,
        retain: will.retain,
        delay_secs: will.delay_interval.unwrap_or(0),
        properties: StoredProperties {
            payload_format_indicator: will.properties.payload_format_indicator,
            message_expiry_interval: will.properties.message_expiry_interval,
            content_type: will.properties.content_type.clone(),
            response_topic: will.properties.response_topic.clone(),
            correlation_data: will
                .properties
                .correlation_data
                .as_ref()
                .map(|b| b.to_vec()),
            user_properties: will.properties.user_properties.clone(),
        },
    }
}

/// The claimed session: the record now names this connection as its owner.
pub(super) struct Claim {
    pub record: SessionRecord,
    pub revision: u64,
    pub session_present: bool,
    /// The previous connection's [`SessionRecord::sent_upto`], if it ended in order.
    pub sent_upto: Option<u64>,
}

/// Makes this connection the owner of the client id's session, cluster-wide. Races with
/// other connections are settled by the KV revision check; the loser retries on fresh data.
pub(super) async fn claim_session(
    context: &ConnContext,
    admission: &Admission,
    connect: &Connect,
    connection: u64,
) -> Result<Claim, StoreError> {
    let store = &context.sessions;
    // Compare-and-set conflicts so far; waiting out a store outage does not count.
    let mut conflicts = 0;
    let mut handed_over_by = None;
    // The previous owner's node did not answer the hand-over: its connection is gone with it.
    let mut owner_unreachable = false;
    // A claim waits out a store that does not answer (a bucket leader election) as long
    // as a session write does, in all its reads and writes together; the client waits for
    // its CONNACK meanwhile.
    let deadline = store.outage_deadline();
    let this_connection = Owner {
        node: context.config.node_id.clone(),
        connection,
    };
    loop {
        let (existing, revision) = store.load_until(&admission.client_id, deadline).await?;
        let now = now_ms();
        // A save that timed out may still have landed: the record is then ours already.
        let previous_owner = existing
            .as_ref()
            .and_then(|r| r.owner.clone())
            .filter(|owner| *owner != this_connection);
        if handed_over_by.is_none() {
            if let Some(owner) = &previous_owner {
                owner_unreachable = !context
                    .registry
                    .hand_over(&owner.node, &admission.client_id, owner.connection)
                    .await;
                handed_over_by = Some(owner.clone());
                continue;
            }
        }
        // A session with expiry 0 ends with its network connection. One whose connection did
        // not write its final state (its node died, or did not answer the hand-over) has
        // ended all the same: nobody may resume it.
        let ended_with_lost_connection =
            |record: &SessionRecord| record.expiry_secs == 0 && previous_owner.is_some();
        // The lost connection's will: its connection ended when its node died, before this
        // CONNECT, so a will without delay is due; a delayed one only if the session is not
        // resumed (a resume within the delay cancels it). Published once the claim landed,
        // so that a janitor settling the same record concurrently loses the race cleanly. A
        // node that answered the hand-over publishes its connection's will itself.
        let orphaned_will = existing
            .as_ref()
            .filter(|_| previous_owner.is_some() && owner_unreachable)
            .and_then(|r| Some((r.will.clone()?, r.username.clone())));
        let (mut record, session_present) = match existing {
            Some(record)
                if !connect.clean_start
                    && !record.is_expired(now)
                    && !ended_with_lost_connection(&record) =>
            {
                (record, true)
            }
            _ => (
                SessionRecord::new(&admission.client_id, context.router.position()),
                false,
            ),
        };
        record.owner = Some(this_connection.clone());
        record.disconnected_at_ms = None;
        // Read before this write (in `serve`); from now on only this connection knows.
        let sent_upto = record.sent_upto.take();
        record.expiry_secs = admission.expiry_secs;
        record.will = connect.will.as_ref().map(stored_will);
        record.will_due_ms = None;
        record.protocol_v5 = connect.protocol == ProtocolVersion::V5;
        record.username = admission.username.clone();
        match store.save_until(&record, revision, deadline).await {
            Ok(revision) => {
                count_claim(
                    context,
                    session_present,
                    previous_owner.as_ref().or(handed_over_by.as_ref()),
                );
                if previous_owner.is_some() || handed_over_by.is_some() {
                    context.metrics.takeovers.inc();
                }
                if let Some((will, username)) =
                    orphaned_will.filter(|(w, _)| w.delay_secs == 0 || !session_present)
                {
                    tracing::info!(client_id = %admission.client_id, "publishing the will of the connection lost with its node");
                    // Under the lost connection's username: the ACL judges its will.
                    crate::will::publish_will(
                        context,
                        &admission.client_id,
                        username.as_deref(),
                        &will,
                    )
                    .await;
                }
                // Still owned after the hand-over: the old connection did not answer in time
                // (or its node is gone); make sure it goes.
                if let Some(owner) = previous_owner {
                    context
                        .registry
                        .kick(&owner.node, &admission.client_id, owner.connection)
                        .await;
                }
                return Ok(Claim {
                    record,
                    revision,
                    session_present,
                    sent_upto,
                });
            }
            Err(StoreError::Conflict) if conflicts < 7 => conflicts += 1,
            Err(err) => return Err(err),
        }
    }
}

fn count_claim(context: &ConnContext, session_present: bool, previous_owner: Option<&Owner>) {
    if !session_present {
        context.metrics.sessions_created.inc();
        return;
    }
    // A session still owned by another node when its client comes back here is, after a
    // node failure, exactly the "session load after failover" operators want to see.
    let previous = match previous_owner {
        None => PreviousOwner::None,
        Some(owner) if owner.node == context.config.node_id => PreviousOwner::ThisNode,
        Some(_) => PreviousOwner::OtherNode,
    };
    context.metrics.session_resumed(previous);
}

pub(super) fn connack(
    context: &ConnContext,
    connect: &Connect,
    admission: &Admission,
    session_present: bool,
) -> Packet {
    let limits = &context.config.limits;
    let mut properties = ConnAckProperties::default();
    if connect.protocol.is_v5() {
        properties.receive_maximum = Some(limits.receive_maximum);
        properties.maximum_packet_size = Some(limits.max_packet_size);
        properties.topic_alias_maximum = Some(limits.topic_alias_maximum);
        properties.retain_available = Some(true);
        properties.wildcard_subscription_available = Some(true);
        properties.subscription_identifiers_available = Some(true);
        properties.shared_subscription_available = Some(true);
        properties.server_keep_alive = admission.server_keep_alive;
        if admission.assigned_client_id {
            properties.assigned_client_identifier = Some(admission.client_id.clone());
        }
        if admission.expiry_capped {
            properties.session_expiry_interval = Some(admission.expiry_secs);
        }
    }
    Packet::ConnAck(Box::new(ConnAck {
        session_present,
        reason: ReasonCode::SUCCESS,
        properties,
    }))
}

pub(super) fn refusal(reason: ReasonCode) -> Packet {
    Packet::ConnAck(Box::new(ConnAck {
        session_present: false,
        reason,
        properties: ConnAckProperties::default(),
    }))
}
