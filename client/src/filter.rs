//! Server-side message filters of a subscription.

use raftmq_proto::rocketmq as pb;

/// Which messages of a topic a consumer wants; evaluated by the broker.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Filter {
    /// Tag expression: `*` (every message), one tag, or tags joined with
    /// `||` (`"a || b"`).
    Tag(String),
    /// SQL92 expression over the message's user properties (`"a > 3"`).
    Sql(String),
}

impl Default for Filter {
    /// Every message (`Tag("*")`).
    fn default() -> Self {
        Filter::Tag("*".into())
    }
}

impl Filter {
    /// Every message.
    pub fn all() -> Self {
        Self::default()
    }

    /// The filter as the protocol's `FilterExpression`.
    pub fn to_pb(&self) -> pb::FilterExpression {
        match self {
            Filter::Tag(e) => pb::FilterExpression {
                r#type: pb::FilterType::Tag as i32,
                expression: if e.trim().is_empty() { "*".into() } else { e.clone() },
            },
            Filter::Sql(e) => pb::FilterExpression { r#type: pb::FilterType::Sql as i32, expression: e.clone() },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_to_pb() {
        assert_eq!(Filter::all().to_pb(), pb::FilterExpression { r#type: 1, expression: "*".into() });
        assert_eq!(Filter::Tag(" ".into()).to_pb().expression, "*");
        assert_eq!(Filter::Tag("a || b".into()).to_pb().expression, "a || b");
        assert_eq!(Filter::Sql("a > 3".into()).to_pb(), pb::FilterExpression { r#type: 2, expression: "a > 3".into() });
    }
}
