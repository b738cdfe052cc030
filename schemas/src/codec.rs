//! Domain events to wire JSON and back, validated both ways.
//!
//! Domain event enums serialize adjacently tagged: `{"type": "StockReserved", "data": {..}}`.
//! The log stores the tag and the payload in separate columns, so encoding splits them and
//! decoding puts them back together, after upcasting and validating the payload.

use serde::de::value::MapDeserializer;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::registry::{Registry, SchemaError};

/// An event ready to be appended: type, current schema version, validated payload.
#[derive(Clone, Debug, PartialEq)]
pub struct EncodedEvent {
    /// The event type.
    pub event_type: String,
    /// The schema version the payload follows.
    pub schema_version: u32,
    /// The payload.
    pub data: Value,
}

/// Encodes a domain event and validates it against its current schema.
pub fn encode<E: Serialize>(event: &E) -> Result<EncodedEvent, SchemaError> {
    let tagged = serde_json::to_value(event).map_err(|e| SchemaError::Shape(e.to_string()))?;
    let Value::Object(mut tagged) = tagged else {
        return Err(SchemaError::Shape(
            "an event serializes as an object".into(),
        ));
    };
    let (Some(Value::String(event_type)), Some(data)) =
        (tagged.remove("type"), tagged.remove("data"))
    else {
        return Err(SchemaError::Shape(
            "an event has a string `type` and a `data` payload".into(),
        ));
    };
    let registry = Registry::global();
    let schema_version = registry.current_version(&event_type)?;
    registry.validate(&event_type, schema_version, &data)?;
    Ok(EncodedEvent {
        event_type,
        schema_version,
        data,
    })
}

/// Decodes a stored payload into a domain event: validates it at its version, upcasts it to
/// the current one, and deserializes it.
pub fn decode<E: DeserializeOwned>(
    event_type: &str,
    schema_version: u32,
    data: Value,
) -> Result<E, SchemaError> {
    let data = Registry::global().upcast(event_type, schema_version, data)?;
    let mut tagged = Map::with_capacity(2);
    tagged.insert("type".into(), Value::String(event_type.to_owned()));
    tagged.insert("data".into(), data);
    serde_json::from_value(Value::Object(tagged))
        .map_err(|e| SchemaError::Shape(format!("{event_type}: {e}")))
}

/// Decodes an event read back from the log. The log validated and upcast its payload on the
/// way out, so this only puts the tag back and deserializes.
pub fn from_envelope<E: DeserializeOwned>(envelope: &crate::Envelope) -> Result<E, SchemaError> {
    // The tagged pair, read in place: a consumer decodes every event it wants, and copying
    // the payload first was a tree of allocations each time.
    let tag = Value::String(envelope.event_type.clone());
    let tagged = [("type", &tag), ("data", &envelope.data)];
    let pair = MapDeserializer::<_, serde_json::Error>::new(tagged.into_iter());
    E::deserialize(pair).map_err(|e| {
        SchemaError::Shape(format!(
            "{} at {}: {e}",
            envelope.event_type, envelope.global_position
        ))
    })
}
