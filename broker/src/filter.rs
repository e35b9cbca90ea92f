//! Message filters of RocketMQ subscriptions: tag expressions and SQL92.
//!
//! A consumer subscribes to a topic with a filter expression and receives only
//! the messages it matches. RocketMQ 5 knows two kinds ([`FilterKind`]):
//!
//! - **Tag**: `*` (or an empty expression) matches every message; otherwise
//!   `a || b || c` matches a message whose tag is exactly one of the listed
//!   tags (case-sensitive). A message without tag matches only `*`. An
//!   expression naming no tag at all (such as `||`) is refused.
//! - **SQL92**: a boolean condition over the message's user properties, plus
//!   the property `TAGS` bound to the message's tag, e.g.
//!   `TAGS IN ('a', 'b') AND (price > 10.5 OR region IS NULL)`. Supported:
//!   `=`, `<>`, `!=`, `<`, `<=`, `>`, `>=`, `[NOT] BETWEEN x AND y`,
//!   `[NOT] IN (...)`, `IS [NOT] NULL`, `AND`, `OR`, `NOT`, parentheses,
//!   string literals (`'it''s'`), integer and decimal numbers, `TRUE`/`FALSE`.
//!   Keywords are case-insensitive.
//!
//! Property values are strings. Compared with a number (or by `<`, `>`,
//! `BETWEEN`), a value is read as a number; a missing property or a value that
//! is not a number makes the comparison UNKNOWN. Conditions are evaluated with
//! SQL's three-valued logic and a message matches only when the result is TRUE,
//! so neither `price > 5` nor `NOT (price > 5)` matches a message without
//! `price`; only `IS NULL` tests for absence.
//!
//! Parsing is bounded so that any input from a client is safe: expressions
//! longer than [`MAX_EXPRESSION_LEN`] bytes, nested deeper than [`MAX_DEPTH`]
//! or with `IN` lists longer than [`MAX_IN_ITEMS`] are refused with a
//! [`FilterError`], as is every malformed expression.

use std::cmp::Ordering;
use std::collections::HashMap;
use std::fmt;
use std::iter::Peekable;
use std::vec;

/// Longest filter expression accepted, in bytes.
pub const MAX_EXPRESSION_LEN: usize = 4096;
/// Deepest nesting of parentheses and `NOT`s in a SQL filter.
pub const MAX_DEPTH: usize = 64;
/// Most items in one `IN (...)` list.
pub const MAX_IN_ITEMS: usize = 512;

/// The SQL property bound to the message's tag.
const TAGS_PROPERTY: &str = "TAGS";
/// The tag expression that matches every message.
const ALL_TAGS: &str = "*";
/// The separator of tags in a tag expression.
const TAG_SEPARATOR: &str = "||";

/// The language of a filter expression.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FilterKind {
    /// `*` or `tagA || tagB`.
    Tag,
    /// A SQL92 condition over the message's properties.
    Sql,
}

/// Why a filter expression was refused. Positions are 0-based byte offsets
/// into the expression.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    #[error("filter expression is {len} bytes long, more than the limit of {max} bytes", max = MAX_EXPRESSION_LEN)]
    TooLong { len: usize },
    #[error("tag filter: expression {0:?} names no tag")]
    NoTag(String),
    #[error("SQL filter: empty expression")]
    EmptySql,
    #[error("SQL filter: {message} at {position}")]
    Syntax { message: String, position: usize },
    #[error("SQL filter: nested deeper than {max} levels at {position}", max = MAX_DEPTH)]
    TooDeep { position: usize },
    #[error("SQL filter: IN list longer than {max} items at {position}", max = MAX_IN_ITEMS)]
    TooManyItems { position: usize },
}

fn syntax(message: impl Into<String>, position: usize) -> FilterError {
    FilterError::Syntax { message: message.into(), position }
}

/// A parsed filter expression, ready to be matched against messages.
#[derive(Debug, Clone, PartialEq)]
pub struct Filter {
    rule: Rule,
}

#[derive(Debug, Clone, PartialEq)]
enum Rule {
    /// Every message.
    All,
    /// Messages with one of these tags (none empty).
    Tags(Vec<String>),
    /// Messages for which this condition is TRUE.
    Sql(Expr),
}

impl Filter {
    /// Parses `expression` as a filter of the given kind.
    ///
    /// # Errors
    ///
    /// A [`FilterError`] when the expression is too long, malformed, nested
    /// too deeply, or (tag filters) names no tag.
    pub fn parse(kind: FilterKind, expression: &str) -> Result<Filter, FilterError> {
        if expression.len() > MAX_EXPRESSION_LEN {
            return Err(FilterError::TooLong { len: expression.len() });
        }
        let rule = match kind {
            FilterKind::Tag => parse_tags(expression)?,
            FilterKind::Sql => Rule::Sql(parse_sql(expression)?),
        };
        Ok(Filter { rule })
    }

    /// Whether the filter lets every message through (tag expression `*` or empty).
    #[must_use]
    pub fn is_all(&self) -> bool {
        matches!(self.rule, Rule::All)
    }

    /// Whether a message with this tag (empty: no tag) and these user
    /// properties passes the filter.
    #[must_use]
    pub fn matches(&self, tag: &str, properties: &HashMap<String, String>) -> bool {
        match &self.rule {
            Rule::All => true,
            Rule::Tags(tags) => tags.iter().any(|wanted| wanted == tag),
            Rule::Sql(expr) => expr.eval(&Message { tag, properties }) == Some(true),
        }
    }
}

// ---------------------------------------------------------------------------
// Tag expressions

fn parse_tags(expression: &str) -> Result<Rule, FilterError> {
    let trimmed = expression.trim();
    if trimmed.is_empty() || trimmed == ALL_TAGS {
        return Ok(Rule::All);
    }
    let tags: Vec<String> =
        trimmed.split(TAG_SEPARATOR).map(str::trim).filter(|tag| !tag.is_empty()).map(str::to_owned).collect();
    if tags.is_empty() {
        return Err(FilterError::NoTag(expression.to_owned()));
    }
    Ok(Rule::Tags(tags))
}

// ---------------------------------------------------------------------------
// Values

/// A number of a SQL filter: integers stay exact, the rest is `f64`.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Number {
    Int(i64),
    Float(f64),
}

impl Number {
    /// Parses a whole string as a number (`12`, `-3`, `1.5`, `.5`, `2e10`);
    /// `None` for anything else, including `NaN` and `inf`.
    fn parse(text: &str) -> Option<Number> {
        if !is_number_syntax(text) {
            return None;
        }
        let integral = !text.contains(['.', 'e', 'E']);
        match text.parse::<i64>() {
            Ok(int) if integral => Some(Number::Int(int)),
            _ => text.parse::<f64>().ok().map(Number::Float),
        }
    }

