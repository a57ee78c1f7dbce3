//! The message types the REST surface can render inside `Any`.
//!
//! The pool starts with the embedded descriptor set (the Operations API, the
//! google.rpc error details, the well-known types) and grows with the
//! descriptor sets that workers register (`Workers.RegisterTypes`) or that
//! `--descriptor-set` loads. gRPC never needs it: it passes `Any` bytes through.
//!
//! The pool sits behind a `std::sync::RwLock`: readers clone the current
//! pool (a reference-count bump) and release the lock at once; a writer
//! extends a copy and swaps it in, so a rejected set changes nothing.

use std::sync::{Arc, RwLock};

use prost_reflect::DescriptorPool;
use prost_types::FileDescriptorSet;

use crate::{error::Error, pb::FILE_DESCRIPTOR_SET};

/// The shared, growing descriptor pool. Cloning it is shallow.
#[derive(Clone)]
pub struct TypeRegistry {
    pool: Arc<RwLock<DescriptorPool>>,
}

impl Default for TypeRegistry {
    fn default() -> Self {
        Self::new()
    }
}

impl TypeRegistry {
    /// The embedded types only.
    pub fn new() -> Self {
        Self {
            pool: Arc::new(RwLock::new(base_pool())),
        }
    }

    /// The current pool.
    pub fn pool(&self) -> DescriptorPool {
        self.pool.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Adds the files of `set`; returns the full names of the message types it
    /// defines. Files already known are skipped. A set that does not resolve
    /// (missing imports, conflicting definitions) → INVALID_ARGUMENT.
    pub fn register(&self, set: FileDescriptorSet) -> Result<Vec<String>, Error> {
        let names: Vec<String> = set.file.iter().map(|f| f.name().to_owned()).collect();
        let mut guard = self.pool.write().unwrap_or_else(|p| p.into_inner());
        let mut next = guard.clone();
        next.add_file_descriptor_set(set).map_err(|e| {
            Error::invalid(
                "descriptor_set",
                format!("the descriptor set does not resolve: {e}"),
            )
        })?;
        let types = names
            .iter()
            .filter_map(|name| next.get_file_by_name(name))
            .flat_map(|file| file.messages().collect::<Vec<_>>())
            .map(|m| m.full_name().to_owned())
            .collect();
        *guard = next;
        Ok(types)
    }

    /// Adds an encoded `FileDescriptorSet` (`protoc --descriptor_set_out`,
    /// `buf build -o`), as `--descriptor-set FILE` does.
    pub fn register_encoded(&self, bytes: &[u8]) -> Result<Vec<String>, Error> {
        let set: FileDescriptorSet = prost::Message::decode(bytes).map_err(|e| {
            Error::invalid(
                "descriptor_set",
                format!("not an encoded FileDescriptorSet: {e}"),
            )
        })?;
        self.register(set)
    }
}

/// The embedded descriptor set, decoded once.
pub fn base_pool() -> DescriptorPool {
    static POOL: std::sync::OnceLock<DescriptorPool> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        DescriptorPool::decode(FILE_DESCRIPTOR_SET).expect("the embedded descriptor set is valid")
    })
    .clone()
}

#[cfg(test)]
mod tests {
    use prost_types::{DescriptorProto, FieldDescriptorProto, FileDescriptorProto};

    use super::*;

    fn acme(field_type: Option<&str>) -> FileDescriptorSet {
        let field = FieldDescriptorProto {
            name: Some("percent".into()),
            number: Some(1),
            r#type: Some(5), // int32
            type_name: field_type.map(str::to_owned),
            ..Default::default()
        };
        FileDescriptorSet {
            file: vec![FileDescriptorProto {
                name: Some("acme/progress.proto".into()),
                package: Some("acme".into()),
                message_type: vec![DescriptorProto {
                    name: Some("Progress".into()),
                    field: vec![field],
                    ..Default::default()
                }],
                syntax: Some("proto3".into()),
                ..Default::default()
            }],
        }
    }

    #[test]
    fn registered_types_join_the_pool() {
        let types = TypeRegistry::new();
        assert!(types.pool().get_message_by_name("acme.Progress").is_none());
        assert_eq!(types.register(acme(None)).unwrap(), ["acme.Progress"]);
        assert!(types.pool().get_message_by_name("acme.Progress").is_some());
        // Registering the same file again is harmless.
        types.register(acme(None)).unwrap();
        assert!(types
            .pool()
            .get_message_by_name("google.rpc.ErrorInfo")
            .is_some());
    }

    #[test]
    fn unresolvable_sets_are_invalid_and_change_nothing() {
        let types = TypeRegistry::new();
        let mut broken = acme(None);
        broken.file[0].message_type[0].field[0].r#type = Some(11); // message
        broken.file[0].message_type[0].field[0].type_name = Some(".acme.Missing".into());
        assert!(matches!(
            types.register(broken),
            Err(Error::InvalidArgument { .. })
        ));
        assert!(types.pool().get_message_by_name("acme.Progress").is_none());
        assert!(types.register_encoded(b"\xff\xff").is_err());
    }
}
