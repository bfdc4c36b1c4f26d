//! The cluster's state key: 32 random bytes in the Secret `ferry-state-key` in Ferry's
//! namespace, created when missing (as the CA's Secret is, [`crate::certs`]) and never
//! read or changed afterwards by the operator. Every agent reads it (RBAC: `get` on that
//! one Secret) and signs the state files it saves with it; a restore accepts only a
//! file signed with it (docs/design.md, "State files"). Replacing the Secret makes
//! every file saved before unrestorable.

use std::collections::BTreeMap;

use ferry_crds::tls::{STATE_KEY_KEY, STATE_KEY_NAME};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use ring::rand::{SecureRandom, SystemRandom};
use tracing::info;

#[derive(Debug, thiserror::Error)]
pub enum StateKeyError {
    #[error("Kubernetes API, creating Secret {STATE_KEY_NAME}: {0}")]
    Kube(#[from] kube::Error),
    #[error("no randomness for the state key")]
    Random,
}

/// The Secret holding `key`.
pub fn secret(key: [u8; 32]) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(STATE_KEY_NAME.into()),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        immutable: Some(true),
        data: Some(BTreeMap::from([(
            STATE_KEY_KEY.into(),
            ByteString(key.to_vec()),
        )])),
        ..Default::default()
    }
}

/// Creates the state key's Secret in `namespace` unless it exists. The operator may
/// only create Secrets (not read this one): an existing Secret answers 409.
pub async fn ensure(client: &Client, namespace: &str) -> Result<(), StateKeyError> {
    let mut key = [0u8; 32];
    SystemRandom::new()
        .fill(&mut key)
        .map_err(|_| StateKeyError::Random)?;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    match secrets.create(&PostParams::default(), &secret(key)).await {
        Ok(_) => {
            info!(namespace, "created the state key (Secret {STATE_KEY_NAME})");
            Ok(())
        }
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_secret_holds_the_key_under_its_data_key_and_is_immutable() {
        let s = secret([9; 32]);
        assert_eq!(s.metadata.name.as_deref(), Some("ferry-state-key"));
        assert_eq!(s.immutable, Some(true));
        assert_eq!(s.data.unwrap()["key"].0, vec![9; 32]);
    }
}