    fn as_f64(self) -> f64 {
        match self {
            Number::Int(int) => int as f64,
            Number::Float(float) => float,
        }
    }

    fn compare(self, other: Number) -> Option<Ordering> {
        match (self, other) {
            (Number::Int(a), Number::Int(b)) => Some(a.cmp(&b)),
            (a, b) => a.as_f64().partial_cmp(&b.as_f64()),
        }
    }

    fn negate(self) -> Number {
        match self {
            Number::Int(int) => int.checked_neg().map_or(Number::Float(-(int as f64)), Number::Int),
            Number::Float(float) => Number::Float(-float),
        }
    }
}

impl fmt::Display for Number {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Number::Int(int) => write!(f, "{int}"),
            Number::Float(float) => write!(f, "{float}"),
        }
    }
}

/// `[+-] (digits [. digits] | . digits) [(e|E) [+-] digits]`.
fn is_number_syntax(text: &str) -> bool {
    let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    let body = text.strip_prefix(['+', '-']).unwrap_or(text);
    let (mantissa, exponent) = match body.split_once(['e', 'E']) {
        Some((mantissa, exponent)) => (mantissa, Some(exponent)),
        None => (body, None),
    };
    let (int_part, frac_part) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let mantissa_ok = all_digits(int_part) && all_digits(frac_part) && !(int_part.is_empty() && frac_part.is_empty());
    let exponent_ok = exponent.is_none_or(|exp| {
        let digits = exp.strip_prefix(['+', '-']).unwrap_or(exp);
        !digits.is_empty() && all_digits(digits)
    });
    mantissa_ok && exponent_ok
}

/// `true`/`false` in any case; anything else is not a boolean.
fn parse_bool(text: &str) -> Option<bool> {
    if text.eq_ignore_ascii_case("true") {
        Some(true)
    } else if text.eq_ignore_ascii_case("false") {
        Some(false)
    } else {
        None
    }
}

/// A literal written in the expression.
#[derive(Debug, Clone, PartialEq)]
enum Literal {
    Str(String),
    Num(Number),
    Bool(bool),
}

impl Literal {
    fn kind_name(&self) -> &'static str {
        match self {
            Literal::Str(_) => "a string",
            Literal::Num(_) => "a number",
            Literal::Bool(_) => "a boolean",
        }
    }
}

/// One side of a comparison.
#[derive(Debug, Clone, PartialEq)]
enum Operand {
    Property(String),
    Literal(Literal),
}

/// The value of an operand for one message; a missing property has none.
#[derive(Debug, Clone, Copy)]
enum Value<'a> {
    Str(&'a str),
    Num(Number),
    Bool(bool),
}

impl Value<'_> {
    fn as_number(self) -> Option<Number> {
        match self {
            Value::Str(text) => Number::parse(text),
            Value::Num(number) => Some(number),
            Value::Bool(_) => None,
        }
    }

    fn as_bool(self) -> Option<bool> {
        match self {
            Value::Str(text) => parse_bool(text),
            Value::Bool(truth) => Some(truth),
            Value::Num(_) => None,
        }
    }

    /// `=` in three-valued logic (`None`: UNKNOWN).
    fn equals(self, other: Value<'_>) -> Option<bool> {
        match (self, other) {
            (Value::Str(a), Value::Str(b)) => Some(a == b),
            (Value::Num(_), _) | (_, Value::Num(_)) => ordering(self, other).map(Ordering::is_eq),
            (Value::Bool(_), _) | (_, Value::Bool(_)) => Some(self.as_bool()? == other.as_bool()?),
        }
    }
}

/// Numeric order of two values; `None` when either is not a number.
fn ordering(left: Value<'_>, right: Value<'_>) -> Option<Ordering> {
    left.as_number()?.compare(right.as_number()?)
}

/// The message a condition is evaluated against.
struct Message<'a> {
    tag: &'a str,
    properties: &'a HashMap<String, String>,
}

impl<'a> Message<'a> {
    fn property(&self, name: &str) -> Option<&'a str> {
        if name == TAGS_PROPERTY {
            return Some(self.tag).filter(|tag| !tag.is_empty());
        }
        self.properties.get(name).map(String::as_str)
    }
}

impl Operand {
    fn resolve<'a>(&'a self, message: &Message<'a>) -> Option<Value<'a>> {
        match self {
            Operand::Property(name) => message.property(name).map(Value::Str),
            Operand::Literal(Literal::Str(text)) => Some(Value::Str(text)),
            Operand::Literal(Literal::Num(number)) => Some(Value::Num(*number)),
            Operand::Literal(Literal::Bool(truth)) => Some(Value::Bool(*truth)),
        }
    }
}

// ---------------------------------------------------------------------------
// Conditions and their evaluation

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl CmpOp {
    fn symbol(self) -> &'static str {
        match self {
            CmpOp::Eq => "=",
            CmpOp::Ne => "<>",
            CmpOp::Lt => "<",
            CmpOp::Le => "<=",
            CmpOp::Gt => ">",
            CmpOp::Ge => ">=",
        }
    }

    fn is_equality(self) -> bool {
        matches!(self, CmpOp::Eq | CmpOp::Ne)
    }

    fn apply(self, left: Value<'_>, right: Value<'_>) -> Option<bool> {
        match self {
            CmpOp::Eq => left.equals(right),
            CmpOp::Ne => left.equals(right).map(|equal| !equal),
            CmpOp::Lt => ordering(left, right).map(Ordering::is_lt),
            CmpOp::Le => ordering(left, right).map(Ordering::is_le),
            CmpOp::Gt => ordering(left, right).map(Ordering::is_gt),
            CmpOp::Ge => ordering(left, right).map(Ordering::is_ge),
        }
    }
}

/// A SQL condition. `AND`/`OR` chains are flat so that the tree is only as
/// deep as the nesting of parentheses and `NOT`s (bounded by [`MAX_DEPTH`]).
#[derive(Debug, Clone, PartialEq)]
enum Expr {
    Or(Vec<Expr>),
    And(Vec<Expr>),
    Not(Box<Expr>),
    /// A property or boolean literal used as a condition.
    Truth(Operand),
    Compare {
        op: CmpOp,
        left: Operand,
        right: Operand,
    },
    Between {
        value: Operand,
        low: Operand,
        high: Operand,
        negated: bool,
    },
    In {
        value: Operand,
        items: Vec<Literal>,
        negated: bool,
    },
    IsNull {
        operand: Operand,
        negated: bool,
    },
}

