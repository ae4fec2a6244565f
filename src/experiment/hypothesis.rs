//! Hypotheses: small expressions over the figures of the variants, such as
//! `amplification[retry_only] > 2 * amplification[both]` or
//! `duplicate_charges[idempotent] == 0`.
//!
//! Grammar (lowest precedence first):
//!
//! ```text
//! hypothesis := comparison (("and" | "or") comparison)*
//! comparison := sum (("<" | "<=" | ">" | ">=" | "==" | "!=") sum)?
//! sum        := product (("+" | "-") product)*
//! product    := unary (("*" | "/") unary)*
//! unary      := "-" unary | number | figure "[" variant ("," param "=" value)* "]"
//!             | "count" "(" hypothesis ")"
//!             | ("smallest" | "largest") "(" param "," hypothesis ")"
//!             | "(" sum ")"
//! ```
//!
//! In a sweep, a figure names its cell: `success_ratio[consecutive, rate=500]`
//! (every swept parameter, each with one of its values). `count(…)` ranges
//! over the parameters that no reference inside it fixes (in a map,
//! `count(x[a, rate=40] > 0)` counts along the other parameter) and is the
//! number of cells where the hypothesis inside holds;
//! `smallest(rate, …)` is the smallest value of `rate` at which it holds
//! (a duration in seconds), and has no value when it holds nowhere.
//!
//! A figure with no value (a time to fail when nothing failed) makes every
//! comparison that uses it false, so a hypothesis never passes on a missing
//! number. A map's verdict (`[[maps]] verdict`) is written with bare figure
//! names (`time_to_recover_s <= 10`): the map's variant and cell are implied.
//!
//! An expression is at most `MAX_LENGTH` characters and nests at most
//! `MAX_DEPTH` deep, so that no file can make the parser or the evaluator
//! run out of stack.

use std::fmt;

use super::sweep::Param;

/// The longest hypothesis, in characters.
pub const MAX_LENGTH: usize = 1_000;
/// The deepest nesting of parentheses, minus signs and functions.
pub const MAX_DEPTH: usize = 16;

/// A figure of a variant, in a cell of the sweep.
#[derive(Debug, Clone, PartialEq)]
pub struct Reference {
    pub figure: String,
    /// Empty in a map's verdict: the map's own variant.
    pub variant: String,
    /// Swept parameters this reference fixes, with the value as written.
    pub at: Vec<(String, String)>,
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.variant.is_empty() && self.at.is_empty() {
            return f.write_str(&self.figure);
        }
        write!(f, "{}[{}", self.figure, self.variant)?;
        for (k, v) in &self.at {
            write!(f, ", {k}={v}")?;
        }
        f.write_str("]")
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    Number(f64),
    Figure(Reference),
    Neg(Box<Expr>),
    Binary(Box<Expr>, Op, Box<Expr>),
    /// Cells where the hypothesis inside holds.
    Count(Box<Expr>),
    /// The smallest (or largest) value of a parameter at which it holds.
    Extreme {
        largest: bool,
        param: String,
        cond: Box<Expr>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Add,
    Sub,
    Mul,
    Div,
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
    And,
    Or,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::Add => "+",
            Op::Sub => "-",
            Op::Mul => "*",
            Op::Div => "/",
            Op::Lt => "<",
            Op::Le => "<=",
            Op::Gt => ">",
            Op::Ge => ">=",
            Op::Eq => "==",
            Op::Ne => "!=",
            Op::And => "and",
            Op::Or => "or",
        })
    }
}

impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expr::Number(n) => write!(f, "{n}"),
            Expr::Figure(r) => write!(f, "{r}"),
            Expr::Neg(inner) => write!(f, "-{inner}"),
            Expr::Binary(l, op, r) => write!(f, "({l} {op} {r})"),
            Expr::Count(cond) => write!(f, "count({})", Bare(cond)),
            Expr::Extreme {
                largest,
                param,
                cond,
            } => write!(
                f,
                "{}({param}, {})",
                if *largest { "largest" } else { "smallest" },
                Bare(cond)
            ),
        }
    }
}

/// An expression without its outermost parentheses.
struct Bare<'a>(&'a Expr);

