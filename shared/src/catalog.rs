//! The model catalog: which models the cluster serves, at what price, and on how
//! many nodes.
//!
//! A catalog starts as a JSON file (see `shared/catalog/default.json`, which is
//! also the built-in default). The file only seeds the ledger's model table when
//! that table is empty. From then on the ledger is the source: every role reloads
//! it periodically into its [`SharedCatalog`], and operators change prices there.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};

use crate::ids::ModelId;
use crate::money::{MicroUsd, Prices};

const DEFAULT_CATALOG: &str = include_str!("../catalog/default.json");

/// One model in the catalog.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelEntry {
    pub id: ModelId,
    /// Micro-USD per million prompt tokens.
    pub input_per_mtok: i64,
    /// Micro-USD per million completion tokens.
    pub output_per_mtok: i64,
    /// Smallest charge, in micro-USD, for a request that is charged at all.
    #[serde(default)]
    pub min_charge: i64,
    /// Completion limit used when a request sets neither `max_tokens` nor
    /// `max_completion_tokens`; it also sizes the hold.
    #[serde(default = "default_max_tokens")]
    pub default_max_tokens: u32,
    /// Number of nodes that host the model's providers.
    #[serde(default = "default_replicas")]
    pub replicas: u32,
    #[serde(default = "default_enabled")]
    pub enabled: bool,
    /// Expected weight hash; a provider reporting a different one is not offered
    /// the model.
    #[serde(default)]
    pub weight_hash: Option<String>,
}

fn default_max_tokens() -> u32 {
    8192
}

fn default_replicas() -> u32 {
    1
}

fn default_enabled() -> bool {
    true
}

