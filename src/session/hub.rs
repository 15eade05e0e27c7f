//! Session events: numbers them (gap-free `seq` per session), queues them for the store and fans
//! them out to live subscribers. A subscriber that falls behind catches up from the store.

use crate::store::{Event, Store, StoreError};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::broadcast;

/// Live events buffered per session before a slow subscriber must catch up from the store.
const LIVE_BUFFER: usize = 1024;

struct Channel {
    /// The last seq handed out; `None` until loaded from the store.
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