impl fmt::Display for Bare<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Expr::Binary(l, op, r) => write!(f, "{l} {op} {r}"),
            other => write!(f, "{other}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Number(f64),
    Name(String),
    Op(Op),
    Open,
    Close,
    Comma,
    /// The text between `[` and `]`.
    Bracket(String),
}

fn tokens(text: &str) -> Result<Vec<Token>, String> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        let two = |op| (Token::Op(op), 2);
        let (token, len) = match c {
            ' ' | '\t' | '\n' | '\r' => {
                i += 1;
                continue;
            }
            '(' => (Token::Open, 1),
            ')' => (Token::Close, 1),
            ',' => (Token::Comma, 1),
            '[' => {
                let Some(end) = chars[i..].iter().position(|&c| c == ']') else {
                    let inside: String = chars[i + 1..].iter().collect();
                    return Err(format!("[{inside} without its ]"));
                };
                let inside: String = chars[i + 1..i + end].iter().collect();
                out.push(Token::Bracket(inside));
                i += end + 1;
                continue;
            }
            '+' => (Token::Op(Op::Add), 1),
            '-' => (Token::Op(Op::Sub), 1),
            '*' => (Token::Op(Op::Mul), 1),
            '/' => (Token::Op(Op::Div), 1),
            '<' if next == Some('=') => two(Op::Le),
            '<' => (Token::Op(Op::Lt), 1),
            '>' if next == Some('=') => two(Op::Ge),
            '>' => (Token::Op(Op::Gt), 1),
            '=' if next == Some('=') => two(Op::Eq),
            '!' if next == Some('=') => two(Op::Ne),
            c if c.is_ascii_digit() || c == '.' => {
                let start = i;
                while i < chars.len() && (chars[i].is_ascii_digit() || chars[i] == '.') {
                    i += 1;
                }
                let text: String = chars[start..i].iter().collect();
                let n = text
                    .parse()
                    .map_err(|_| format!("{text:?} is not a number"))?;
                out.push(Token::Number(n));
                continue;
            }
            c if c.is_ascii_alphabetic() || c == '_' => {
                let start = i;
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                    i += 1;
                }
                let name: String = chars[start..i].iter().collect();
                out.push(match name.as_str() {
                    "and" => Token::Op(Op::And),
                    "or" => Token::Op(Op::Or),
                    _ => Token::Name(name),
                });
                continue;
            }
            other => return Err(format!("unexpected {other:?}")),
        };
        out.push(token);
        i += len;
    }
    Ok(out)
}

fn is_word(text: &str) -> bool {
    !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
}

/// `variant, param=value, …` as written between the brackets.
fn reference(figure: String, inside: &str) -> Result<Reference, String> {
    let mut parts = inside.split(',').map(str::trim);
    let variant = parts.next().unwrap_or("").to_owned();
    if variant.is_empty() {
        return Err(format!("{figure}[…] needs a variant name"));
    }
    if !is_word(&variant) {
        return Err(format!(
            "{figure}[{inside}]: {variant:?} is not a variant name"
        ));
    }
    let mut at = Vec::new();
    for part in parts {
        let Some((k, v)) = part.split_once('=') else {
            return Err(format!(
                "{figure}[{inside}]: after the variant come cells as param=value, got {part:?}"
            ));
        };
        let (k, v) = (k.trim(), v.trim());
        if !is_word(k) || !is_word(v) {
            return Err(format!("{figure}[{inside}]: {part:?} is not param=value"));
        }
        if at.iter().any(|(name, _): &(String, String)| name == k) {
            return Err(format!("{figure}[{inside}]: {k} is named twice"));
        }
        at.push((k.to_owned(), v.to_owned()));
    }
    Ok(Reference {
        figure,
        variant,
        at,
    })
}

