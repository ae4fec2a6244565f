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
//! unary      := "-" unary | number | figure "[" variant "]" | "(" sum ")"
//! ```
//!
//! A figure with no value (a time to fail when nothing failed) makes every
//! comparison that uses it false, so a hypothesis never passes on a missing
//! number.

use std::fmt;

#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    Number(f64),
    Figure { figure: String, variant: String },
    Neg(Box<Expr>),
    Binary(Box<Expr>, Op, Box<Expr>),
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

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Number(f64),
    Name(String),
    Op(Op),
    Open,
    Close,
    OpenBracket,
    CloseBracket,
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
            ' ' | '\t' => {
                i += 1;
                continue;
            }
            '(' => (Token::Open, 1),
            ')' => (Token::Close, 1),
            '[' => (Token::OpenBracket, 1),
            ']' => (Token::CloseBracket, 1),
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
                while i < chars.len()
                    && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == '-')
                {
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

struct Parser {
    tokens: Vec<Token>,
    at: usize,
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

    fn unary(&mut self) -> Result<Expr, String> {
        match self.next() {
            Some(Token::Op(Op::Sub)) => Ok(Expr::Neg(Box::new(self.unary()?))),
            Some(Token::Number(n)) => Ok(Expr::Number(n)),
            Some(Token::Open) => {
                let inner = self.sum()?;
                match self.next() {
                    Some(Token::Close) => Ok(inner),
                    _ => Err("a ( without its )".into()),
                }
            }
            Some(Token::Name(figure)) => {
                if self.next() != Some(Token::OpenBracket) {
                    return Err(format!("{figure} needs a variant: {figure}[variant]"));
                }
                let Some(Token::Name(variant)) = self.next() else {
                    return Err(format!("{figure}[…] needs a variant name"));
                };
                if self.next() != Some(Token::CloseBracket) {
                    return Err(format!("{figure}[{variant} without its ]"));
                }
                Ok(Expr::Figure { figure, variant })
            }
            Some(other) => Err(format!("unexpected {other:?}")),
            None => Err("the expression ends too soon".into()),
        }
    }
}

/// Parses a hypothesis; the error says what is wrong, for the file's line.
pub fn parse(text: &str) -> Result<Expr, String> {
    let mut parser = Parser {
        tokens: tokens(text)?,
        at: 0,
    };
    let expr = parser.hypothesis()?;
    if let Some(extra) = parser.peek() {
        return Err(format!("unexpected {extra:?} after a complete expression"));
    }
    Ok(expr)
}

impl Expr {
    /// Every `figure[variant]` the expression reads.
    pub fn references(&self) -> Vec<(&str, &str)> {
        match self {
            Expr::Number(_) => Vec::new(),
            Expr::Figure { figure, variant } => vec![(figure.as_str(), variant.as_str())],
            Expr::Neg(inner) => inner.references(),
            Expr::Binary(l, _, r) => {
                let mut refs = l.references();
                refs.extend(r.references());
                refs
            }
        }
    }

    /// The value: a number, or 1/0 for a comparison or a combination; NaN
    /// when a figure has no value (and comparisons with NaN are false).
    pub fn eval(&self, figure: &dyn Fn(&str, &str) -> Option<f64>) -> f64 {
        match self {
            Expr::Number(n) => *n,
            Expr::Figure { figure: f, variant } => figure(f, variant).unwrap_or(f64::NAN),
            Expr::Neg(inner) => -inner.eval(figure),
            Expr::Binary(l, op, r) => {
                let (a, b) = (l.eval(figure), r.eval(figure));
                let truth = |t: bool| if t { 1.0 } else { 0.0 };
                match op {
                    Op::Add => a + b,
                    Op::Sub => a - b,
                    Op::Mul => a * b,
                    Op::Div => a / b,
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
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figures(figure: &str, variant: &str) -> Option<f64> {
        match (figure, variant) {
            ("amplification", "retry_only") => Some(2.7),
            ("amplification", "both") => Some(1.1),
            ("duplicate_charges", "idempotent") => Some(0.0),
            ("time_to_fail_p99_ms", "both") => None,
            _ => panic!("unexpected {figure}[{variant}]"),
        }
    }

    fn holds(text: &str) -> bool {
        parse(text).unwrap().eval(&figures) == 1.0
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
        assert_eq!(
            e.references(),
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
        ] {
            let err = parse(text).unwrap_err();
            assert!(err.contains(hint), "{text}: {err}");
        }
    }
}
