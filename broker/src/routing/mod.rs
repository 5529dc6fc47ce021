//! Where messages leave: the node reads the whole message stream once, in order, and hands
//! each message to the local sessions whose subscriptions match.
//!
//! Every message carries its position in the stream ([`position`]), so a session always
//! knows exactly how far it got. A session that attaches (connect, resume) or falls behind
//! (its queue was full) catches up by replaying from its own position: from the in-memory
//! [`ReplayRing`] when it still covers the gap, else from JetStream ([`replay_range`]).
//!
//! How it is used: the server builds one [`Router`] per node and spawns
//! [`run_stream_reader`] on it; each session [`Router::attach`]es with a [`SessionLink`]
//! (its [`mailbox`]) and receives [`Delivery`]s there.
//!
//! - [`message`]: the message and delivery types, and decoding stream messages;
//! - [`router`]: the table of sessions and subscriptions, and dispatching;
//! - [`ring`]: the replay ring;
//! - [`reader`]: the stream reader;
//! - [`index`]: the subscription trie; [`shared`]: shared subscriptions;
//!   [`stall`]: noticing a stuck reader; [`replay`]: catching a session up.

pub mod index;
pub mod mailbox;
mod message;
pub mod position;
mod reader;
mod replay;
mod ring;
mod router;
pub mod shared;
pub mod stall;

pub use index::{Match, SessionKey, SubEntry, SubscriptionIndex};
pub use message::{
    decode_stream_messages, merge_matches, DecodeMessageError, Delivery, MessageRef, StoredMessage,
};
pub use reader::{run_stream_reader, stream_sequence};
pub use replay::{replay_range, ReplayError};
pub use ring::ReplayRing;
pub use router::{Router, SessionLink, NOT_LAGGED};
