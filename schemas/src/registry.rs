//! The schema registry: every event type and schema version, compiled once.

use std::collections::HashMap;
use std::sync::LazyLock;

use serde_json::Value;

/// A payload does not fit its schema, or has none.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// No schema is registered for this type and version.
    #[error("no schema for event type {event_type} version {schema_version}")]
    Unknown {
        /// The type asked for.
        event_type: String,
        /// The version asked for.
        schema_version: u32,
    },
    /// The payload breaks its schema.
    #[error("{event_type} v{schema_version} does not match its schema: {problems}")]
    Invalid {
        /// The type.
        event_type: String,
        /// The version.
        schema_version: u32,
        /// What is wrong, as `path: message` pairs.
        problems: String,
    },
    /// An old version has no upcaster to the next one.
    #[error("no upcaster for event type {event_type} from version {schema_version}")]
    NoUpcaster {
        /// The type.
        event_type: String,
        /// The version it is stuck at.
        schema_version: u32,
    },
    /// The event does not serialize as `{"type": .., "data": {..}}`, or the payload does not
    /// deserialize into the domain type although it matched its schema.
    #[error("event does not map to its wire form: {0}")]
    Shape(String),
}

/// A schema file, as shipped in `schemas/events/`.
#[derive(Clone, Copy, Debug)]
pub struct SchemaSource {
    /// The event type, as written in the `type` tag.
    pub event_type: &'static str,
    /// The schema version.
    pub schema_version: u32,
    /// The JSON Schema text.
    pub text: &'static str,
}

/// Turns a payload of one schema version into the next version.
#[derive(Clone, Copy, Debug)]
pub struct Upcaster {
    /// The event type.
    pub event_type: &'static str,
    /// The version it reads; it writes `from_version + 1`.
    pub from_version: u32,
    /// The conversion.
    pub upcast: fn(Value) -> Value,
}

macro_rules! event_schemas {
    ($($name:literal v $version:literal),* $(,)?) => {
        /// Every event schema this build knows, one per type and version.
        pub const EVENT_SCHEMAS: &[SchemaSource] = &[$(
            SchemaSource {
                event_type: $name,
                schema_version: $version,
                text: include_str!(concat!("../events/", $name, ".v", stringify!($version), ".json")),
            },
        )*];
    };
}

event_schemas!(
    "UserRegistered" v 1,
    "StoreCreated" v 1,
    "CampaignCreated" v 1,
    "CampaignCreated" v 2,
    "StockReplenished" v 1,
    "CampaignClosed" v 1,
    "StockMoved" v 1,
    "StockTransferredOut" v 1,
    "StockTransferredIn" v 1,
    "StockReserved" v 1,
    "StockReleased" v 1,
    "StockSold" v 1,
    "UnitsReserved" v 1,
    "UnitsReleased" v 1,
    "UnitsSold" v 1,
    "OrderPlaced" v 1,
    "OrderRejected" v 1,
    "OrderAwaitingPayment" v 1,
    "OrderConfirmed" v 1,
    "OrderCancelled" v 1,
    "PaymentRequested" v 1,
    "PaymentSucceeded" v 1,
    "PaymentFailed" v 1,
    "PaymentTimedOut" v 1,
    "PaymentRefunded" v 1,
    "OrderSagaStepTaken" v 1,
    "OrderSagaAdvanced" v 1,
);

/// Upcasters for every schema version that is no longer the current one. When an event's
/// payload changes shape, its new schema gets a new version file and an entry here; old
/// events in the log stay readable without being rewritten.
pub const UPCASTERS: &[Upcaster] = &[Upcaster {
    event_type: "CampaignCreated",
    from_version: 1,
    upcast: campaign_created_in_one_bucket,
}];

/// CampaignCreated v1 predates stock buckets: such a campaign keeps its stock in one bucket.
fn campaign_created_in_one_bucket(mut data: Value) -> Value {
    if let Value::Object(fields) = &mut data {
        fields.insert("stock_buckets".into(), Value::from(1));
    }
    data
}

/// The schema of the event envelope.
pub const ENVELOPE_SCHEMA: &str = include_str!("../envelope.v1.json");

/// Compiled schemas and upcasters.
pub struct Registry {
    validators: HashMap<(String, u32), jsonschema::Validator>,
    current: HashMap<String, u32>,
    upcasters: HashMap<(String, u32), fn(Value) -> Value>,
    envelope: jsonschema::Validator,
}

static GLOBAL: LazyLock<Registry> = LazyLock::new(|| {
    Registry::new(EVENT_SCHEMAS, UPCASTERS).expect("the schemas shipped in this build compile")
});