struct Parser {
    tokens: Vec<Token>,
    at: usize,
    depth: usize,
    /// Bare figure names stand for the map's own variant.
    bare: bool,
}

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.at)
    }

    fn next(&mut self) -> Option<Token> {
        let t = self.tokens.get(self.at).cloned();
        self.at += 1;
        t
    }

    fn op_in(&mut self, ops: &[Op]) -> Option<Op> {
        match self.peek() {
            Some(Token::Op(op)) if ops.contains(op) => {
                let op = *op;
                self.at += 1;
                Some(op)
            }
            _ => None,
        }
    }

    fn deeper(&mut self) -> Result<(), String> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(format!("nested more than {MAX_DEPTH} deep"));
        }
        Ok(())
    }

    fn hypothesis(&mut self) -> Result<Expr, String> {
        let mut left = self.comparison()?;
        while let Some(op) = self.op_in(&[Op::And, Op::Or]) {
            let right = self.comparison()?;
            left = Expr::Binary(Box::new(left), op, Box::new(right));
        }
        Ok(left)
    }

    fn comparison(&mut self) -> Result<Expr, String> {
        let left = self.sum()?;
        match self.op_in(&[Op::Lt, Op::Le, Op::Gt, Op::Ge, Op::Eq, Op::Ne]) {
            Some(op) => Ok(Expr::Binary(Box::new(left), op, Box::new(self.sum()?))),
            None => Ok(left),
        }
    }

    fn sum(&mut self) -> Result<Expr, String> {
        let mut left = self.product()?;
        while let Some(op) = self.op_in(&[Op::Add, Op::Sub]) {
            left = Expr::Binary(Box::new(left), op, Box::new(self.product()?));
        }
        Ok(left)
    }

    fn product(&mut self) -> Result<Expr, String> {
        let mut left = self.unary()?;
        while let Some(op) = self.op_in(&[Op::Mul, Op::Div]) {
            left = Expr::Binary(Box::new(left), op, Box::new(self.unary()?));
        }
        Ok(left)
    }

    fn close(&mut self, what: &str) -> Result<(), String> {
        match self.next() {
            Some(Token::Close) => {
                self.depth -= 1;
                Ok(())
            }
            _ => Err(format!("{what} without its )")),
        }
    }

    fn unary(&mut self) -> Result<Expr, String> {
        match self.next() {
            Some(Token::Op(Op::Sub)) => {
                self.deeper()?;
                let inner = self.unary()?;
                self.depth -= 1;
                Ok(Expr::Neg(Box::new(inner)))
            }
            Some(Token::Number(n)) => Ok(Expr::Number(n)),
            Some(Token::Open) => {
                self.deeper()?;
                let inner = self.sum()?;
                self.close("a (")?;
                Ok(inner)
            }
            Some(Token::Name(name)) => {
                match self.peek() {
                    Some(Token::Bracket(_)) => {
                        let Some(Token::Bracket(inside)) = self.next() else {
                            unreachable!("just peeked");
                        };
                        Ok(Expr::Figure(reference(name, &inside)?))
                    }
                    Some(Token::Open) => {
                        self.at += 1;
                        self.deeper()?;
                        let expr = match name.as_str() {
                        "count" => Expr::Count(Box::new(self.hypothesis()?)),
                        "smallest" | "largest" => {
                            let Some(Token::Name(param)) = self.next() else {
                                return Err(format!("{name}(…) starts with a swept parameter: {name}(rate, …)"));
                            };
                            if self.next() != Some(Token::Comma) {
                                return Err(format!("{name}({param} needs a comma and a hypothesis after it"));
                            }
                            Expr::Extreme {
                                largest: name == "largest",
                                param,
                                cond: Box::new(self.hypothesis()?),
                            }
                        }
                        other => {
                            return Err(format!(
                                "no function named {other}; the functions are count, smallest, largest"
                            ))
                        }
                    };
                        self.close(&format!("{name}("))?;
                        Ok(expr)
                    }
                    _ if self.bare => Ok(Expr::Figure(Reference {
                        figure: name,
                        variant: String::new(),
                        at: Vec::new(),
                    })),
                    _ => Err(format!("{name} needs a variant: {name}[variant]")),
                }
            }
            Some(other) => Err(format!("unexpected {other:?}")),
            None => Err("the expression ends too soon".into()),
        }
    }
}

fn parse_with(text: &str, bare: bool) -> Result<Expr, String> {
    let length = text.chars().count();
    if length > MAX_LENGTH {
        return Err(format!(
            "a hypothesis is at most {MAX_LENGTH} characters, this one {length}"
        ));
    }
    let mut parser = Parser {
        tokens: tokens(text)?,
        at: 0,
        depth: 0,
        bare,
    };
    let expr = parser.hypothesis()?;
    if let Some(extra) = parser.peek() {
        return Err(format!("unexpected {extra:?} after a complete expression"));
    }
    Ok(expr)
}

