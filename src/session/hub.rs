//! Session events: numbers them (gap-free `seq` per session), queues them for the store and fans
//! them out to live subscribers. A subscriber that falls behind catches up from the store. With a
//! shared store, events another replica committed are read back from the store and fanned out
//! here too (`feed`), and the seq is set from the store when a turn starts (`set_seq`): the
//! previous turn may have run elsewhere.

use crate::store::{Event, Store, StoreError};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::broadcast;

/// Live events buffered per session before a slow subscriber must catch up from the store.
const LIVE_BUFFER: usize = 1024;

struct Channel {
    /// The last seq handed out or fanned out; `None` until loaded from the store.
    seq: tokio::sync::Mutex<Option<i64>>,
    tx: broadcast::Sender<Event>,
}

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
                })
            })
            .clone()
    }

    fn existing(&self, session_id: &str) -> Option<Arc<Channel>> {
        let map = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        map.get(session_id).cloned()
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
                    let _ = ch.tx.send(e);
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
        let ch = self.channel(session_id);
        let mut seq = ch.seq.lock().await;
        let last = match *seq {
            Some(s) => s,
            None => self.store.last_seq(session_id).await?,
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
        self.store.append_events(vec![event.clone()]).await?;
        *seq = Some(event.seq);
        // Nobody listening is fine.
        let _ = ch.tx.send(event.clone());
        Ok(event)
    }

    /// Subscribes to live events. Subscribe first, then read history, so nothing falls between.
    pub fn subscribe(&self, session_id: &str) -> broadcast::Receiver<Event> {
        self.channel(session_id).tx.subscribe()
    }

    /// Stored events after `since`, including any still queued for writing.
    pub async fn history(
        &self,
        session_id: &str,
        since: i64,
        limit: i64,
    ) -> Result<Vec<Event>, StoreError> {
        self.store.flush().await?;
        self.store.list_events(session_id, since, limit).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stale_last_seq_from_the_store_does_not_reuse_seqs_handed_out_here() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).await.expect("store");
        let hub = Hub::new(store);
        let first = hub
            .publish("ses_1", None, "text", "t".into(), serde_json::json!({}))
            .await
            .expect("publish");
        assert_eq!(first.seq, 1);
        // A turn starts and reads the store before the queued event 1 was written.
        hub.set_seq("ses_1", 0).await;
        let next = hub
            .publish("ses_1", None, "text", "t".into(), serde_json::json!({}))
            .await
            .expect("publish");
        assert_eq!(next.seq, 2, "seq 1 is taken");
        // Another replica went further: its seqs are taken too.
        hub.set_seq("ses_1", 7).await;
        let after = hub
            .publish("ses_1", None, "done", "t".into(), serde_json::json!({}))
            .await
            .expect("publish");
        assert_eq!(after.seq, 8);
    }
}
