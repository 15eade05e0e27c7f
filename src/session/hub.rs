//! Session events: numbers them (gap-free `seq` per session), queues them for the store and fans
//! them out to live subscribers. A subscriber that falls behind catches up from the store. With a
//! shared store, events another replica committed are read back from the store and fanned out
//! here too (`feed`), and the seq is set from the store when a turn starts (`set_seq`): the
//! previous turn may have run elsewhere.

use crate::store::{Event, Message, PageCut, Store, StoreError};

/// The most event data one page holds (but a page always holds at least one event).
pub const EVENTS_PAGE_BYTES: i64 = 4 * 1024 * 1024;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::broadcast;

/// Live events buffered per session before a slow subscriber must catch up from the store. The
/// buffer is allocated whole when a session's channel is made (its first subscriber or turn),
/// one slot (32 bytes: the events are shared, `Arc`) per event: 8 KiB per session.
const LIVE_BUFFER: usize = 256;

struct Channel {
    /// The last seq handed out or fanned out; `None` until loaded from the store.
    seq: tokio::sync::Mutex<Option<i64>>,
    /// Events go out shared: a slot holds a pointer, not a whole event (a slot of `Event` took
    /// 224 bytes), and each subscriber's receive clones the pointer, not the event's strings.
    tx: broadcast::Sender<Arc<Event>>,
    /// The user message of the session's latest turn started here (when small), for readers
    /// that show a turn's prompt with its first event without asking the store.
    prompt: Mutex<Option<Arc<Message>>>,
}

/// The largest prompt a channel keeps (`Hub::prompt`); a larger one is read from the store.
const PROMPT_KEPT_BYTES: usize = 64 * 1024;

#[derive(Clone)]
pub struct Hub {
    store: Store,
    channels: Arc<Mutex<HashMap<String, Arc<Channel>>>>,
}

impl Hub {
    pub fn new(store: Store) -> Self {
        Hub {
            store,
            channels: Arc::default(),
        }
    }

    fn channel(&self, session_id: &str) -> Arc<Channel> {
        let mut map = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(session_id.to_string())
            .or_insert_with(|| {
                Arc::new(Channel {
                    seq: tokio::sync::Mutex::new(None),
                    tx: broadcast::channel(LIVE_BUFFER).0,
                    prompt: Mutex::new(None),
                })
            })
            .clone()
    }

    fn existing(&self, session_id: &str) -> Option<Arc<Channel>> {
        let map = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        map.get(session_id).cloned()
    }

    /// Drops a deleted session's channel (its subscribers see the stream end), unless a publish
    /// is using it right now: then it stays, as it would have without this.
    pub fn forget(&self, session_id: &str) {
        let mut map = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if map
            .get(session_id)
            .is_some_and(|ch| Arc::strong_count(ch) == 1)
        {
            map.remove(session_id);
        }
    }

    /// Sets the session's last seq as the store has it when a turn starts here (the previous
    /// turn may have run on another replica). Never backwards: events this replica numbered may
    /// still be queued for the store, which then reads an older last seq, and reusing their seqs
    /// would lose the later events (a duplicate seq is not inserted).
    pub async fn set_seq(&self, session_id: &str, last: i64) {
        let ch = self.channel(session_id);
        let mut seq = ch.seq.lock().await;
        *seq = Some(seq.map_or(last, |s| s.max(last)));
    }

    /// Fans out events `first..=last` of a session that another replica committed, read from the
    /// store in order, to this replica's subscribers (none: nothing to do).
    pub async fn feed(&self, session_id: &str, first: i64, last: i64) {
        let Some(ch) = self.existing(session_id) else {
            return;
        };
        let mut seq = ch.seq.lock().await;
        if ch.tx.receiver_count() == 0 {
            *seq = None;
            return;
        }
        let from = match *seq {
            Some(s) if s >= last => return,
            Some(s) => s,
            None => first - 1,
        };
        match self.store.list_events(session_id, from, last - from).await {
            Ok(events) => {
                for e in events {
                    *seq = Some(e.seq);
                    let _ = ch.tx.send(Arc::new(e));
                }
            }
            Err(e) => {
                // Subscribers notice the gap at the next event and read the store themselves.
                tracing::warn!(error = %e, %session_id, "reading another replica's events failed");
                *seq = None;
            }
        }
    }

    /// After notices may have been missed: feeds every followed session up to what is stored.
    pub async fn feed_all(&self) {
        let followed: Vec<(String, Arc<Channel>)> = {
            let map = self.channels.lock().unwrap_or_else(|p| p.into_inner());
            map.iter()
                .filter(|(_, ch)| ch.tx.receiver_count() > 0)
                .map(|(id, ch)| (id.clone(), ch.clone()))
                .collect()
        };
        for (id, ch) in followed {
            let Ok(last) = self.store.last_seq(&id).await else {
                continue;
            };
            let from = ch.seq.lock().await.unwrap_or(last);
            self.feed(&id, from + 1, last).await;
        }
    }

