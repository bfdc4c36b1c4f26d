//! The cluster's state key, from the Secret `ferry-state-key` in Ferry's namespace (the
//! operator creates it; the agent may only `get` that one Secret). Every save signs its
//! file with it and every restore checks the file's MAC against it
//! ([`ferry_agent::statefile`]). Until the agent has read it, saves and restores are
//! refused with [`NoStateKey`], which says why; the agent looks every 2 seconds until it
//! has the key, then every 30 seconds (a replaced key is taken, with a warning: files
//! signed with the old one are then refused).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_agent::statefile::StateKey;
use ferry_crds::tls::{STATE_KEY_KEY, STATE_KEY_NAME};
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use tracing::{info, warn};

use super::Agent;

/// No state key yet: nothing is saved or restored.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "this node's agent has no state key yet ({why}): state files are signed and checked with \
     the cluster's key in Secret {STATE_KEY_NAME} (the operator creates it), so nothing is \
     saved or restored until the agent has read it"
)]
pub struct NoStateKey {
    pub why: String,
}

/// The key the agent holds now, or why there is none.
#[derive(Default)]
pub struct KeyStore {
    inner: Mutex<(Option<StateKey>, String)>,
}

impl KeyStore {
    pub fn current(&self) -> Result<StateKey, NoStateKey> {
        let s = self.inner.lock().expect("never poisoned");
        match &s.0 {
            Some(key) => Ok(key.clone()),
            None if s.1.is_empty() => Err(NoStateKey {
                why: "it has not been read yet".into(),
            }),
            None => Err(NoStateKey { why: s.1.clone() }),
        }
    }

    /// Holds `key`; whether it replaced another one.
    pub fn set(&self, key: StateKey) -> bool {
        let mut s = self.inner.lock().expect("never poisoned");
        let replaced = s.0.as_ref().is_some_and(|old| *old != key);
        s.0 = Some(key);
        s.1.clear();
        replaced
    }

    fn set_why(&self, why: String) {
        self.inner.lock().expect("never poisoned").1 = why;
    }
}

/// The key in `secret`.
pub fn parse(secret: &Secret) -> Result<StateKey, String> {
    let bytes = secret
        .data
        .as_ref()
        .and_then(|d| d.get(STATE_KEY_KEY))
        .ok_or_else(|| format!("Secret {STATE_KEY_NAME} has no data key '{STATE_KEY_KEY}'"))?;
    StateKey::from_bytes(&bytes.0).map_err(|e| format!("Secret {STATE_KEY_NAME}: {e}"))
}

/// Keeps [`Agent::state_key`] current, forever.
pub async fn run(agent: Arc<Agent>) {
    let secrets: Api<Secret> = Api::namespaced(agent.client.clone(), &agent.namespace);
    loop {
        let read = match secrets.get_opt(STATE_KEY_NAME).await {
            Ok(Some(s)) => parse(&s),
            Ok(None) => Err(format!(
                "Secret {STATE_KEY_NAME} does not exist yet in {}",
                agent.namespace
            )),
            Err(e) => Err(format!("reading Secret {STATE_KEY_NAME}: {e}")),
        };
        let had = agent.state_key.current().is_ok();
        let wait = match read {
            Ok(key) => {
                let id = key.id();
                if agent.state_key.set(key) {
                    warn!(node = %agent.node, key_id = %id, "the state key was replaced: state files signed with the old one are refused");
                } else if !had {
                    info!(node = %agent.node, key_id = %id, "state key read: saves and restores are possible");
                }
                Duration::from_secs(30)
            }
            Err(why) => {
                if had {
                    // Keep the key held: the files it signed stay restorable.
                    warn!(node = %agent.node, error = %why, "could not read the state key again; keeping the one held");
                } else {
                    warn!(node = %agent.node, error = %why, "no state key yet");
                    agent.state_key.set_why(why);
                }
                Duration::from_secs(if had { 30 } else { 2 })
            }
        };
        tokio::time::sleep(wait).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;
    use std::collections::BTreeMap;

    fn secret(data: Option<&[u8]>) -> Secret {
        Secret {
            data: data.map(|d| BTreeMap::from([(STATE_KEY_KEY.into(), ByteString(d.to_vec()))])),
            ..Default::default()
        }
    }

    #[test]
    fn the_key_is_32_bytes_under_its_data_key() {
        assert_eq!(
            parse(&secret(Some(&[7; 32]))).unwrap(),
            StateKey::from_bytes(&[7; 32]).unwrap()
        );
        let e = parse(&secret(Some(&[7; 16]))).unwrap_err();
        assert!(e.contains("32 bytes, not 16"), "{e}");
        let e = parse(&secret(None)).unwrap_err();
        assert!(e.contains("no data key 'key'"), "{e}");
    }

    #[test]
    fn without_a_key_the_store_says_why() {
        let store = KeyStore::default();
        let e = store.current().unwrap_err();
        assert!(e.to_string().contains("has not been read yet"), "{e}");
        assert!(e.to_string().contains("Secret ferry-state-key"), "{e}");
        store.set_why("Secret ferry-state-key does not exist yet in ferry-system".into());
        assert!(store.current().unwrap_err().why.contains("does not exist"));
        assert!(!store.set(StateKey::from_bytes(&[1; 32]).unwrap()));
        assert!(store.current().is_ok());
        assert!(
            store.set(StateKey::from_bytes(&[2; 32]).unwrap()),
            "replaced"
        );
    }
}