impl Registry {
    /// The registry of this build's schemas.
    pub fn global() -> &'static Registry {
        &GLOBAL
    }

    /// Compiles a set of schemas. Fails on a schema that is not valid JSON Schema.
    pub fn new(sources: &[SchemaSource], upcasters: &[Upcaster]) -> Result<Registry, String> {
        let mut validators = HashMap::new();
        let mut current: HashMap<String, u32> = HashMap::new();
        for source in sources {
            let key = (source.event_type.to_owned(), source.schema_version);
            let validator = compile(source.text)
                .map_err(|e| format!("{} v{}: {e}", source.event_type, source.schema_version))?;
            validators.insert(key, validator);
            let latest = current.entry(source.event_type.to_owned()).or_insert(0);
            *latest = (*latest).max(source.schema_version);
        }
        let upcasters = upcasters
            .iter()
            .map(|u| ((u.event_type.to_owned(), u.from_version), u.upcast))
            .collect();
        let envelope = compile(ENVELOPE_SCHEMA).map_err(|e| format!("envelope: {e}"))?;
        Ok(Registry {
            validators,
            current,
            upcasters,
            envelope,
        })
    }

    /// The version new events of this type are written with.
    pub fn current_version(&self, event_type: &str) -> Result<u32, SchemaError> {
        self.current
            .get(event_type)
            .copied()
            .ok_or_else(|| SchemaError::Unknown {
                event_type: event_type.to_owned(),
                schema_version: 0,
            })
    }

    /// Checks a payload against the schema of its type and version.
    pub fn validate(
        &self,
        event_type: &str,
        schema_version: u32,
        data: &Value,
    ) -> Result<(), SchemaError> {
        let validator = self
            .validators
            .get(&(event_type.to_owned(), schema_version))
            .ok_or_else(|| SchemaError::Unknown {
                event_type: event_type.to_owned(),
                schema_version,
            })?;
        check(validator, data).map_err(|problems| SchemaError::Invalid {
            event_type: event_type.to_owned(),
            schema_version,
            problems,
        })
    }

    /// Checks a whole envelope (as it travels on the bus).
    pub fn validate_envelope(&self, envelope: &Value) -> Result<(), SchemaError> {
        check(&self.envelope, envelope).map_err(|problems| SchemaError::Invalid {
            event_type: "envelope".to_owned(),
            schema_version: 1,
            problems,
        })
    }

    /// Validates a stored payload at its version, brings it to the current version, and
    /// validates it again there. Returns the payload as current code reads it.
    pub fn upcast(
        &self,
        event_type: &str,
        schema_version: u32,
        data: Value,
    ) -> Result<Value, SchemaError> {
        self.validate(event_type, schema_version, &data)?;
        let current = self.current_version(event_type)?;
        let (mut version, mut data) = (schema_version, data);
        while version < current {
            let upcast = self
                .upcasters
                .get(&(event_type.to_owned(), version))
                .ok_or_else(|| SchemaError::NoUpcaster {
                    event_type: event_type.to_owned(),
                    schema_version: version,
                })?;
            data = upcast(data);
            version += 1;
        }
        if version != schema_version {
            self.validate(event_type, version, &data)?;
        }
        Ok(data)
    }
}

fn compile(text: &str) -> Result<jsonschema::Validator, String> {
    let schema: Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    jsonschema::options()
        .should_validate_formats(true)
        .build(&schema)
        .map_err(|e| e.to_string())
}

/// Every problem, `path: message`, joined; the first few are enough to act on.
fn check(validator: &jsonschema::Validator, value: &Value) -> Result<(), String> {
    const PROBLEMS_SHOWN_MAX: usize = 5;
    // Nearly every payload is valid: a yes-or-no check stops at nothing and builds no error,
    // and only a payload that fails it is walked again for its problems.
    if validator.is_valid(value) {
        return Ok(());
    }
    let problems: Vec<String> = validator
        .iter_errors(value)
        .take(PROBLEMS_SHOWN_MAX)
        .map(|e| format!("{}: {}", e.instance_path(), e))
        .collect();
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const DEMO_V1: &str = r#"{"type":"object","additionalProperties":false,"required":["litres"],
        "properties":{"litres":{"type":"integer"}}}"#;
    const DEMO_V2: &str = r#"{"type":"object","additionalProperties":false,"required":["millilitres"],
        "properties":{"millilitres":{"type":"integer"}}}"#;

    fn demo_registry(upcasters: &[Upcaster]) -> Registry {
        let sources = [
            SchemaSource {
                event_type: "Demo",
                schema_version: 1,
                text: DEMO_V1,
            },
            SchemaSource {
                event_type: "Demo",
                schema_version: 2,
                text: DEMO_V2,
            },
        ];
        Registry::new(&sources, upcasters).unwrap()
    }

    fn litres_to_millilitres(v: Value) -> Value {
        json!({ "millilitres": v["litres"].as_i64().unwrap() * 1000 })
    }

    #[test]
    fn an_old_version_is_upcast_through_each_step_to_the_current_one() {
        let registry = demo_registry(&[Upcaster {
            event_type: "Demo",
            from_version: 1,
            upcast: litres_to_millilitres,
        }]);
        assert_eq!(registry.current_version("Demo").unwrap(), 2);
        let data = registry.upcast("Demo", 1, json!({"litres": 3})).unwrap();
        assert_eq!(data, json!({"millilitres": 3000}));
    }

    #[test]
    fn an_old_version_without_an_upcaster_is_an_error_not_a_guess() {
        let registry = demo_registry(&[]);
        let error = registry
            .upcast("Demo", 1, json!({"litres": 3}))
            .unwrap_err();
        assert!(
            matches!(
                error,
                SchemaError::NoUpcaster {
                    schema_version: 1,
                    ..
                }
            ),
            "{error}"
        );
    }

    #[test]
    fn a_stored_payload_that_breaks_its_own_version_is_refused_before_upcasting() {
        let registry = demo_registry(&[Upcaster {
            event_type: "Demo",
            from_version: 1,
            upcast: litres_to_millilitres,
        }]);
        let error = registry
            .upcast("Demo", 1, json!({"litres": "three"}))
            .unwrap_err();
        assert!(
            matches!(
                error,
                SchemaError::Invalid {
                    schema_version: 1,
                    ..
                }
            ),
            "{error}"
        );
    }

    #[test]
    fn every_shipped_schema_compiles_and_every_old_version_has_an_upcaster() {
        let registry = Registry::global();
        for source in EVENT_SCHEMAS {
            let current = registry.current_version(source.event_type).unwrap();
            for version in source.schema_version..current {
                assert!(
                    UPCASTERS
                        .iter()
                        .any(|u| u.event_type == source.event_type && u.from_version == version),
                    "{} v{version} has no upcaster",
                    source.event_type
                );
            }
        }
    }
}