    /// Records and publishes one event; returns it with its seq.
    pub async fn publish(
        &self,
        session_id: &str,
        turn_id: Option<&str>,
        kind: &str,
        ts: String,
        data: serde_json::Value,
    ) -> Result<Event, StoreError> {
        // On every event's path: the store is borrowed, not cloned.
        let store = &self.store;
        self.publish_with(session_id, turn_id, kind, ts, data, |event| async move {
            store.append_events(vec![event]).await
        })
        .await
    }

    /// Numbers one event, has `record` make it durable (with whatever else must commit with it,
    /// such as the end of the turn it closes), then fans it out. When `record` fails the seq is
    /// not used and nothing is fanned out.
    pub async fn publish_with<F, Fut>(
        &self,
        session_id: &str,
        turn_id: Option<&str>,
        kind: &str,
        ts: String,
        data: serde_json::Value,
        record: F,
    ) -> Result<Event, StoreError>
    where
        F: FnOnce(Event) -> Fut,
        Fut: std::future::Future<Output = Result<(), StoreError>>,
    {
        let ch = self.channel(session_id);
        let mut seq = ch.seq.lock().await;
        let last = match *seq {
            Some(s) => s,
            // Events still queued for the writer count (a channel made again after `forget`).
            None => {
                self.store.flush().await?;
                self.store.last_seq(session_id).await?
            }
        };
        let event = Event {
            id: (last + 1).to_string(),
            seq: last + 1,
            session_id: session_id.to_string(),
            turn_id: turn_id.map(String::from),
            kind: kind.to_string(),
            ts,
            data,
        };
        record(event.clone()).await?;
        *seq = Some(event.seq);
        // Nobody listening is fine.
        let _ = ch.tx.send(Arc::new(event.clone()));
        Ok(event)
    }

    /// Subscribes to live events. Subscribe first, then read history, so nothing falls between.
    /// Keeps `message` as the session's latest turn's prompt (see `prompt`).
    /// Only while the session has live subscribers: with none, nothing is copied or measured
    /// on the message path (a later reader finds the prompt in the store).
    pub fn set_prompt(&self, message: &Message) {
        let Some(channel) = self
            .existing(&message.session_id)
            .filter(|c| c.tx.receiver_count() > 0)
        else {
            return;
        };
        let small = message.text.len() + message.parts.to_string().len() <= PROMPT_KEPT_BYTES;
        let kept = small.then(|| Arc::new(message.clone()));
        *channel.prompt.lock().unwrap_or_else(|p| p.into_inner()) = kept;
    }

    /// The user message of `turn_id`, if it is the latest turn started here and was kept.
    pub fn prompt(&self, session_id: &str, turn_id: &str) -> Option<Arc<Message>> {
        let channel = self.existing(session_id)?;
        let prompt = channel.prompt.lock().unwrap_or_else(|p| p.into_inner());
        prompt.as_ref().filter(|m| m.turn_id == turn_id).cloned()
    }

    pub fn subscribe(&self, session_id: &str) -> broadcast::Receiver<Arc<Event>> {
        self.channel(session_id).tx.subscribe()
    }

    /// Where a page of stored events after `since` ends (at most `limit` of them and
    /// `EVENTS_PAGE_BYTES` of data, but at least one), counting any still queued for writing.
    pub async fn cut(
        &self,
        session_id: &str,
        since: i64,
        limit: i64,
    ) -> Result<Option<PageCut>, StoreError> {
        self.store.flush().await?;
        self.store
            .event_cut(session_id, since, limit, EVENTS_PAGE_BYTES)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn publish(hub: &Hub, session: &str) -> i64 {
        hub.publish(
            session,
            None,
            "status",
            crate::store::now(),
            serde_json::json!({}),
        )
        .await
        .expect("publish")
        .seq
    }

    #[tokio::test]
    async fn a_forgotten_channel_ends_its_streams_and_numbering_goes_on_from_the_store() {
        let dir = tempfile::tempdir().expect("tempdir");
        let hub = Hub::new(Store::open(dir.path()).await.expect("store"));
        let mut live = hub.subscribe("ses_a");
        for want in 1..=3 {
            assert_eq!(publish(&hub, "ses_a").await, want);
        }
        hub.forget("ses_a");
        assert!(hub.existing("ses_a").is_none(), "the channel is dropped");
        for want in 1..=3 {
            assert_eq!(live.recv().await.expect("buffered").seq, want);
        }
        assert!(
            matches!(live.recv().await, Err(broadcast::error::RecvError::Closed)),
            "the stream ends"
        );
        // The events may still be queued for the writer: numbering must not start over.
        assert_eq!(publish(&hub, "ses_a").await, 4);
    }

    #[tokio::test]
    async fn a_stale_last_seq_from_the_store_does_not_reuse_seqs_handed_out_here() {
        let dir = tempfile::tempdir().expect("tempdir");
        let hub = Hub::new(Store::open(dir.path()).await.expect("store"));
        assert_eq!(publish(&hub, "ses_1").await, 1);
        // A turn starts and reads the store before the queued event 1 was written.
        hub.set_seq("ses_1", 0).await;
        assert_eq!(publish(&hub, "ses_1").await, 2, "seq 1 is taken");
        // Another replica went further: its seqs are taken too.
        hub.set_seq("ses_1", 7).await;
        assert_eq!(publish(&hub, "ses_1").await, 8);
    }
}
