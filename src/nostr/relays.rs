//! The configured relays and the relay client: connecting without waiting, sending one event to one relay
//! with a bounded wait for its `OK`, and fetching with a deadline.

use std::time::Duration;

use ::nostr::{Event, Filter, Keys, RelayUrl};
use nostr_sdk::{Client, RelayOptions};

use super::{NostrError, SEND_TIMEOUT};
use crate::config::Config;

/// How soon a dropped relay connection is retried. The SDK's own default stretches to a minute; a relay that
/// comes back should see the outbox within seconds.
const RECONNECT_INTERVAL: Duration = Duration::from_secs(3);

/// The relays an agent publishes to and reads from, parsed once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelaySet {
    urls: Vec<RelayUrl>,
}

impl RelaySet {
    /// `nostr.relays`, deduplicated in order. Empty when none is configured.
    pub fn from_config(config: &Config) -> Result<RelaySet, NostrError> {
        RelaySet::parse(&config.nostr.relays)
    }

    pub fn parse<S: AsRef<str>>(urls: &[S]) -> Result<RelaySet, NostrError> {
        let mut out: Vec<RelayUrl> = Vec::new();
        for raw in urls {
            let raw = raw.as_ref().trim();
            let url = RelayUrl::parse(raw).map_err(|e| NostrError::BadRelayUrl {
                url: raw.to_string(),
                reason: e.to_string(),
            })?;
            if !out.contains(&url) {
                out.push(url);
            }
        }
        Ok(RelaySet { urls: out })
    }

    pub fn is_empty(&self) -> bool {
        self.urls.is_empty()
    }

    pub fn urls(&self) -> &[RelayUrl] {
        &self.urls
    }

    pub fn strings(&self) -> Vec<String> {
        self.urls.iter().map(|u| u.to_string()).collect()
    }

    /// An error when there is nothing to talk to.
    pub fn require(&self) -> Result<&RelaySet, NostrError> {
        if self.is_empty() {
            Err(NostrError::NoRelays)
        } else {
            Ok(self)
        }
    }
}

/// A relay client signing with `keys`, with every relay of `relays` added and connecting in the background.
/// Never waits for a connection: sends to a relay that is not connected simply fail and are retried later.
pub async fn client(keys: &Keys, relays: &RelaySet) -> Result<Client, NostrError> {
    let client = Client::builder().signer(keys.clone()).build();
    for url in relays.urls() {
        let opts = RelayOptions::new()
            .retry_interval(RECONNECT_INTERVAL)
            .adjust_retry_interval(false);
        client
            .pool()
            .add_relay(url.clone(), opts)
            .await
            .map_err(|e| NostrError::Client(e.to_string()))?;
    }
    client.connect().await;
    Ok(client)
}

/// Waits up to `timeout` for at least one relay to be connected (a short-lived CLI client wants this before
/// its first send; the long-lived agent client does not).
pub async fn wait_connected(client: &Client, timeout: Duration) {
    client.wait_for_connection(timeout).await;
}

/// Sends `event` to each of `relays` and returns, per relay, whether it accepted the event (`OK true`) or why
/// not. Each relay gets at most [`SEND_TIMEOUT`] (plus the SDK's own `OK` wait, which is shorter).
pub async fn send_to(
    client: &Client,
    event: &Event,
    relays: &[RelayUrl],
) -> Vec<(RelayUrl, Result<(), String>)> {
    let sends = relays.iter().map(|url| async move {
        let result = match client.relay(url).await {
            Err(e) => Err(e.to_string()),
            Ok(relay) => match tokio::time::timeout(SEND_TIMEOUT, relay.send_event(event)).await {
                Err(_) => Err(format!("no answer within {} s", SEND_TIMEOUT.as_secs())),
                Ok(Err(e)) => Err(e.to_string()),
                Ok(Ok(_)) => Ok(()),
            },
        };
        (url.clone(), result)
    });
    futures::future::join_all(sends).await
}

/// Events matching `filter` from every connected relay, waiting at most `timeout` for their `EOSE`s.
pub async fn fetch(
    client: &Client,
    filter: Filter,
    timeout: Duration,
) -> Result<Vec<Event>, NostrError> {
    let events = client
        .fetch_events(filter, timeout)
        .await
        .map_err(|e| NostrError::Client(e.to_string()))?;
    Ok(events.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_dedups() {
        let set = RelaySet::parse(&[
            "ws://127.0.0.1:7000",
            "ws://127.0.0.1:7000/",
            "wss://relay.example",
        ])
        .unwrap();
        assert_eq!(set.urls().len(), 2, "{set:?}");
        assert!(RelaySet::parse(&["http://x"]).is_err());
        assert!(matches!(
            RelaySet::parse::<&str>(&[]).unwrap().require(),
            Err(NostrError::NoRelays)
        ));
    }
}
