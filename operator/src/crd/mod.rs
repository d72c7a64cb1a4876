//! The `flatwire.io/v1alpha1` custom resources and their CRD YAML.

mod member;
mod network;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

pub use member::{NetworkMember, NetworkMemberSpec, NetworkMemberStatus};
pub use network::{
    CapabilityDefinition, Dns, IpPool, Network, NetworkMode, NetworkSpec, NetworkStatus, Route,
    TagDefinition, V4AssignMode, V6AssignMode,
};

/// The first lines of every generated CRD file.
const HEADER: &str = "# Generated from operator/src/crd by `cargo xtask crds`; do not edit.\n";

/// Why a CRD could not be rendered.
#[derive(Debug, thiserror::Error)]
pub enum CrdError {
    /// Serializing to YAML failed.
    #[error("rendering CRD {name} as YAML: {source}")]
    Yaml {
        /// The CRD's name.
        name: String,
        /// The serializer's error.
        source: serde_norway::Error,
    },
    /// No flatwire CRD has that name.
    #[error("no CRD named {0:?} (known: networks.flatwire.io, networkmembers.flatwire.io)")]
    Unknown(String),
}

/// Every flatwire CRD, in a fixed order.
pub fn all() -> Vec<CustomResourceDefinition> {
    vec![Network::crd(), NetworkMember::crd()]
}

/// The CRD's name (`<plural>.<group>`); its file in `crds/` is `<name>.yaml`.
pub fn name(crd: &CustomResourceDefinition) -> &str {
    crd.metadata.name.as_deref().unwrap_or_default()
}

/// The CRD as the YAML checked into `crds/`: a header comment, then one document.
pub fn to_yaml(crd: &CustomResourceDefinition) -> Result<String, CrdError> {
    let body = serde_norway::to_string(crd).map_err(|source| CrdError::Yaml {
        name: name(crd).to_owned(),
        source,
    })?;
    Ok(format!("{HEADER}{body}"))
}

/// The YAML of the CRD called `crd_name` (e.g. `networks.flatwire.io`).
pub fn yaml_of(crd_name: &str) -> Result<String, CrdError> {
    let crd = all()
        .into_iter()
        .find(|c| name(c) == crd_name)
        .ok_or_else(|| CrdError::Unknown(crd_name.to_owned()))?;
    to_yaml(&crd)
}