/// Parses a hypothesis; the error says what is wrong, for the file's line.
pub fn parse(text: &str) -> Result<Expr, String> {
    parse_with(text, false)
}

/// Parses a map's verdict, whose figures are bare names.
pub fn parse_verdict(text: &str) -> Result<Expr, String> {
    parse_with(text, true)
}

/// What an expression reads its figures from.
pub trait Scope {
    /// The swept parameters (none without a sweep).
    fn params(&self) -> &[Param];
    /// `figure` of `variant` in the cell `at` names (every swept parameter,
    /// each with a value that `Param::find` knows).
    fn figure(&self, figure: &str, variant: &str, at: &[(String, String)]) -> Option<f64>;
}

/// The parameters bound from outside a reference, with their values.
type Binding = Vec<(String, String)>;

impl Expr {
    /// Every figure reference, those inside functions included.
    pub fn references(&self) -> Vec<&Reference> {
        match self {
            Expr::Number(_) => Vec::new(),
            Expr::Figure(r) => vec![r],
            Expr::Neg(inner) | Expr::Count(inner) => inner.references(),
            Expr::Extreme { cond, .. } => cond.references(),
            Expr::Binary(l, _, r) => {
                let mut refs = l.references();
                refs.extend(r.references());
                refs
            }
        }
    }