/// Three-valued AND: FALSE wins, then UNKNOWN.
fn all3(results: impl IntoIterator<Item = Option<bool>>) -> Option<bool> {
    let mut unknown = false;
    for result in results {
        match result {
            Some(false) => return Some(false),
            None => unknown = true,
            Some(true) => {}
        }
    }
    if unknown { None } else { Some(true) }
}

/// Three-valued OR: TRUE wins, then UNKNOWN.
fn any3(results: impl IntoIterator<Item = Option<bool>>) -> Option<bool> {
    all3(results.into_iter().map(|result| result.map(|truth| !truth))).map(|truth| !truth)
}

impl Expr {
    /// The condition's truth for `message`; `None` is UNKNOWN.
    fn eval(&self, message: &Message<'_>) -> Option<bool> {
        match self {
            Expr::Or(terms) => any3(terms.iter().map(|term| term.eval(message))),
            Expr::And(terms) => all3(terms.iter().map(|term| term.eval(message))),
            Expr::Not(inner) => inner.eval(message).map(|truth| !truth),
            Expr::Truth(operand) => operand.resolve(message)?.as_bool(),
            Expr::Compare { op, left, right } => op.apply(left.resolve(message)?, right.resolve(message)?),
            Expr::Between { value, low, high, negated } => {
                let value = value.resolve(message);
                let above = value.zip(low.resolve(message)).and_then(|(v, low)| CmpOp::Ge.apply(v, low));
                let below = value.zip(high.resolve(message)).and_then(|(v, high)| CmpOp::Le.apply(v, high));
                all3([above, below]).map(|inside| inside != *negated)
            }
            Expr::In { value, items, negated } => {
                let value = value.resolve(message)?;
                let found = any3(items.iter().map(|item| value.equals(literal_value(item))));
                found.map(|found| found != *negated)
            }
            Expr::IsNull { operand, negated } => Some(operand.resolve(message).is_none() != *negated),
        }
    }
}

fn literal_value(literal: &Literal) -> Value<'_> {
    match literal {
        Literal::Str(text) => Value::Str(text),
        Literal::Num(number) => Value::Num(*number),
        Literal::Bool(truth) => Value::Bool(*truth),
    }
}

// ---------------------------------------------------------------------------
// SQL lexer

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Ident(String),
    Str(String),
    Num(Number),
    Cmp(CmpOp),
    LParen,
    RParen,
    Comma,
    Minus,
    And,
    Or,
    Not,
    Between,
    In,
    Is,
    Null,
    True,
    False,
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Token::Ident(name) => write!(f, "identifier {name}"),
            Token::Str(text) => write!(f, "string '{}'", text.replace('\'', "''")),
            Token::Num(number) => write!(f, "number {number}"),
            Token::Cmp(op) => write!(f, "'{}'", op.symbol()),
            Token::LParen => f.write_str("'('"),
            Token::RParen => f.write_str("')'"),
            Token::Comma => f.write_str("','"),
            Token::Minus => f.write_str("'-'"),
            Token::And => f.write_str("AND"),
            Token::Or => f.write_str("OR"),
            Token::Not => f.write_str("NOT"),
            Token::Between => f.write_str("BETWEEN"),
            Token::In => f.write_str("IN"),
            Token::Is => f.write_str("IS"),
            Token::Null => f.write_str("NULL"),
            Token::True => f.write_str("TRUE"),
            Token::False => f.write_str("FALSE"),
        }
    }
}

/// A token and its byte offset.
#[derive(Debug)]
struct Spanned {
    token: Token,
    position: usize,
}

fn is_ident_start(c: char) -> bool {
    c.is_alphabetic() || c == '_' || c == '$'
}

fn is_ident_char(c: char) -> bool {
    is_ident_start(c) || c.is_ascii_digit() || c == '.'
}

fn keyword(word: &str) -> Option<Token> {
    const KEYWORDS: [(&str, Token); 9] = [
        ("AND", Token::And),
        ("OR", Token::Or),
        ("NOT", Token::Not),
        ("BETWEEN", Token::Between),
        ("IN", Token::In),
        ("IS", Token::Is),
        ("NULL", Token::Null),
        ("TRUE", Token::True),
        ("FALSE", Token::False),
    ];
    KEYWORDS.into_iter().find(|(name, _)| word.eq_ignore_ascii_case(name)).map(|(_, token)| token)
}

struct Lexer<'a> {
    src: &'a str,
    position: usize,
}

impl<'a> Lexer<'a> {
    fn rest(&self) -> &'a str {
        self.src.get(self.position..).unwrap_or_default()
    }

    fn peek(&self) -> Option<char> {
        self.rest().chars().next()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.position += c.len_utf8();
        Some(c)
    }

    fn bump_if(&mut self, wanted: char) -> bool {
        let matched = self.peek() == Some(wanted);
        if matched {
            self.position += wanted.len_utf8();
        }
        matched
    }

    fn skip_whitespace(&mut self) {
        while self.peek().is_some_and(char::is_whitespace) {
            self.bump();
        }
    }

    /// The text consumed since `start`.
    fn since(&self, start: usize) -> &'a str {
        self.src.get(start..self.position).unwrap_or_default()
    }

    fn next_token(&mut self) -> Result<Option<Spanned>, FilterError> {
        self.skip_whitespace();
        let start = self.position;
        let Some(c) = self.bump() else { return Ok(None) };
        let token = match c {
            '(' => Token::LParen,
            ')' => Token::RParen,
            ',' => Token::Comma,
            '-' => Token::Minus,
            '=' => Token::Cmp(CmpOp::Eq),
            '<' if self.bump_if('=') => Token::Cmp(CmpOp::Le),
            '<' if self.bump_if('>') => Token::Cmp(CmpOp::Ne),
            '<' => Token::Cmp(CmpOp::Lt),
            '>' if self.bump_if('=') => Token::Cmp(CmpOp::Ge),
            '>' => Token::Cmp(CmpOp::Gt),
            '!' if self.bump_if('=') => Token::Cmp(CmpOp::Ne),
            '\'' => self.string(start)?,
            '0'..='9' | '.' => self.number(start)?,
            c if is_ident_start(c) => self.word(start),
            c => return Err(syntax(format!("unexpected character {c:?}"), start)),
        };
        Ok(Some(Spanned { token, position: start }))
    }

    /// The rest of a string literal after its opening quote; `''` is a quote.
    fn string(&mut self, start: usize) -> Result<Token, FilterError> {
        let mut text = String::new();
        loop {
            match self.bump() {
                None => return Err(syntax("unclosed string literal", start)),
                Some('\'') if self.bump_if('\'') => text.push('\''),
                Some('\'') => return Ok(Token::Str(text)),
                Some(c) => text.push(c),
            }
        }
    }

    /// The rest of a number; the whole run of number-like characters must be
    /// one valid number (so `12abc` and `1.2.3` are errors, not two tokens).
    fn number(&mut self, start: usize) -> Result<Token, FilterError> {
        loop {
            let after_exponent = self.since(start).ends_with(['e', 'E']);
            match self.peek() {
                Some(c) if is_ident_char(c) => {}
                Some('+' | '-') if after_exponent => {}
                _ => break,
            }
            self.bump();
        }
        let text = self.since(start);
        Number::parse(text).map(Token::Num).ok_or_else(|| syntax(format!("malformed number {text:?}"), start))
    }

    fn word(&mut self, start: usize) -> Token {
        while self.peek().is_some_and(is_ident_char) {
            self.bump();
        }
        let word = self.since(start);
        keyword(word).unwrap_or_else(|| Token::Ident(word.to_owned()))
    }
}

