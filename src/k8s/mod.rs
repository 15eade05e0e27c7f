//! What sandwarden defines and names on Kubernetes: the custom resources (`crd`), the label keys
//! and names (`labels`), and warm-pool members as claimers and the controller see them
//! (`member`). The controller and the Kubernetes runtime both build on these; neither depends on
//! the other.

pub mod crd;
pub mod labels;
pub mod member;