    /// The parameters a `count` around this expression ranges over: those
    /// neither bound outside it nor fixed by a reference inside it.
    fn ranging<'p>(&self, params: &'p [Param], bound: &[&str]) -> Vec<&'p Param> {
        let refs = self.references();
        params
            .iter()
            .filter(|p| !bound.contains(&p.name.as_str()))
            .filter(|p| !refs.iter().any(|r| r.at.iter().any(|(k, _)| *k == p.name)))
            .collect()
    }

    /// Checks that every reference names a cell of `params`: each swept
    /// parameter once, by a function around it or by the reference itself,
    /// with one of its values.
    pub fn check_cells(&self, params: &[Param]) -> Result<(), String> {
        self.check_bound(params, &[])
    }

    fn check_bound(&self, params: &[Param], bound: &[&str]) -> Result<(), String> {
        match self {
            Expr::Number(_) => Ok(()),
            Expr::Figure(r) => {
                for (k, v) in &r.at {
                    let Some(p) = params.iter().find(|p| &p.name == k) else {
                        return Err(if params.is_empty() {
                            format!("{r}: the experiment sweeps nothing, so a figure names no cell")
                        } else {
                            format!(
                                "{r}: no swept parameter named {k}; the sweep varies {}",
                                names(params)
                            )
                        });
                    };
                    if bound.contains(&k.as_str()) {
                        return Err(format!("{r}: {k} already ranges over its values here"));
                    }
                    if p.find(v).is_none() {
                        return Err(format!("{r}: {k} takes the values {}, not {v}", p.listed()));
                    }
                }
                for p in params {
                    let named = r.at.iter().any(|(k, _)| *k == p.name);
                    if !named && !bound.contains(&p.name.as_str()) {
                        return Err(format!(
                            "{r} needs its cell: the sweep varies {} ({}), so write {}[{}, {}=…] or put it inside count(…)",
                            p.name,
                            p.listed(),
                            r.figure,
                            if r.variant.is_empty() { "variant" } else { &r.variant },
                            p.name
                        ));
                    }
                }
                Ok(())
            }
            Expr::Neg(inner) => inner.check_bound(params, bound),
            Expr::Binary(l, _, r) => {
                l.check_bound(params, bound)?;
                r.check_bound(params, bound)
            }
            Expr::Count(cond) => {
                if params.is_empty() {
                    return Err("count(…) counts the cells of a sweep, and nothing is swept".into());
                }
                let ranging = cond.ranging(params, bound);
                if ranging.is_empty() {
                    return Err(format!(
                        "{self}: every swept parameter is fixed inside it, so it has no cells to count"
                    ));
                }
                let mut inner: Vec<&str> = bound.to_vec();
                inner.extend(ranging.iter().map(|p| p.name.as_str()));
                cond.check_bound(params, &inner)
            }
            Expr::Extreme { param, cond, .. } => {
                if !params.iter().any(|p| &p.name == param) {
                    return Err(if params.is_empty() {
                        format!("{self}: nothing is swept")
                    } else {
                        format!(
                            "{self}: no swept parameter named {param}; the sweep varies {}",
                            names(params)
                        )
                    });
                }
                if bound.contains(&param.as_str()) {
                    return Err(format!(
                        "{self}: {param} already ranges over its values here"
                    ));
                }
                let mut inner: Vec<&str> = bound.to_vec();
                inner.push(param);
                cond.check_bound(params, &inner)
            }
        }
    }

    /// The value: a number, or 1/0 for a comparison or a combination; NaN
    /// when a figure has no value, or arithmetic has none (a division by
    /// zero, an overflow): comparisons with NaN are false, so a claim that
    /// reads one fails rather than passing on an infinity.
    pub fn eval(&self, scope: &dyn Scope) -> f64 {
        self.eval_in(scope, &Vec::new())
    }

    fn eval_in(&self, scope: &dyn Scope, binding: &Binding) -> f64 {
        match self {
            Expr::Number(n) => *n,
            Expr::Figure(r) => {
                let mut at = binding.clone();
                at.extend(r.at.iter().cloned());
                scope.figure(&r.figure, &r.variant, &at).unwrap_or(f64::NAN)
            }
            Expr::Neg(inner) => -inner.eval_in(scope, binding),
            Expr::Binary(l, op, r) => {
                let (a, b) = (l.eval_in(scope, binding), r.eval_in(scope, binding));
                let truth = |t: bool| if t { 1.0 } else { 0.0 };
                let number = |x: f64| if x.is_finite() { x } else { f64::NAN };
                match op {
                    Op::Add => number(a + b),
                    Op::Sub => number(a - b),
                    Op::Mul => number(a * b),
                    Op::Div => number(a / b),
                    Op::Lt => truth(a < b),
                    Op::Le => truth(a <= b),
                    Op::Gt => truth(a > b),
                    Op::Ge => truth(a >= b),
                    Op::Eq => truth(a == b),
                    Op::Ne => truth(!a.is_nan() && !b.is_nan() && a != b),
                    Op::And => truth(a == 1.0 && b == 1.0),
                    Op::Or => truth(a == 1.0 || b == 1.0),
                }
            }
            Expr::Count(cond) => {
                // Every combination of the parameters it ranges over.
                let bound: Vec<&str> = binding.iter().map(|(k, _)| k.as_str()).collect();
                let mut bindings = vec![binding.clone()];
                for p in cond.ranging(scope.params(), &bound) {
                    bindings = bindings
                        .into_iter()
                        .flat_map(|b| {
                            p.values.iter().map(move |v| {
                                let mut next = b.clone();
                                next.push((p.name.clone(), v.text.clone()));
                                next
                            })
                        })
                        .collect();
                }
                bindings
                    .iter()
                    .filter(|b| cond.eval_in(scope, b) == 1.0)
                    .count() as f64
            }
            Expr::Extreme {
                largest,
                param,
                cond,
            } => {
                let Some(p) = scope.params().iter().find(|p| &p.name == param) else {
                    return f64::NAN;
                };
                let mut values: Vec<_> = p.values.iter().collect();
                values.sort_by(|a, b| a.number.total_cmp(&b.number));
                if *largest {
                    values.reverse();
                }
                values
                    .into_iter()
                    .find(|v| {
                        let mut b = binding.clone();
                        b.push((param.clone(), v.text.clone()));
                        cond.eval_in(scope, &b) == 1.0
                    })
                    .map_or(f64::NAN, |v| v.number)
            }
        }
    }

    /// What the report shows beside a verdict: each figure read outside a
    /// function with its value, and each function with its result, once
    /// each, in the order they are written.
    pub fn readings(&self, scope: &dyn Scope) -> Vec<(String, Option<f64>)> {
        let mut out: Vec<(String, Option<f64>)> = Vec::new();
        for reading in self.all_readings(scope) {
            if !out.iter().any(|(name, _)| *name == reading.0) {
                out.push(reading);
            }
        }
        out
    }

    fn all_readings(&self, scope: &dyn Scope) -> Vec<(String, Option<f64>)> {
        let value = |x: f64| (!x.is_nan()).then_some(x);
        match self {
            Expr::Number(_) => Vec::new(),
            Expr::Figure(_) | Expr::Count(_) | Expr::Extreme { .. } => {
                vec![(self.to_string(), value(self.eval(scope)))]
            }
            Expr::Neg(inner) => inner.all_readings(scope),
            Expr::Binary(l, _, r) => {
                let mut out = l.all_readings(scope);
                out.extend(r.all_readings(scope));
                out
            }
        }
    }
}

