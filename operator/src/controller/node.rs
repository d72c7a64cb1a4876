//! Nodes as network hosts: every Node whose agent registered its host identity (annotation
//! [`HOST_IDENTITY_ANNOTATION`]) becomes, on every Network, an authorized member with that
//! identity pinned, named `node/<nodename>`. Being an authorized member with a known identity
//! is what lets the node's vouches for its pods count (together with the pod bindings of
//! [`super::pod`], which place each pod on its node).
//!
//! The pure parts live here; [`super::pod::run`] writes the host members along with the
//! bindings.

use flatwire_vl1::Identity;
use k8s_openapi::api::core::v1::Node;
use kube::ResourceExt;

/// The Node annotation holding the node agent's public identity
/// (`<address>:0:<public key hex>`), written by the agent in Kubernetes mode.
pub const HOST_IDENTITY_ANNOTATION: &str = "flatwire.io/host-identity";

/// A node's agent as the controller should know it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeHost {
    /// The host identity's address (10 hex digits).
    pub address: String,
    /// The public identity string.
    pub identity: String,
}

/// The name of the host member of node `node`.
pub fn host_member_name(node: &str) -> String {
    format!("node/{node}")
}

/// Parses a host identity annotation: a public identity whose address really derives from its
/// key (the memory-hard check, a few milliseconds), reduced to its public form.
pub fn parse_host_identity(value: &str) -> Result<NodeHost, String> {
    let id: Identity = value
        .trim()
        .parse()
        .map_err(|e| format!("annotation {HOST_IDENTITY_ANNOTATION}: {e}"))?;
    if !id.locally_validate() {
        return Err(format!(
            "annotation {HOST_IDENTITY_ANNOTATION}: the address {} does not derive from the key",
            id.address()
        ));
    }
    Ok(NodeHost {
        address: id.address().to_string(),
        identity: id.to_public().to_string(),
    })
}

/// The annotation value of `node`, if it has one.
pub fn host_annotation(node: &Node) -> Option<&str> {
    node.annotations()
        .get(HOST_IDENTITY_ANNOTATION)
        .map(String::as_str)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use super::*;

    #[test]
    fn annotations_are_checked() {
        let id = Identity::generate(&AtomicBool::new(false)).unwrap();
        let h = parse_host_identity(&format!(" {id}\n")).unwrap();
        assert_eq!(h.address, id.address().to_string());
        assert_eq!(h.identity, id.to_string());
        // The secret form is accepted and reduced to the public one.
        let h = parse_host_identity(&id.to_secret_string().unwrap()).unwrap();
        assert!(!h.identity.contains(&id.to_secret_string().unwrap()[150..]));
        assert_eq!(h.identity, id.to_string());
        // Another address in front of the key does not derive from it.
        let other = Identity::generate(&AtomicBool::new(false)).unwrap();
        let forged =
            id.to_string()
                .replacen(&id.address().to_string(), &other.address().to_string(), 1);
        let e = parse_host_identity(&forged).unwrap_err();
        assert!(e.contains("does not derive"), "{e}");
        assert!(parse_host_identity("nonsense").is_err());
        assert_eq!(host_member_name("n1"), "node/n1");
    }
}