impl ModelEntry {
    pub fn prices(&self) -> Prices {
        Prices {
            input_per_mtok: MicroUsd::new(self.input_per_mtok),
            output_per_mtok: MicroUsd::new(self.output_per_mtok),
            min_charge: MicroUsd::new(self.min_charge),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("failed to read catalog file {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("catalog is not valid JSON")]
    Parse(#[from] serde_json::Error),
    #[error("catalog field `{field}` is invalid for model `{model}`: {reason}")]
    InvalidModel {
        model: String,
        field: &'static str,
        reason: &'static str,
    },
    #[error("catalog lists model `{0}` twice")]
    Duplicate(String),
    #[error("catalog field `platform_fee_bps` must be at most 10000")]
    InvalidFee,
}

#[derive(Deserialize)]
struct CatalogFile {
    #[serde(default = "default_fee_bps")]
    platform_fee_bps: u32,
    models: Vec<ModelEntry>,
}

fn default_fee_bps() -> u32 {
    500
}

/// The enabled and disabled models, looked up by id.
#[derive(Clone, Debug)]
pub struct Catalog {
    models: BTreeMap<ModelId, ModelEntry>,
    platform_fee_bps: u32,
}

impl Catalog {
    /// Returns the built-in catalog.
    pub fn builtin() -> Self {
        Self::from_json(DEFAULT_CATALOG).expect("the built-in catalog is valid")
    }

    pub fn load(path: &Path) -> Result<Self, CatalogError> {
        let text = std::fs::read_to_string(path).map_err(|source| CatalogError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_json(&text)
    }

    pub fn from_json(text: &str) -> Result<Self, CatalogError> {
        let file: CatalogFile = serde_json::from_str(text)?;
        Self::from_entries(file.models, file.platform_fee_bps)
    }

    /// Builds a catalog from entries, validating each.
    pub fn from_entries(
        entries: Vec<ModelEntry>,
        platform_fee_bps: u32,
    ) -> Result<Self, CatalogError> {
        if platform_fee_bps > 10_000 {
            return Err(CatalogError::InvalidFee);
        }

        let mut models = BTreeMap::new();
        for entry in entries {
            validate_entry(&entry)?;
            let id = entry.id.clone();
            if models.insert(id.clone(), entry).is_some() {
                return Err(CatalogError::Duplicate(id.to_string()));
            }
        }

        Ok(Self {
            models,
            platform_fee_bps,
        })
    }

    /// Every model, enabled or not, in id order.
    pub fn entries(&self) -> impl Iterator<Item = &ModelEntry> {
        self.models.values()
    }

    /// Returns the model if it is in the catalog and enabled.
    pub fn get(&self, id: &str) -> Option<&ModelEntry> {
        self.models
            .get(&ModelId::from(id))
            .filter(|entry| entry.enabled)
    }

    /// Returns the enabled models in id order.
    pub fn enabled(&self) -> impl Iterator<Item = &ModelEntry> {
        self.models.values().filter(|entry| entry.enabled)
    }

    /// Platform fee in basis points of each settled cost.
    pub fn platform_fee_bps(&self) -> u32 {
        self.platform_fee_bps
    }
}

/// The catalog a role uses now. Readers take a snapshot; a refresh swaps in a new
/// catalog without blocking them for longer than a pointer copy.
#[derive(Debug)]
pub struct SharedCatalog {
    current: RwLock<Arc<Catalog>>,
}

impl SharedCatalog {
    pub fn new(catalog: Catalog) -> Self {
        Self {
            current: RwLock::new(Arc::new(catalog)),
        }
    }

    /// Returns the current catalog.
    pub fn snapshot(&self) -> Arc<Catalog> {
        // Replacing the Arc cannot leave it half-written, so a poisoned lock
        // still holds a valid catalog.
        self.current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Returns an enabled model of the current catalog.
    pub fn get(&self, id: &str) -> Option<ModelEntry> {
        self.snapshot().get(id).cloned()
    }

    pub fn platform_fee_bps(&self) -> u32 {
        self.snapshot().platform_fee_bps()
    }

    pub fn replace(&self, catalog: Catalog) {
        *self
            .current
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(catalog);
    }
}

/// Checks one entry; operators' price updates go through the same rules.
pub fn validate_entry(entry: &ModelEntry) -> Result<(), CatalogError> {
    let invalid = |field, reason| CatalogError::InvalidModel {
        model: entry.id.to_string(),
        field,
        reason,
    };

    if entry.id.as_str().is_empty() {
        return Err(invalid("id", "must not be empty"));
    }
    if entry.input_per_mtok < 0 {
        return Err(invalid("input_per_mtok", "must not be negative"));
    }
    if entry.output_per_mtok < 0 {
        return Err(invalid("output_per_mtok", "must not be negative"));
    }
    if entry.min_charge < 0 {
        return Err(invalid("min_charge", "must not be negative"));
    }
    if entry.default_max_tokens == 0 {
        return Err(invalid("default_max_tokens", "must be at least 1"));
    }
    if entry.replicas == 0 {
        return Err(invalid("replicas", "must be at least 1"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_catalog_has_enabled_models() {
        let catalog = Catalog::builtin();
        let model = catalog.get("mlx-community/Trinity-Mini-8bit").unwrap();
        assert_eq!(model.input_per_mtok, 23_000);
        assert_eq!(model.replicas, 1);
        assert!(catalog.enabled().count() >= 3);
        assert_eq!(catalog.platform_fee_bps(), 500);
    }

    #[test]
    fn disabled_model_is_not_served() {
        let catalog = Catalog::from_json(
            r#"{"models":[{"id":"a","input_per_mtok":1,"output_per_mtok":1,"enabled":false}]}"#,
        )
        .unwrap();
        assert!(catalog.get("a").is_none());
    }

    #[test]
    fn invalid_entry_names_field() {
        let error = Catalog::from_json(
            r#"{"models":[{"id":"a","input_per_mtok":1,"output_per_mtok":1,"replicas":0}]}"#,
        )
        .unwrap_err();
        assert!(error.to_string().contains("`replicas`"), "{error}");
    }

    #[test]
    fn duplicate_model_is_rejected() {
        let error = Catalog::from_json(
            r#"{"models":[{"id":"a","input_per_mtok":1,"output_per_mtok":1},
                          {"id":"a","input_per_mtok":2,"output_per_mtok":2}]}"#,
        )
        .unwrap_err();
        assert!(matches!(error, CatalogError::Duplicate(_)));
    }
}