fn names(params: &[Param]) -> String {
    params
        .iter()
        .map(|p| p.name.as_str())
        .collect::<Vec<_>>()
        .join(" and ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::experiment::sweep::{ParamKind, Value};

    /// Figures of an experiment without a sweep.
    struct Plain;

    impl Scope for Plain {
        fn params(&self) -> &[Param] {
            &[]
        }

        fn figure(&self, figure: &str, variant: &str, at: &[(String, String)]) -> Option<f64> {
            assert!(at.is_empty());
            match (figure, variant) {
                ("amplification", "retry_only") => Some(2.7),
                ("amplification", "both") => Some(1.1),
                ("duplicate_charges", "idempotent") => Some(0.0),
                ("time_to_fail_p99_ms", "both") => None,
                _ => panic!("unexpected {figure}[{variant}]"),
            }
        }
    }

    fn holds(text: &str) -> bool {
        parse(text).unwrap().eval(&Plain) == 1.0
    }

    #[test]
    fn a_division_by_zero_or_an_overflow_has_no_value_and_fails_every_comparison() {
        for text in [
            "amplification[both] / 0 > 1",
            "amplification[both] / 0 < 1",
            "-amplification[both] / 0 < 1",
            "0 / 0 == 0 / 0",
            "amplification[both] / 0 != 5",
            "99999999999999999999 * 99999999999999999999 * 99999999999999999999 * 99999999999999999999 * 99999999999999999999 * 99999999999999999999 * 99999999999999999999 * 99999999999999999999 * 99999999999999999999 * 99999999999999999999 * 99999999999999999999 * 99999999999999999999 * 99999999999999999999 * 99999999999999999999 * 99999999999999999999 * 99999999999999999999 > 1",
        ] {
            assert!(!holds(text), "{text}");
        }
        assert!(holds("amplification[both] / 2 < 1"));
    }

    #[test]
    fn comparisons_and_arithmetic_follow_the_usual_precedence() {
        assert!(holds("amplification[retry_only] > 2 * amplification[both]"));
        assert!(!holds(
            "amplification[retry_only] > 3 * amplification[both]"
        ));
        assert!(holds("duplicate_charges[idempotent] == 0"));
        assert!(holds("1 + 2 * 3 == 7"));
        assert!(holds("(1 + 2) * 3 == 9"));
        assert!(holds("-1 < 0 and 2 >= 2"));
        assert!(holds("1 > 2 or 3 != 4"));
        assert!(!holds("1 > 2 and 3 != 4"));
        assert!(holds("amplification[both] <= 1.2"));
    }

    #[test]
    fn less_or_equal_holds_at_equality_and_minus_and_divide_group_to_the_left() {
        assert!(holds("2 <= 2"));
        assert!(!holds("2 < 2"));
        assert!(holds("2 >= 2"));
        assert!(holds("10 - 2 - 3 == 5"), "(10 - 2) - 3, not 10 - (2 - 3)");
        assert!(holds("8 / 4 / 2 == 1"), "(8 / 4) / 2, not 8 / (4 / 2)");
    }

    #[test]
    fn a_missing_figure_never_makes_a_hypothesis_pass() {
        for text in [
            "time_to_fail_p99_ms[both] > 0",
            "time_to_fail_p99_ms[both] < 0",
            "time_to_fail_p99_ms[both] == 0",
            "time_to_fail_p99_ms[both] != 0",
        ] {
            assert!(!holds(text), "{text}");
        }
    }

    #[test]
    fn references_list_every_figure_read() {
        let e = parse("amplification[retry_only] > 2 * amplification[both]").unwrap();
        let refs: Vec<(&str, &str)> = e
            .references()
            .into_iter()
            .map(|r| (r.figure.as_str(), r.variant.as_str()))
            .collect();
        assert_eq!(
            refs,
            [("amplification", "retry_only"), ("amplification", "both")]
        );
    }

    #[test]
    fn malformed_expressions_say_what_is_wrong() {
        for (text, hint) in [
            ("amplification > 2", "needs a variant"),
            ("amplification[both > 2", "without its ]"),
            ("(1 + 2", "without its )"),
            ("1 +", "ends too soon"),
            ("1 2", "after a complete expression"),
            ("1 # 2", "unexpected"),
            ("success[a, rate] > 1", "param=value"),
            ("success[a, rate=1, rate=2] > 1", "named twice"),
            ("median(x[a]) > 1", "no function named median"),
            ("smallest(x[a] > 1)", "needs a comma"),
            ("smallest(2, x[a] > 1)", "starts with a swept parameter"),
            ("count(x[a] > 1", "without its )"),
        ] {
            let err = parse(text).unwrap_err();
            assert!(err.contains(hint), "{text}: {err}");
        }
    }

    #[test]
    fn hostile_expressions_are_refused_before_they_can_exhaust_the_stack() {
        let nested = format!("{}1{}", "(".repeat(10_000), ")".repeat(10_000));
        assert!(parse(&nested)
            .unwrap_err()
            .contains("at most 1000 characters"));
        let nested = format!("{}1{} > 0", "(".repeat(20), ")".repeat(20));
        assert!(parse(&nested).unwrap_err().contains("nested more than 16"));
        let minus = format!("{}1 > 0", "-".repeat(30));
        assert!(parse(&minus).unwrap_err().contains("nested more than 16"));
        let chain = vec!["1 > 0"; 100_000].join(" and ");
        assert!(parse(&chain).unwrap_err().contains("at most 1000"));
        // Within the limits, deep enough for any real claim.
        let ok = format!("{}1{} > 0", "(".repeat(15), ")".repeat(15));
        assert!(holds(&ok));
        assert!(holds(&vec!["1 > 0"; 100].join(" and ")));
    }

    /// A sweep over `rate` (10, 100, 1000) and `spike` (1s, 2s): the
    /// success ratio falls with the rate, faster with a longer spike.
    struct Swept(Vec<Param>);

    fn swept() -> Swept {
        let value = |text: &str, number: f64, numeric: bool| Value {
            text: text.into(),
            number,
            numeric,
        };
        Swept(vec![
            Param {
                name: "rate".into(),
                kind: ParamKind::Rate,
                values: vec![
                    value("10", 10.0, true),
                    value("100", 100.0, true),
                    value("1000", 1000.0, true),
                ],
                label: "rate".into(),
                durations: false,
            },
            Param {
                name: "spike".into(),
                kind: ParamKind::Schedule,
                values: vec![value("1s", 1.0, false), value("2s", 2.0, false)],
                label: "spike".into(),
                durations: true,
            },
        ])
    }

    impl Scope for Swept {
        fn params(&self) -> &[Param] {
            &self.0
        }

        fn figure(&self, figure: &str, variant: &str, at: &[(String, String)]) -> Option<f64> {
            assert_eq!(figure, "success_ratio");
            let index = |name: &str| {
                let (_, v) = at.iter().find(|(k, _)| k == name).expect("a full cell");
                self.0
                    .iter()
                    .find(|p| p.name == name)
                    .unwrap()
                    .find(v)
                    .unwrap()
            };
            let number = |name: &str| {
                let p = self.0.iter().find(|p| p.name == name).unwrap();
                p.values[index(name)].number
            };
            let (rate, spike) = (number("rate"), number("spike"));
            let base = match (variant, rate as u32) {
                ("consecutive", 10) => 0.9,
                ("consecutive", 100) => 0.4,
                ("consecutive", _) => 0.02,
                ("rate", _) => 0.97,
                _ => return None,
            };
            Some(base - 0.01 * (spike - 1.0))
        }
    }

    fn holds_in(scope: &Swept, text: &str) -> bool {
        let e = parse(text).unwrap();
        e.check_cells(scope.params()).unwrap();
        e.eval(scope) == 1.0
    }

    #[test]
    fn a_reference_names_its_cell_and_functions_range_over_cells() {
        let s = swept();
        assert!(holds_in(
            &s,
            "success_ratio[consecutive, rate=1000, spike=1s] < 0.05"
        ));
        assert!(holds_in(
            &s,
            "success_ratio[consecutive, spike=1000ms, rate=1000.0] < 0.05"
        ));
        assert!(holds_in(&s, "count(success_ratio[consecutive] < 0.5) == 4"));
        assert!(holds_in(&s, "count(success_ratio[rate] > 0.9) == 6"));
        assert!(holds_in(
            &s,
            "count(success_ratio[consecutive, spike=2s] < 0.5) == 2"
        ));
        // Fixing rate inside, it counts along spike alone.
        assert!(holds_in(
            &s,
            "count(success_ratio[consecutive, rate=100] < 0.5) == 2"
        ));
        assert!(holds_in(
            &s,
            "count(success_ratio[consecutive, rate=10] < 0.895) == 1"
        ));
        assert!(holds_in(
            &s,
            "smallest(rate, success_ratio[consecutive, spike=1s] < 0.5) == 100"
        ));
        assert!(holds_in(
            &s,
            "largest(rate, success_ratio[consecutive, spike=1s] > 0.5) == 10"
        ));
        assert!(holds_in(
            &s,
            "smallest(spike, success_ratio[consecutive, rate=10] < 0.895) == 2"
        ));
        // Whatever order the file lists the values in.
        let mut shuffled = swept();
        shuffled.0[0].values.reverse();
        shuffled.0[1].values.reverse();
        assert!(holds_in(
            &shuffled,
            "smallest(rate, success_ratio[consecutive, spike=1s] < 0.5) == 100"
        ));
        assert!(holds_in(
            &shuffled,
            "largest(rate, success_ratio[consecutive, spike=1s] > 0.5) == 10"
        ));
        // Nowhere: no value, so no comparison holds.
        let e = parse("smallest(rate, success_ratio[rate, spike=1s] < 0.5) > 0").unwrap();
        assert_eq!(e.eval(&s), 0.0);
        let readings = e.readings(&s);
        assert_eq!(readings.len(), 1);
        assert_eq!(readings[0].1, None);
        assert!(readings[0].0.starts_with("smallest(rate, "), "{readings:?}");
    }

    #[test]
    fn a_reference_outside_its_cells_is_refused_at_load_with_what_it_may_name() {
        let s = swept();
        for (text, hint) in [
            (
                "success_ratio[consecutive] < 1",
                "needs its cell: the sweep varies rate (10, 100, 1000)",
            ),
            (
                "success_ratio[consecutive, rate=10] < 1",
                "the sweep varies spike",
            ),
            (
                "success_ratio[consecutive, rate=20, spike=1s] < 1",
                "rate takes the values 10, 100, 1000, not 20",
            ),
            (
                "success_ratio[consecutive, size=1, rate=10, spike=1s] < 1",
                "no swept parameter named size",
            ),
            (
                "count(success_ratio[consecutive, rate=10, spike=1s] < 1) > 0",
                "no cells to count",
            ),
            (
                "count(success_ratio[consecutive, rate=10] < 1 and success_ratio[rate] > 0) > 0",
                "needs its cell: the sweep varies rate",
            ),
            (
                "smallest(size, success_ratio[consecutive] < 1) > 0",
                "no swept parameter named size",
            ),
            (
                "smallest(rate, success_ratio[consecutive] < 1) > 0",
                "the sweep varies spike",
            ),
        ] {
            let err = parse(text).unwrap().check_cells(s.params()).unwrap_err();
            assert!(err.contains(hint), "{text}: {err}");
        }
        let err = parse("count(amplification[both] > 1) > 0")
            .unwrap()
            .check_cells(&[])
            .unwrap_err();
        assert!(err.contains("nothing is swept"), "{err}");
    }

    #[test]
    fn a_verdict_reads_bare_figures() {
        let e = parse_verdict("time_to_recover_s <= 10 and wasted_calls < 5").unwrap();
        let refs = e.references();
        assert_eq!(refs.len(), 2);
        assert!(refs.iter().all(|r| r.variant.is_empty()));
        assert!(parse("time_to_recover_s <= 10").is_err());
    }
}
