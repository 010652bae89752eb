//! Tasks and their label encoders.
//!
//! The encoders are the reference's, with its silent fallbacks removed on purpose: a missing or
//! unrecognised gender is an error naming the row (the reference maps it to male), and "FALSE"
//! is not female (the reference's `startswith("F")` says it is).

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskKind {
    Classification,
    Regression,
}

/// A task as compiled into a trainer.
#[derive(Debug, Clone, Copy)]
pub struct TaskSpec {
    pub name: &'static str,
    pub kind: TaskKind,
    /// Head width: number of classes, or 1 for regression.
    pub outputs: usize,
    /// Metadata column the label comes from.
    pub column: &'static str,
    /// gender | health | emotion | bool | handedness | int | float
    pub encoder: &'static str,
}

/// Encode one metadata value; classification labels come back as the class index. An encoder
/// ending in `?` (`gender?`, `health?`, `float?`: what diffusion conditioning reads) takes an
/// empty value as unknown (NaN) instead of an error.
pub fn encode(task: &TaskSpec, raw: &str) -> Result<f32, String> {
    let v = raw.trim();
    if let Some(base) = task.encoder.strip_suffix('?') {
        if v.is_empty() {
            return Ok(f32::NAN);
        }
        return encode(
            &TaskSpec {
                encoder: base,
                ..*task
            },
            v,
        );
    }
    let up = v.to_uppercase();
    let class = |i: usize| Ok(i as f32);
    match task.encoder {
        "gender" => match up.as_str() {
            "F" | "FEMALE" | "W" | "WOMAN" => class(1),
            "M" | "MALE" | "MAN" => class(0),
            _ => Err(format!("gender `{v}` is neither M/male nor F/female")),
        },
        "health" => match up.as_str() {
            "H" | "HEALTHY" | "HC" | "CONTROL" | "0" | "FALSE" => class(0),
            "PD" | "PARKINSONS" | "EP" | "EPILEPSY" | "1" | "TRUE" => class(1),
            _ => Err(format!(
                "health `{v}` is neither H/healthy nor PD/parkinsons or EP/epilepsy"
            )),
        },
        "emotion" => match up.as_str() {
            "DISGUST" => class(0),
            "FEAR" => class(1),
            "SAD" => class(2),
            "NEUTRAL" => class(3),
            "HAPPY" => class(4),
            _ => int_class(v, task.outputs),
        },
        "bool" => match up.as_str() {
            "TRUE" | "1" | "YES" => class(1),
            "FALSE" | "0" | "NO" => class(0),
            _ => Err(format!("`{v}` is not a boolean")),
        },
        "handedness" => match up.as_str() {
            "R" | "RIGHT" => class(0),
            "L" | "LEFT" => class(1),
            _ => Err(format!("handedness `{v}` is neither R nor L")),
        },
        "int" => int_class(v, task.outputs),
        _ => match v.parse::<f32>() {
            Ok(x) if x.is_finite() => Ok(x),
            _ => Err(format!("`{v}` is not a number")),
        },
    }
}

fn int_class(v: &str, n: usize) -> Result<f32, String> {
    match v.parse::<usize>() {
        Ok(i) if i < n => Ok(i as f32),
        _ => Err(format!("`{v}` is not a class index in 0..{n}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(encoder: &'static str, outputs: usize) -> TaskSpec {
        TaskSpec {
            name: "t",
            kind: TaskKind::Classification,
            outputs,
            column: "c",
            encoder,
        }
    }

    #[test]
    fn gender_is_strict() {
        assert_eq!(encode(&spec("gender", 2), "F"), Ok(1.0));
        assert_eq!(encode(&spec("gender", 2), " male"), Ok(0.0));
        assert!(encode(&spec("gender", 2), "FALSE").is_err());
        assert!(encode(&spec("gender", 2), "").is_err());
    }

    #[test]
    fn optional_encoders_read_empty_as_unknown() {
        assert!(encode(&spec("gender?", 2), " ").unwrap().is_nan());
        assert_eq!(encode(&spec("health?", 2), "PD"), Ok(1.0));
        assert!(encode(&spec("gender?", 2), "X").is_err());
    }

    #[test]
    fn int_classes_are_range_checked() {
        assert_eq!(encode(&spec("int", 4), "3"), Ok(3.0));
        assert!(encode(&spec("int", 4), "4").is_err());
        assert_eq!(encode(&spec("emotion", 5), "happy"), Ok(4.0));
    }
}
