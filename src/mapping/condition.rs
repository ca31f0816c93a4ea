//! CEL conditions shared by table rules and subscription filters: JSON to CEL value
//! conversion, one shared root context, and boolean evaluation whose errors are
//! classified without values (CEL error texts embed values, which must never be logged).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};

use cel::objects::{Key, Map};
use cel::{Context, ExecutionError, Program, Value};
use serde_json::Value as Json;

use crate::config::Columns;
use crate::source::decoder::Row;

/// The root context with CEL's standard functions, built once. Evaluations add their
/// variables in a child scope, so no function registry is rebuilt per row.
static ROOT: LazyLock<Context<'static>> = LazyLock::new(Context::default);

/// A fresh scope for one evaluation; add variables with `add_variable_from_value`.
pub(crate) fn scope() -> Context<'static> {
    ROOT.new_inner_scope()
}

/// Converts a JSON value to a CEL value (integers stay integers, objects become maps).
pub(crate) fn to_cel(value: &Json) -> Value {
    match value {
        Json::Null => Value::Null,
        Json::Bool(b) => Value::Bool(*b),
        Json::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::Int(i)
            } else if let Some(u) = n.as_u64() {
                Value::UInt(u)
            } else {
                Value::Float(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        Json::String(s) => Value::String(Arc::new(s.clone())),
        Json::Array(items) => Value::List(Arc::new(items.iter().map(to_cel).collect())),
        Json::Object(map) => row_to_cel(map, &Columns::All),
    }
}

/// Converts a row to a CEL map, leaving out the columns `columns` redacts.
pub(crate) fn row_to_cel(row: &Row, columns: &Columns) -> Value {
    let map = row
        .iter()
        .filter(|(name, _)| columns.allows(name))
        .map(|(name, value)| (Key::String(Arc::new(name.clone())), to_cel(value)))
        .collect();
    Value::Map(Map { map: Arc::new(map) })
}

/// A CEL string value.
pub(crate) fn string(s: &str) -> Value {
    Value::String(Arc::new(s.to_owned()))
}

/// A CEL list of strings.
pub(crate) fn string_list<'a>(items: impl IntoIterator<Item = &'a str>) -> Value {
    Value::List(Arc::new(items.into_iter().map(string).collect()))
}

/// Why a condition could not be decided. The kind names the failure class only,
/// never a value, so it is safe to log and to use as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EvalError {
    /// E.g. `no such key`, `values not comparable`, `result is not a bool`.
    pub kind: &'static str,
}

/// Runs `program` in `ctx`; only `true` and `false` are decisions.
pub(crate) fn eval_bool(program: &Program, ctx: &Context<'_>) -> Result<bool, EvalError> {
    match program.execute(ctx) {
        Ok(Value::Bool(b)) => Ok(b),
        Ok(_) => Err(EvalError {
            kind: "result is not a bool",
        }),
        Err(e) => Err(EvalError { kind: kind_of(&e) }),
    }
}

fn kind_of(e: &ExecutionError) -> &'static str {
    match e {
        ExecutionError::NoSuchKey(_) => "no such key",
        ExecutionError::NoSuchOverload => "no such overload",
        ExecutionError::ValuesNotComparable(..) => "values not comparable",
        ExecutionError::UnexpectedType { .. } => "unexpected type",
        ExecutionError::UndeclaredReference(_) => "undeclared reference",
        ExecutionError::UnsupportedBinaryOperator(..)
        | ExecutionError::UnsupportedUnaryOperator(..) => "unsupported operator",
        ExecutionError::UnsupportedIndex(..)
        | ExecutionError::UnsupportedMapIndex(_)
        | ExecutionError::UnsupportedListIndex(_)
        | ExecutionError::IndexOutOfBounds(_) => "bad index",
        ExecutionError::DivisionByZero(_) | ExecutionError::RemainderByZero(_) => {
            "division by zero"
        }
        ExecutionError::Overflow(..) => "overflow",
        ExecutionError::FunctionError { .. } => "function error",
        ExecutionError::InvalidArgumentCount { .. }
        | ExecutionError::UnsupportedTargetType { .. }
        | ExecutionError::NotSupportedAsMethod { .. }
        | ExecutionError::MissingArgumentOrTarget => "bad function call",
        _ => "evaluation error",
    }
}

/// Counts failures of one condition and says when one is worth a log line: the 1st,
/// 2nd, 4th, 8th ... failure, so a condition failing on every row cannot flood logs.
#[derive(Debug, Default)]
pub(crate) struct FailureCount(AtomicU64);

impl FailureCount {
    /// Records one failure; returns the total so far and whether to log it.
    pub(crate) fn record(&self) -> (u64, bool) {
        let n = self.0.fetch_add(1, Ordering::Relaxed) + 1;
        (n, n.is_power_of_two())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn eval(src: &str, vars: &[(&str, Json)]) -> Result<bool, EvalError> {
        let program = Program::compile(src).unwrap();
        let mut ctx = scope();
        for (name, value) in vars {
            ctx.add_variable_from_value(*name, to_cel(value));
        }
        eval_bool(&program, &ctx)
    }

    #[test]
    fn json_values_convert_to_their_cel_types() {
        let row =
            json!({"n": 7, "f": 1.5, "s": "x", "b": true, "z": null, "l": [1, "a"], "o": {"k": 2}});
        assert_eq!(
            eval(
                "r.n == 7 && r.f > 1.0 && r.s == 'x' && r.b && r.z == null && size(r.l) == 2 && r.o.k == 2",
                &[("r", row)]
            ),
            Ok(true)
        );
        assert_eq!(eval("u > 10u", &[("u", json!(u64::MAX))]), Ok(true));
    }

    #[test]
    fn errors_are_classified_without_values() {
        let err = eval("r.count > 5", &[("r", json!({"count": "secret-7"}))]).unwrap_err();
        assert!(!err.kind.contains("secret"), "{err:?}");
        assert_eq!(
            eval("r.nope == 1", &[("r", json!({}))]).unwrap_err().kind,
            "no such key"
        );
        assert_eq!(eval("1 + 1", &[]).unwrap_err().kind, "result is not a bool");
    }

    #[test]
    fn redacted_columns_are_left_out_of_cel_rows() {
        let row = json!({"id": 1, "secret": "s"});
        let Json::Object(row) = row else {
            unreachable!()
        };
        let Value::Map(m) = row_to_cel(&row, &Columns::Exclude(vec!["secret".into()])) else {
            panic!("not a map")
        };
        assert_eq!(m.map.len(), 1);
    }

    #[test]
    fn failures_are_logged_at_powers_of_two() {
        let c = FailureCount::default();
        let logged: Vec<u64> = (0..9)
            .filter_map(|_| match c.record() {
                (n, true) => Some(n),
                _ => None,
            })
            .collect();
        assert_eq!(logged, [1, 2, 4, 8]);
    }
}
