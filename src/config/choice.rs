//! `Choice<T>`: a config key with a fixed set of values (the serde + clap enums `model` and `sink` define). It
//! lives apart from the sections because it is the one piece of deserialisation logic here: an unknown value is
//! kept, so validation can list it with every other problem instead of serde stopping at the first.

use std::fmt;

use serde::de::DeserializeOwned;
use serde::Deserialize;

/// A key with a fixed set of values (a serde enum). An unknown value is kept rather than failing the whole
/// file at deserialisation, so `validate` lists it with every other problem, naming the key and the values
/// allowed.
#[derive(Debug, Clone, PartialEq)]
pub enum Choice<T> {
    Known(T),
    /// The text given.
    Unknown(String),
}

impl<T: DeserializeOwned + clap::ValueEnum + Copy> Choice<T> {
    fn parse(text: &str) -> Choice<T> {
        let de = serde::de::value::StrDeserializer::<serde::de::value::Error>::new(text);
        T::deserialize(de).map_or_else(|_| Choice::Unknown(text.to_string()), Choice::Known)
    }

    /// The value, or the error `validate` reports for `key`: the value given and the ones allowed.
    pub fn get(&self, key: &str) -> Result<T, String> {
        match self {
            Choice::Known(v) => Ok(*v),
            Choice::Unknown(text) => Err(format!(
                "{key}: '{text}' is not one of {}",
                T::value_variants()
                    .iter()
                    .filter_map(|v| v.to_possible_value())
                    .map(|v| v.get_name().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
    }
}

impl<T: DeserializeOwned + clap::ValueEnum + Copy> From<&str> for Choice<T> {
    fn from(text: &str) -> Choice<T> {
        Choice::parse(text)
    }
}

impl<T: Default> Default for Choice<T> {
    fn default() -> Self {
        Choice::Known(T::default())
    }
}

impl<'de, T: DeserializeOwned + clap::ValueEnum + Copy> Deserialize<'de> for Choice<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Ok(Choice::parse(&text))
    }
}

impl<T: clap::ValueEnum> fmt::Display for Choice<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Choice::Known(v) => match v.to_possible_value() {
                Some(p) => f.write_str(p.get_name()),
                None => f.write_str("?"),
            },
            Choice::Unknown(text) => f.write_str(text),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{DeviceChoice, Precision};
    use crate::sink::overlay::OverlayFormat;

    #[test]
    fn choices_parse_their_names_and_name_the_allowed_values() {
        let device: Choice<DeviceChoice> = "tensorrt".into();
        assert_eq!(device, Choice::Known(DeviceChoice::TensorRt));
        assert_eq!(device.to_string(), "tensorrt");
        let overlay: Choice<OverlayFormat> = "jpg".into();
        assert_eq!(overlay.get("output.overlay"), Ok(OverlayFormat::Jpeg));
        let bad: Choice<Precision> = "fp8".into();
        assert_eq!(
            bad.get("model.precision"),
            Err("model.precision: 'fp8' is not one of fp32, fp16, int8, bf16, auto".to_string())
        );
        assert_eq!(bad.to_string(), "fp8");
    }
}