fn tokenize(src: &str) -> Result<Vec<Spanned>, FilterError> {
    let mut lexer = Lexer { src, position: 0 };
    let mut tokens = Vec::new();
    while let Some(token) = lexer.next_token()? {
        tokens.push(token);
    }
    Ok(tokens)
}

// ---------------------------------------------------------------------------
// SQL parser
//
// condition  := and (OR and)*
// and        := not (AND not)*
// not        := NOT not | predicate
// predicate  := '(' condition ')' | operand tail
// tail       := cmp operand | [NOT] BETWEEN operand AND operand
//             | [NOT] IN '(' literal (',' literal)* ')' | IS [NOT] NULL | <nothing>
// operand    := identifier | string | ['-'] number | TRUE | FALSE

fn parse_sql(src: &str) -> Result<Expr, FilterError> {
    if src.trim().is_empty() {
        return Err(FilterError::EmptySql);
    }
    let mut parser = Parser { tokens: tokenize(src)?.into_iter().peekable(), end: src.len(), depth: 0 };
    let expr = parser.condition()?;
    match parser.tokens.next() {
        None => Ok(expr),
        Some(extra) => Err(syntax(format!("unexpected {}", extra.token), extra.position)),
    }
}

/// An operand and where it starts.
struct Located {
    operand: Operand,
    position: usize,
}

struct Parser {
    tokens: Peekable<vec::IntoIter<Spanned>>,
    end: usize,
    depth: usize,
}

impl Parser {
    fn peek(&mut self) -> Option<&Token> {
        self.tokens.peek().map(|spanned| &spanned.token)
    }

    fn next(&mut self) -> Option<Token> {
        self.tokens.next().map(|spanned| spanned.token)
    }

    /// Where the next token starts (the end of the expression after the last).
    fn position(&mut self) -> usize {
        self.tokens.peek().map_or(self.end, |spanned| spanned.position)
    }

    fn eat(&mut self, wanted: &Token) -> bool {
        let matched = self.peek() == Some(wanted);
        if matched {
            self.tokens.next();
        }
        matched
    }

    fn expect(&mut self, wanted: &Token) -> Result<(), FilterError> {
        let position = self.position();
        if self.eat(wanted) { Ok(()) } else { Err(syntax(format!("expected {wanted}"), position)) }
    }

    /// Runs `parse` one nesting level deeper, refusing to go past [`MAX_DEPTH`].
    fn nested<T>(
        &mut self,
        position: usize,
        parse: impl FnOnce(&mut Self) -> Result<T, FilterError>,
    ) -> Result<T, FilterError> {
        if self.depth >= MAX_DEPTH {
            return Err(FilterError::TooDeep { position });
        }
        self.depth += 1;
        let result = parse(self);
        self.depth -= 1;
        result
    }

    fn condition(&mut self) -> Result<Expr, FilterError> {
        let mut terms = vec![self.conjunction()?];
        while self.eat(&Token::Or) {
            terms.push(self.conjunction()?);
        }
        Ok(if terms.len() == 1 { terms.swap_remove(0) } else { Expr::Or(terms) })
    }

    fn conjunction(&mut self) -> Result<Expr, FilterError> {
        let mut terms = vec![self.negation()?];
        while self.eat(&Token::And) {
            terms.push(self.negation()?);
        }
        Ok(if terms.len() == 1 { terms.swap_remove(0) } else { Expr::And(terms) })
    }

    fn negation(&mut self) -> Result<Expr, FilterError> {
        let position = self.position();
        if self.eat(&Token::Not) {
            return self.nested(position, |parser| Ok(Expr::Not(Box::new(parser.negation()?))));
        }
        self.predicate()
    }

    fn predicate(&mut self) -> Result<Expr, FilterError> {
        let position = self.position();
        if self.eat(&Token::LParen) {
            return self.nested(position, |parser| {
                let inner = parser.condition()?;
                parser.expect(&Token::RParen)?;
                Ok(inner)
            });
        }
        let left = self.operand()?;
        self.tail(left)
    }

    fn tail(&mut self, left: Located) -> Result<Expr, FilterError> {
        match self.peek() {
            Some(Token::Cmp(op)) => {
                let op = *op;
                self.tokens.next();
                self.comparison(op, left)
            }
            Some(Token::Between) => {
                self.tokens.next();
                self.between(left, false)
            }
            Some(Token::In) => {
                self.tokens.next();
                self.in_list(left, false)
            }
            Some(Token::Not) => {
                self.tokens.next();
                self.negated_tail(left)
            }
            Some(Token::Is) => {
                self.tokens.next();
                let negated = self.eat(&Token::Not);
                self.expect(&Token::Null)?;
                Ok(Expr::IsNull { operand: left.operand, negated })
            }
            _ => truth(left),
        }
    }

    /// After `operand NOT`: `BETWEEN ...` or `IN (...)`.
    fn negated_tail(&mut self, left: Located) -> Result<Expr, FilterError> {
        let position = self.position();
        match self.next() {
            Some(Token::Between) => self.between(left, true),
            Some(Token::In) => self.in_list(left, true),
            _ => Err(syntax("expected BETWEEN or IN after NOT", position)),
        }
    }

    fn comparison(&mut self, op: CmpOp, left: Located) -> Result<Expr, FilterError> {
        let right = self.operand()?;
        if op.is_equality() {
            check_comparable(&left, &right)?;
        } else {
            check_numeric(&left)?;
            check_numeric(&right)?;
        }
        Ok(Expr::Compare { op, left: left.operand, right: right.operand })
    }

    fn between(&mut self, value: Located, negated: bool) -> Result<Expr, FilterError> {
        let low = self.operand()?;
        self.expect(&Token::And)?;
        let high = self.operand()?;
        for operand in [&value, &low, &high] {
            check_numeric(operand)?;
        }
        Ok(Expr::Between { value: value.operand, low: low.operand, high: high.operand, negated })
    }

    fn in_list(&mut self, value: Located, negated: bool) -> Result<Expr, FilterError> {
        self.expect(&Token::LParen)?;
        let mut items = Vec::new();
        loop {
            if items.len() == MAX_IN_ITEMS {
                return Err(FilterError::TooManyItems { position: self.position() });
            }
            items.push(self.in_item()?);
            if !self.eat(&Token::Comma) {
                break;
            }
        }
        self.expect(&Token::RParen)?;
        Ok(Expr::In { value: value.operand, items, negated })
    }

    fn in_item(&mut self) -> Result<Literal, FilterError> {
        let position = self.position();
        match self.next() {
            Some(Token::Str(text)) => Ok(Literal::Str(text)),
            Some(Token::Num(number)) => Ok(Literal::Num(number)),
            Some(Token::Minus) => Ok(Literal::Num(self.negative_number()?)),
            found => Err(unexpected("a string or a number", found, position)),
        }
    }

    fn operand(&mut self) -> Result<Located, FilterError> {
        let position = self.position();
        let operand = match self.next() {
            Some(Token::Ident(name)) => Operand::Property(name),
            Some(Token::Str(text)) => Operand::Literal(Literal::Str(text)),
            Some(Token::Num(number)) => Operand::Literal(Literal::Num(number)),
            Some(Token::Minus) => Operand::Literal(Literal::Num(self.negative_number()?)),
            Some(Token::True) => Operand::Literal(Literal::Bool(true)),
            Some(Token::False) => Operand::Literal(Literal::Bool(false)),
            found => return Err(unexpected("a property or a value", found, position)),
        };
        Ok(Located { operand, position })
    }

    /// The number after a `-`, negated.
    fn negative_number(&mut self) -> Result<Number, FilterError> {
        let position = self.position();
        match self.next() {
            Some(Token::Num(number)) => Ok(number.negate()),
            found => Err(unexpected("a number after '-'", found, position)),
        }
    }
}

fn unexpected(wanted: &str, found: Option<Token>, position: usize) -> FilterError {
    match found {
        Some(token) => syntax(format!("expected {wanted}, found {token}"), position),
        None => syntax(format!("expected {wanted}, found the end of the expression"), position),
    }
}

/// An operand standing alone as a condition: a property holding `true` or
/// `false`, or a boolean literal.
fn truth(operand: Located) -> Result<Expr, FilterError> {
    match &operand.operand {
        Operand::Literal(literal @ (Literal::Str(_) | Literal::Num(_))) => {
            Err(syntax(format!("expected a condition, found {}", literal.kind_name()), operand.position))
        }
        _ => Ok(Expr::Truth(operand.operand)),
    }
}

/// `<`, `>`, `BETWEEN`: string and boolean literals cannot take part.
fn check_numeric(operand: &Located) -> Result<(), FilterError> {
    match &operand.operand {
        Operand::Literal(literal @ (Literal::Str(_) | Literal::Bool(_))) => {
            Err(syntax(format!("expected a number or a property, found {}", literal.kind_name()), operand.position))
        }
        _ => Ok(()),
    }
}

/// `=`, `<>`: two literals must be of the same kind.
fn check_comparable(left: &Located, right: &Located) -> Result<(), FilterError> {
    match (&left.operand, &right.operand) {
        (Operand::Literal(a), Operand::Literal(b)) if std::mem::discriminant(a) != std::mem::discriminant(b) => {
            Err(syntax(format!("cannot compare {} with {}", a.kind_name(), b.kind_name()), right.position))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn props(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn sql(expression: &str) -> Filter {
        match Filter::parse(FilterKind::Sql, expression) {
            Ok(filter) => filter,
            Err(e) => panic!("{expression:?} should parse: {e}"),
        }
    }

    fn sql_err(expression: &str) -> FilterError {
        match Filter::parse(FilterKind::Sql, expression) {
            Ok(filter) => panic!("{expression:?} should not parse, got {filter:?}"),
            Err(e) => e,
        }
    }

    /// Whether `expression` matches a message without tag and with `pairs`.
    fn sql_matches(expression: &str, pairs: &[(&str, &str)]) -> bool {
        sql(expression).matches("", &props(pairs))
    }

    fn tag(expression: &str) -> Filter {
        match Filter::parse(FilterKind::Tag, expression) {
            Ok(filter) => filter,
            Err(e) => panic!("{expression:?} should parse: {e}"),
        }
    }

    fn none() -> HashMap<String, String> {
        HashMap::new()
    }

    // --- tags ---

    #[test]
    fn tag_star_and_empty_match_everything() {
        for expression in ["*", "", "   ", " * "] {
            let filter = tag(expression);
            assert!(filter.is_all(), "{expression:?}");
            assert!(filter.matches("a", &none()));
            assert!(filter.matches("", &none()));
        }
    }

    #[test]
    fn tag_list_matches_exactly() {
        let filter = tag("a || b ||c");
        assert!(!filter.is_all());
        assert!(filter.matches("a", &none()));
        assert!(filter.matches("b", &none()));
        assert!(filter.matches("c", &none()));
        assert!(!filter.matches("A", &none()));
        assert!(!filter.matches("d", &none()));
        assert!(!filter.matches("a ", &none()));
        assert!(!filter.matches("", &none()), "a message without tag matches only *");
    }

    #[test]
    fn tag_empty_parts_are_ignored() {
        let filter = tag("|| a |||| b ||");
        assert!(filter.matches("a", &none()));
        assert!(filter.matches("b", &none()));
        assert!(!filter.matches("", &none()));
    }

    #[test]
    fn tag_single_tag_and_star_inside_list() {
        assert!(tag("TagA").matches("TagA", &none()));
        assert!(!tag("TagA").matches("TagB", &none()));
        let filter = tag("a || *");
        assert!(!filter.is_all());
        assert!(!filter.matches("b", &none()));
    }

    #[test]
    fn tag_without_any_tag_is_an_error() {
        assert!(matches!(Filter::parse(FilterKind::Tag, "||"), Err(FilterError::NoTag(_))));
        assert!(matches!(Filter::parse(FilterKind::Tag, " || || "), Err(FilterError::NoTag(_))));
    }

    #[test]
    fn too_long_expressions_are_refused() {
        let long = "a".repeat(MAX_EXPRESSION_LEN + 1);
        assert_eq!(Filter::parse(FilterKind::Tag, &long), Err(FilterError::TooLong { len: MAX_EXPRESSION_LEN + 1 }));
        assert!(matches!(Filter::parse(FilterKind::Sql, &long), Err(FilterError::TooLong { .. })));
        let at_limit = "a".repeat(MAX_EXPRESSION_LEN);
        assert!(Filter::parse(FilterKind::Tag, &at_limit).is_ok());
        assert!(Filter::parse(FilterKind::Sql, &at_limit).is_ok());
    }

    // --- SQL: comparisons ---

    #[test]
    fn sql_numeric_comparisons() {
        let p = [("a", "10")];
        assert!(sql_matches("a > 5", &p));
        assert!(!sql_matches("a > 10", &p));
        assert!(sql_matches("a >= 10", &p));
        assert!(sql_matches("a < 11", &p));
        assert!(!sql_matches("a < 10", &p));
        assert!(sql_matches("a <= 10", &p));
        assert!(sql_matches("a = 10", &p));
        assert!(sql_matches("a = 10.0", &p));
        assert!(sql_matches("a <> 11", &p));
        assert!(sql_matches("a != 11", &p));
        assert!(!sql_matches("a != 10", &p));
        assert!(sql_matches("5 < a", &p));
    }

    #[test]
    fn sql_decimal_and_negative_numbers() {
        assert!(sql_matches("a > 1.5", &[("a", "1.75")]));
        assert!(!sql_matches("a > 1.5", &[("a", "1.25")]));
        assert!(sql_matches("a < -3", &[("a", "-4")]));
        assert!(sql_matches("a = -2.5", &[("a", "-2.5")]));
        assert!(sql_matches("a > -0.5", &[("a", "0")]));
        assert!(sql_matches("a = 1e3", &[("a", "1000")]));
        assert!(sql_matches("a = 2", &[("a", "2.0")]));
        assert!(sql_matches("a > 9223372036854775806", &[("a", "9223372036854775807")]));
        assert!(sql_matches("a < 0.5", &[("a", ".25")]));
    }

    #[test]
    fn sql_property_not_a_number_is_not_matched() {
        let p = [("a", "abc")];
        assert!(!sql_matches("a > 5", &p));
        assert!(!sql_matches("a = 5", &p));
        assert!(!sql_matches("a <> 5", &p));
        assert!(!sql_matches("NOT (a > 5)", &p));
        assert!(!sql_matches("a BETWEEN 1 AND 9", &p));
        assert!(!sql_matches("a NOT BETWEEN 1 AND 9", &p));
        for weird in ["NaN", "inf", "-infinity", "1_000", " 5", "0x10", ""] {
            assert!(!sql_matches("a = 5 OR a <> 5", &[("a", weird)]), "{weird:?}");
        }
    }

    #[test]
    fn sql_string_equality() {
        let p = [("region", "eu-west")];
        assert!(sql_matches("region = 'eu-west'", &p));
        assert!(!sql_matches("region = 'EU-WEST'", &p));
        assert!(sql_matches("region <> 'us'", &p));
        assert!(!sql_matches("region <> 'eu-west'", &p));
        assert!(sql_matches("'eu-west' = region", &p));
        assert!(sql_matches("a = b", &[("a", "x"), ("b", "x")]));
        assert!(!sql_matches("a = b", &[("a", "x"), ("b", "y")]));
        assert!(sql_matches("a = ''", &[("a", "")]));
        assert!(sql_matches("'x' = 'x'", &[]));
        assert!(!sql_matches("'x' = 'y'", &[]));
    }

    #[test]
    fn sql_numbers_compare_numerically_between_properties() {
        assert!(sql_matches("a < b", &[("a", "9"), ("b", "10")]));
        assert!(!sql_matches("a < b", &[("a", "x"), ("b", "10")]));
        assert!(!sql_matches("a = b", &[("a", "1.0"), ("b", "1")]), "two properties compare as strings");
    }

    #[test]
    fn sql_string_escapes() {
        assert!(sql_matches("a = 'it''s'", &[("a", "it's")]));
        assert!(sql_matches("a = ''''", &[("a", "'")]));
        assert!(sql_matches("a = 'x AND y'", &[("a", "x AND y")]));
        assert!(sql_matches("a = 'héllo ✓'", &[("a", "héllo ✓")]));
        assert!(!sql_matches("a = 'it''s'", &[("a", "it''s")]));
    }

    #[test]
    fn sql_tags_property() {
        let filter = sql("TAGS = 'TagA'");
        assert!(filter.matches("TagA", &none()));
        assert!(!filter.matches("TagB", &none()));
        assert!(!filter.matches("", &none()));
        assert!(sql("TAGS IS NULL").matches("", &none()));
        assert!(!sql("TAGS IS NULL").matches("x", &none()));
        let both = sql("TAGS IN ('a', 'b') AND n > 1");
        assert!(both.matches("b", &props(&[("n", "2")])));
        assert!(!both.matches("c", &props(&[("n", "2")])));
        // The tag wins over a user property of the same name.
        assert!(!filter.matches("TagB", &props(&[("TAGS", "TagA")])));
    }

    #[test]
    fn sql_identifiers() {
        assert!(sql_matches("a.b_c$1 = 'x'", &[("a.b_c$1", "x")]));
        assert!(sql_matches("_x = 1", &[("_x", "1")]));
        assert!(sql_matches("$x = 1", &[("$x", "1")]));
        assert!(sql_matches("Key = 1", &[("Key", "1")]));
        assert!(!sql_matches("key = 1", &[("Key", "1")]), "property names are case-sensitive");
    }

    // --- SQL: null handling ---

    #[test]
    fn sql_missing_property_is_unknown() {
        for expression in [
            "a > 1",
            "a < 1",
            "a = 1",
            "a <> 1",
            "a = 'x'",
            "a <> 'x'",
            "NOT (a = 1)",
            "NOT a = 1",
            "a BETWEEN 1 AND 2",
            "a NOT BETWEEN 1 AND 2",
            "a IN ('x')",
            "a NOT IN ('x')",
            "a",
            "NOT a",
            "a = b",
        ] {
            assert!(!sql_matches(expression, &[("z", "1")]), "{expression}");
        }
    }

    #[test]
    fn sql_is_null() {
        assert!(sql_matches("a IS NULL", &[]));
        assert!(!sql_matches("a IS NULL", &[("a", "")]));
        assert!(sql_matches("a IS NOT NULL", &[("a", "")]));
        assert!(!sql_matches("a IS NOT NULL", &[]));
        assert!(sql_matches("a is not null", &[("a", "1")]));
        assert!(sql_matches("NOT a IS NULL", &[("a", "1")]));
        assert!(!sql_matches("1 IS NULL", &[]));
    }

    #[test]
    fn sql_three_valued_logic() {
        // UNKNOWN OR TRUE = TRUE; UNKNOWN AND FALSE = FALSE; NOT(UNKNOWN AND FALSE) = TRUE.
        assert!(sql_matches("a = 1 OR b = 1", &[("b", "1")]));
        assert!(!sql_matches("a = 1 AND b = 1", &[("b", "1")]));
        assert!(sql_matches("NOT (a = 1 AND b = 1)", &[("b", "2")]));
        assert!(!sql_matches("NOT (a = 1 OR b = 1)", &[("b", "2")]));
        assert!(sql_matches("NOT (a = 1 OR b = 1)", &[("a", "2"), ("b", "2")]));
    }

    // --- SQL: logic ---

    #[test]
    fn sql_and_or_not() {
        let p = [("a", "1"), ("b", "2")];
        assert!(sql_matches("a = 1 AND b = 2", &p));
        assert!(!sql_matches("a = 1 AND b = 3", &p));
        assert!(sql_matches("a = 9 OR b = 2", &p));
        assert!(!sql_matches("a = 9 OR b = 9", &p));
        assert!(sql_matches("NOT a = 2", &p));
        assert!(!sql_matches("NOT a = 1", &p));
        assert!(sql_matches("NOT NOT a = 1", &p));
        assert!(sql_matches("a = 1 and b = 2 or a = 5", &p));
        assert!(sql_matches("a = 1 AnD NoT b = 3", &p));
    }

    #[test]
    fn sql_precedence_and_binds_tighter_than_or() {
        let p = [("a", "1"), ("b", "0"), ("c", "0")];
        assert!(sql_matches("a = 1 OR b = 1 AND c = 1", &p));
        assert!(!sql_matches("(a = 1 OR b = 1) AND c = 1", &p));
        assert!(sql_matches("b = 1 AND c = 1 OR a = 1", &p));
        // NOT binds tighter than AND.
        assert!(!sql_matches("NOT a = 1 AND b = 0", &p));
        assert!(sql_matches("NOT (a = 1 AND b = 1)", &p));
    }

    #[test]
    fn sql_parentheses() {
        let p = [("a", "1")];
        assert!(sql_matches("(a = 1)", &p));
        assert!(sql_matches("((((a = 1))))", &p));
        assert!(sql_matches("(a = 2 OR (a = 1 AND (TRUE)))", &p));
    }

    #[test]
    fn sql_boolean_literals_and_properties() {
        assert!(sql_matches("TRUE", &[]));
        assert!(!sql_matches("FALSE", &[]));
        assert!(sql_matches("NOT FALSE", &[]));
        assert!(sql_matches("true AND TRUE", &[]));
        assert!(sql_matches("flag = TRUE", &[("flag", "true")]));
        assert!(sql_matches("flag = true", &[("flag", "TRUE")]));
        assert!(sql_matches("flag = FALSE", &[("flag", "false")]));
        assert!(!sql_matches("flag = TRUE", &[("flag", "yes")]));
        assert!(!sql_matches("flag <> TRUE", &[("flag", "yes")]));
        assert!(sql_matches("flag", &[("flag", "true")]));
        assert!(!sql_matches("flag", &[("flag", "false")]));
        assert!(sql_matches("NOT flag", &[("flag", "false")]));
        assert!(!sql_matches("NOT flag", &[("flag", "1")]));
        assert!(sql_matches("TRUE = TRUE", &[]));
    }

    #[test]
    fn sql_between() {
        let p = [("a", "5")];
        assert!(sql_matches("a BETWEEN 1 AND 10", &p));
        assert!(sql_matches("a BETWEEN 5 AND 5", &p));
        assert!(!sql_matches("a BETWEEN 6 AND 10", &p));
        assert!(!sql_matches("a BETWEEN 10 AND 1", &p));
        assert!(sql_matches("a NOT BETWEEN 6 AND 10", &p));
        assert!(!sql_matches("a NOT BETWEEN 1 AND 10", &p));
        assert!(sql_matches("a BETWEEN -1.5 AND 5.5", &p));
        assert!(sql_matches("a between 1 and 10 and a = 5", &p));
        assert!(sql_matches("a BETWEEN lo AND hi", &[("a", "5"), ("lo", "1"), ("hi", "9")]));
        // One bound missing: UNKNOWN unless the other already excludes the value.
        assert!(!sql_matches("a BETWEEN lo AND 10", &p));
        assert!(sql_matches("a NOT BETWEEN lo AND 4", &p));
    }

    #[test]
    fn sql_in() {
        let p = [("a", "y")];
        assert!(sql_matches("a IN ('x', 'y', 'z')", &p));
        assert!(!sql_matches("a IN ('x', 'z')", &p));
        assert!(sql_matches("a NOT IN ('x', 'z')", &p));
        assert!(!sql_matches("a NOT IN ('y')", &p));
        assert!(sql_matches("a in ('y')", &p));
        assert!(sql_matches("n IN (1, 2, -3)", &[("n", "-3")]));
        assert!(sql_matches("n IN (1, 2.0)", &[("n", "2")]));
        assert!(sql_matches("n IN ('x', 2)", &[("n", "2")]), "a matching item wins over an UNKNOWN one");
        assert!(!sql_matches("n NOT IN ('x', 2)", &[("n", "x")]), "UNKNOWN item: NOT IN is UNKNOWN");
        assert!(sql_matches("a IN ('it''s')", &[("a", "it's")]));
    }

    #[test]
    fn sql_in_list_limit() {
        let items = |n: usize| (0..n).map(|i| i.to_string()).collect::<Vec<_>>().join(",");
        let at_limit = format!("a IN ({})", items(MAX_IN_ITEMS));
        assert!(sql_matches(&at_limit, &[("a", "511")]));
        let over = format!("a IN ({})", items(MAX_IN_ITEMS + 1));
        assert!(matches!(sql_err(&over), FilterError::TooManyItems { .. }));
    }

    #[test]
    fn sql_keywords_are_case_insensitive() {
        assert!(sql_matches("a iS nOt NuLl aNd b BeTwEeN 1 aNd 3 oR FaLsE", &[("a", "1"), ("b", "2")]));
    }

    #[test]
    fn sql_whitespace_is_free() {
        assert!(sql_matches(" \t\na\n>\t0 ", &[("a", "1")]));
        assert!(sql_matches("a>0 AND(b<>2)", &[("a", "1"), ("b", "3")]));
    }

    // --- SQL: errors ---

    fn assert_syntax(expression: &str, expected: &str) {
        let error = sql_err(expression);
        assert!(matches!(error, FilterError::Syntax { .. }), "{expression:?}: {error:?}");
        assert_eq!(error.to_string(), expected, "{expression:?}");
    }

    #[test]
    fn sql_error_messages_say_what_and_where() {
        assert_syntax("(a = 1 AND b = 2", "SQL filter: expected ')' at 16");
        assert_syntax("a = 'abc", "SQL filter: unclosed string literal at 4");
        assert_syntax("a = 1 b", "SQL filter: unexpected identifier b at 6");
        assert_syntax("a = 1)", "SQL filter: unexpected ')' at 5");
        assert_syntax("a =", "SQL filter: expected a property or a value, found the end of the expression at 3");
        assert_syntax("a # 1", "SQL filter: unexpected character '#' at 2");
        assert_syntax("a > 'x'", "SQL filter: expected a number or a property, found a string at 4");
    }

    #[test]
    fn sql_empty_is_an_error() {
        assert_eq!(sql_err(""), FilterError::EmptySql);
        assert_eq!(sql_err("  \t\n"), FilterError::EmptySql);
        assert_eq!(FilterError::EmptySql.to_string(), "SQL filter: empty expression");
    }

    #[test]
    fn sql_malformed_inputs_are_errors() {
        for expression in [
            "(",
            ")",
            "(a = 1",
            "((a = 1)",
            "a = 1))",
            "a = 'x",
            "'",
            "a = 1 garbage",
            "a = 1 AND",
            "AND a = 1",
            "a = 1 OR OR b = 2",
            "a =",
            "= 1",
            "a = = 1",
            "a BETWEEN 1",
            "a BETWEEN 1 OR 2",
            "a BETWEEN 'x' AND 2",
            "a NOT 1",
            "a NOT LIKE 'x'",
            "a IN",
            "a IN ()",
            "a IN ('x'",
            "a IN ('x',)",
            "a IN (b)",
            "a IN (TRUE)",
            "a IS",
            "a IS NOT",
            "a IS 1",
            "a > TRUE",
            "1 = 'x'",
            "TRUE = 1",
            "'x'",
            "5",
            "5 AND TRUE",
            "a = 12abc",
            "a = 1.2.3",
            "a = 1e",
            "a = .",
            "a = - 'x'",
            "a = --1",
            "a ! 1",
            "a = \"x\"",
            "1a = 1",
            "()",
            "NOT",
            "a = 1 ,",
        ] {
            let result = Filter::parse(FilterKind::Sql, expression);
            assert!(result.is_err(), "{expression:?} should be refused, got {result:?}");
        }
    }

    #[test]
    fn sql_nesting_limit() {
        let nested = |n: usize| format!("{}a = 1{}", "(".repeat(n), ")".repeat(n));
        assert!(sql_matches(&nested(MAX_DEPTH), &[("a", "1")]));
        assert!(matches!(sql_err(&nested(MAX_DEPTH + 1)), FilterError::TooDeep { .. }));
        assert!(matches!(sql_err(&"(".repeat(2000)), FilterError::TooDeep { position: 64 }));
        let nots = |n: usize| format!("{}a = 1", "NOT ".repeat(n));
        assert!(sql_matches(&nots(MAX_DEPTH), &[("a", "1")]));
        assert!(matches!(sql_err(&nots(MAX_DEPTH + 1)), FilterError::TooDeep { .. }));
        assert!(matches!(sql_err(&"NOT ".repeat(1000)), FilterError::TooDeep { .. }));
        let mixed = "NOT (".repeat(40) + "a = 1" + &")".repeat(40);
        assert!(matches!(sql_err(&mixed), FilterError::TooDeep { .. }));
    }

    #[test]
    fn sql_long_flat_chains_are_fine() {
        let chain = vec!["a = 1"; 400].join(" OR ");
        assert!(chain.len() <= MAX_EXPRESSION_LEN);
        assert!(sql_matches(&chain, &[("a", "1")]));
        let chain = vec!["TRUE"; 400].join(" AND ");
        assert!(chain.len() <= MAX_EXPRESSION_LEN);
        assert!(sql_matches(&chain, &[]));
    }

    #[test]
    fn sql_filter_is_not_all() {
        assert!(!sql("TRUE").is_all());
    }

    // --- property-style: nothing panics ---

    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// Tokens (and near-tokens) of the SQL grammar, separated by spaces.
    const SOUP: &str = "a b TAGS x.y $z _ ( ) ( ) , - = <> != < <= > >= AND OR NOT BETWEEN IN IS NULL TRUE FALSE \
                        's' 'it''s' '' ' 1 -2 3.5 1e3 .5 007 99999999999999999999 || * ! # é \" .. 1.2.3 e";

    fn random_messages(rng: &mut XorShift) -> Vec<(String, HashMap<String, String>)> {
        let values = ["1", "-2", "3.5", "abc", "", "true", "FALSE", "NaN", "1e400", "s", "it's"];
        (0..3)
            .map(|_| {
                let tag = ["", "a", "s", "TagA"][rng.below(4)].to_string();
                let mut properties = HashMap::new();
                for name in ["a", "b", "x.y", "$z", "_", "TAGS"] {
                    if rng.below(3) > 0 {
                        properties.insert(name.to_string(), values[rng.below(values.len())].to_string());
                    }
                }
                (tag, properties)
            })
            .collect()
    }

    fn exercise(rng: &mut XorShift, expression: &str) {
        for kind in [FilterKind::Tag, FilterKind::Sql] {
            if let Ok(filter) = Filter::parse(kind, expression) {
                for (tag, properties) in random_messages(rng) {
                    let _ = filter.matches(&tag, &properties);
                }
                let _ = filter.is_all();
            }
        }
    }

    #[test]
    fn random_inputs_never_panic() {
        let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
        for _ in 0..3000 {
            let len = rng.below(48);
            let bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            let text = String::from_utf8_lossy(&bytes).into_owned();
            exercise(&mut rng, &text);
        }
        let soup: Vec<&str> = SOUP.split_whitespace().collect();
        let mut parsed = 0;
        for _ in 0..5000 {
            let count = rng.below(24);
            let words: Vec<&str> = (0..count).map(|_| soup[rng.below(soup.len())]).collect();
            let separator = if rng.below(4) == 0 { "" } else { " " };
            let text = words.join(separator);
            if Filter::parse(FilterKind::Sql, &text).is_ok() {
                parsed += 1;
            }
            exercise(&mut rng, &text);
        }
        assert!(parsed > 0, "the token soup should sometimes be valid SQL");
        for _ in 0..200 {
            let count = rng.below(3000);
            let text: String = (0..count).map(|_| ["(", "NOT ", ")", "a=1", " OR ", "'"][rng.below(6)]).collect();
            exercise(&mut rng, &text);
        }
    }
}
